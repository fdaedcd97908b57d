"""Checkpoints: named snapshots; export as a plain torch checkpoint; rollback; fork."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from schemas import CheckpointCreate, CheckpointList, CheckpointPublic, Fork, Rollback, RunPublic

from ..deps import ManagerDep, RunName, TenantDep, on_run
from ..errors import RunConflict
from ..models import Checkpoint
from ..runtime import Live, RunManager
from .runs import run_public, torch_bytes

router = APIRouter(tags=["checkpoints"])


def _public(c: Checkpoint) -> CheckpointPublic:
    return CheckpointPublic(name=c.name, t=c.t, epoch=c.epoch, size=c.size, digest=c.digest, created_at=c.created_at)


@router.post("/runs/{run}/checkpoints", status_code=201, response_model=CheckpointPublic, summary="Save a named checkpoint")
async def create_checkpoint(
    request: Request, run: RunName, body: CheckpointCreate, manager: ManagerDep, tenant: TenantDep
) -> CheckpointPublic:
    return _public(await on_run(request, tenant, run, manager.create_checkpoint, body.name))


@router.get("/runs/{run}/checkpoints", response_model=CheckpointList, summary="The run's checkpoints")
async def list_checkpoints(request: Request, run: RunName, manager: ManagerDep, tenant: TenantDep) -> CheckpointList:
    rows = await on_run(request, tenant, run, manager.list_checkpoints)
    return CheckpointList(checkpoints=[_public(c) for c in rows])


@router.delete("/runs/{run}/checkpoints/{name}", status_code=204, summary="Delete a checkpoint")
async def delete_checkpoint(request: Request, run: RunName, name: RunName, manager: ManagerDep, tenant: TenantDep) -> Response:
    await on_run(request, tenant, run, manager.delete_checkpoint, name)
    return Response(status_code=204)


@router.get(
    "/runs/{run}/checkpoints/{name}/export",
    summary="A .pt file for plain torch/timm (torch.load(..., weights_only=True))",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def export_checkpoint(request: Request, run: RunName, name: RunName, manager: ManagerDep, tenant: TenantDep) -> Response:
    def work(live: Live) -> bytes:
        _, state = manager.checkpoint_state(live, name)
        return torch_bytes(state.export())

    data = await on_run(request, tenant, run, work)
    return Response(
        data, media_type="application/octet-stream", headers={"Content-Disposition": f'attachment; filename="{run}-{name}.pt"'}
    )


@router.post("/runs/{run}/rollback", response_model=RunPublic, summary="Return the run to a checkpoint")
async def rollback(request: Request, run: RunName, body: Rollback, manager: ManagerDep, tenant: TenantDep) -> RunPublic:
    return run_public(await on_run(request, tenant, run, manager.rollback, body.checkpoint))


@router.post("/runs/{run}/fork", status_code=201, response_model=RunPublic, summary="A new run from a checkpoint")
async def fork(request: Request, run: RunName, body: Fork, tenant: TenantDep) -> RunPublic:
    manager: RunManager = request.app.state.manager
    if body.name == run:
        raise RunConflict(f"run {run!r} already exists: a fork needs a new name")
    # both runs' locks, always taken in the same order, so that concurrent forks cannot deadlock
    first, second = sorted((run, body.name))
    async with request.app.state.locks(tenant, first), request.app.state.locks(tenant, second):
        live = await run_in_threadpool(manager.get, tenant, run)
        forked = await run_in_threadpool(
            partial(
                manager.fork,
                live,
                checkpoint=body.checkpoint,
                name=body.name,
                durability=body.durability,
                snapshot_every=body.snapshot_every,
            )
        )
        return run_public(forked)
