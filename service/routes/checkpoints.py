"""Checkpoints: named snapshots; export as a plain torch checkpoint; rollback; fork."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from schemas import CheckpointCreate, CheckpointList, CheckpointPublic, Fork, Rollback, RunPublic

from ..deps import RegistryDep, RunName, TenantDep
from ..errors import RunConflict
from ..runs import Live, history, lifecycle
from ..storage.models import Checkpoint
from .steps import torch_bytes

router = APIRouter(tags=["checkpoints"])


def _public(c: Checkpoint) -> CheckpointPublic:
    return CheckpointPublic(name=c.name, t=c.t, epoch=c.epoch, size=c.size, digest=c.digest, created_at=c.created_at)


@router.post("/runs/{run}/checkpoints", status_code=201, response_model=CheckpointPublic, summary="Save a named checkpoint")
async def create_checkpoint(run: RunName, body: CheckpointCreate, registry: RegistryDep, tenant: TenantDep) -> CheckpointPublic:
    def work(live: Live) -> Checkpoint:
        return history.create_checkpoint(registry.ctx, registry.snapshots, live, body.name)

    # a read hold: the checkpoint reads the state; writers (steps) wait until it is written
    return _public(await registry.call(tenant, run, work))


@router.get("/runs/{run}/checkpoints", response_model=CheckpointList, summary="The run's checkpoints")
async def list_checkpoints(run: RunName, registry: RegistryDep, tenant: TenantDep) -> CheckpointList:
    rows = await registry.call(tenant, run, lambda live: history.checkpoints(registry.ctx, live))
    return CheckpointList(checkpoints=[_public(c) for c in rows])


@router.delete("/runs/{run}/checkpoints/{name}", status_code=204, summary="Delete a checkpoint")
async def delete_checkpoint(run: RunName, name: RunName, registry: RegistryDep, tenant: TenantDep) -> Response:
    await registry.call(tenant, run, lambda live: history.delete_checkpoint(registry.ctx, live, name), write=True)
    return Response(status_code=204)


@router.get(
    "/runs/{run}/checkpoints/{name}/export",
    summary="A .pt file for plain torch/timm (torch.load(..., weights_only=True))",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def export_checkpoint(run: RunName, name: RunName, registry: RegistryDep, tenant: TenantDep) -> Response:
    exported = await registry.call(tenant, run, lambda live: history.export_checkpoint(registry.ctx, live, name))
    return Response(
        await run_in_threadpool(torch_bytes, exported),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{run}-{name}.pt"'},
    )


@router.post("/runs/{run}/rollback", response_model=RunPublic, summary="Return the run to a checkpoint")
async def rollback(run: RunName, body: Rollback, registry: RegistryDep, tenant: TenantDep) -> RunPublic:
    def work(live: Live) -> Live:
        return history.rollback(registry.ctx, registry.snapshots, live, body.checkpoint)

    await registry.call(tenant, run, work, write=True)
    return await lifecycle.describe(registry, tenant, run)


@router.post("/runs/{run}/fork", status_code=201, response_model=RunPublic, summary="A new run from a checkpoint")
async def fork(run: RunName, body: Fork, registry: RegistryDep, tenant: TenantDep) -> RunPublic:
    if body.name == run:
        raise RunConflict(f"run {run!r} already exists: a fork needs a new name")
    # the source read, the new name written; both held, always in the same order, so that forks cannot deadlock
    holds = {run: {"write": False, "load": True}, body.name: {"write": True, "load": False}}
    first, second = sorted(holds)
    async with registry.hold(tenant, first, **holds[first]), registry.hold(tenant, second, **holds[second]):
        source = registry.live(tenant, run)
        assert source is not None
        row = await run_in_threadpool(
            history.fork,
            registry.ctx,
            source,
            checkpoint=body.checkpoint,
            name=body.name,
            durability=body.durability,
            snapshot_every=body.snapshot_every,
        )
    return lifecycle.public(row, None)
