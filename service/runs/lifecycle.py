"""Runs come and go: create (idempotent by name), describe and list (from the database alone), delete.

A run is stored only once the engine has built it and described it: a spec the engine refuses, or that it
cannot describe, is a 422 and nothing is written. Describing and listing read the ``run`` rows and load no
tensors; a run that is in memory here adds what has changed since its row was written (a snapshot-only run's
position) and says it is live.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

import optim_core
from optim_core import RunSpec, RunState
from optim_core import describe as describe_lrs
from schemas import AppliedStep, AppliedSteps, RunCreate, RunPublic

from ..errors import Invalid, RunConflict, RunNotFound, from_engine
from ..storage import Duplicate, new_key
from ..storage.models import Run, StepRecord
from .live import Live, RunContext, described, spec_digest
from .registry import RunRegistry

# the initial parameters: decoded in the worker thread that builds the run (tensor work stays off the event loop)
ParamsReader = Callable[[RunSpec], Mapping[str, torch.Tensor]]


def public(row: Run, live: Live | None) -> RunPublic:
    """The API's description of a run: its row, and its live state's position when it is in memory here."""
    t, epoch, lrs, skipped = row.t, row.epoch, row.lrs, row.skipped_steps
    if live is not None:
        state = live.state
        t, epoch, lrs, skipped = state.t, state.epoch, state.lrs, state.skipped_steps
    groups = [dict(g) for g in row.groups or []]
    for g, lr in zip(groups, lrs or [], strict=False):
        g["lr"] = lr
    return RunPublic(
        name=row.name,
        t=t,
        epoch=epoch,
        lr=lrs,
        lr_notes=lr_notes(row.spec, groups),
        needs=needs(row.spec),
        durability=row.durability,
        snapshot_every=row.snapshot_every,
        last_snapshot_t=row.last_snapshot_t if live is None else live.last_snapshot_t,
        last_snapshot_at=row.last_snapshot_at,
        skipped_steps=skipped,
        rejected_steps=max(row.rejected_steps, live.rejected_steps if live is not None else 0),
        groups=groups,
        group_sizes=row.group_sizes or [],
        state_bytes=live.state_bytes if live is not None else row.state_bytes,
        live=live is not None,
        steps_per_s=live.pace.rate() if live is not None else None,
        spec=row.spec,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _entry(spec: dict[str, Any]) -> optim_core.OptimizerEntry | None:
    """The catalogue entry of a stored spec (None for a name this server's catalogue lacks)."""
    name = spec["optimizer"]["name"] if isinstance(spec.get("optimizer"), dict) else spec.get("optimizer")
    try:
        return optim_core.get_optimizer(str(name))
    except optim_core.EngineError:
        return None


def lr_notes(spec: dict[str, Any], groups: list[dict[str, Any]]) -> list[str | None]:
    """Why a group's LR is null (timm's relative-step Adafactor), from the stored spec and groups alone."""
    entry = _entry(spec)
    return describe_lrs.lr_notes(groups, entry.class_path) if entry is not None else [None for _ in groups]


def needs(spec: dict[str, Any]) -> list[str]:
    """What the run's optimizer takes beyond one gradient per step (``OptimizerEntry.needs``)."""
    entry = _entry(spec)
    return list(entry.needs) if entry is not None else []


def _row(ctx: RunContext, tenant: str, name: str) -> Run:
    with ctx.db.read(f"describing run {name!r}") as repo:
        row = repo.run(tenant, name)
    if row is None:
        raise RunNotFound(f"run {name!r} does not exist")
    return row


async def describe(registry: RunRegistry, tenant: str, name: str) -> RunPublic:
    row = await run_in_threadpool(_row, registry.ctx, tenant, name)
    return public(row, registry.live(tenant, name))


async def list_runs(registry: RunRegistry, tenant: str) -> list[RunPublic]:
    def rows() -> list[Run]:
        with registry.ctx.db.read("listing runs") as repo:
            return list(repo.runs(tenant))

    return [public(row, registry.live(tenant, row.name)) for row in await run_in_threadpool(rows)]


async def create(registry: RunRegistry, tenant: str, body: RunCreate, params: ParamsReader) -> tuple[RunPublic, bool]:
    """Create the run, or answer the existing one when its spec is the same: (description, created)."""
    async with registry.hold(tenant, body.name, write=True, load=False) as run:
        row, live = await run_in_threadpool(_create, registry.ctx, tenant, body, params)
        if live is not None:
            run.install(live)
        return public(row, run.live), live is not None


def _create(ctx: RunContext, tenant: str, body: RunCreate, read_params: ParamsReader) -> tuple[Run, Live | None]:
    try:
        spec = RunSpec.from_dict(body.spec_dict())
    except optim_core.EngineError as exc:
        raise from_engine(exc) from None
    snapshot_every = body.snapshot_every or ctx.settings.default_snapshot_every
    digest = spec_digest(spec, body.durability, snapshot_every)
    with ctx.db.read(f"looking up run {body.name!r}") as repo:
        existing = repo.run(tenant, body.name)
        count = repo.count_runs(tenant) if existing is None else 0
    if existing is not None:
        if existing.spec_digest != digest:
            raise RunConflict(f"run {body.name!r} exists with another spec (or durability policy); choose another name")
        return existing, None
    if len(spec.params) > ctx.settings.max_tensors:
        raise Invalid(f"the run has {len(spec.params)} parameter tensors; the limit is {ctx.settings.max_tensors}")
    if count >= ctx.settings.max_runs:
        raise Invalid(f"this tenant has {count} runs, the limit is {ctx.settings.max_runs}")
    try:
        # built, tried on a miniature and described: whatever the libraries refuse is a 422 and nothing is stored
        state, engine_facts = RunState.create(spec, read_params(spec), device=ctx.device)
        parts, state_digest, facts = state.parts(), engine_facts["digest"], described(state)  # on a GPU, host copies
    except optim_core.EngineError as exc:
        raise from_engine(exc) from None
    key = new_key()
    try:
        with ctx.db.write(f"creating run {body.name!r}") as repo:
            row = repo.add_run(
                tenant=tenant,
                name=body.name,
                spec=spec.to_dict(),
                spec_digest=digest,
                durability=body.durability,
                snapshot_every=snapshot_every,
                **facts,
                seq=0,
                last_snapshot_t=0,
                last_snapshot_at=datetime.now(UTC),
            )
            size = ctx.blobs.put(repo, key, parts)
            repo.add_snapshot(row.id, seq=0, t=0, digest=state_digest, blob_key=key, size=size)
    except Duplicate:
        # created meanwhile by another process: answer as if it had been first
        ctx.blobs.drop([key])
        return _create(ctx, tenant, body, read_params)
    live = Live(
        id=row.id,
        tenant=tenant,
        name=body.name,
        durability=body.durability,
        snapshot_every=snapshot_every,
        state=state,
        seq=0,
        last_applied=None,
        last_snapshot_seq=0,
        last_snapshot_t=0,
        state_bytes=facts["state_bytes"],
        recovery_target_s=ctx.settings.recovery_target_s,
    )
    return row, live


async def delete(registry: RunRegistry, tenant: str, name: str) -> None:
    """Delete the run with its log, snapshots and checkpoints; it leaves memory."""
    async with registry.hold(tenant, name, write=True, load=False) as run:
        await run_in_threadpool(_delete, registry, tenant, name)
        run.install(None)


def _delete(registry: RunRegistry, tenant: str, name: str) -> None:
    ctx = registry.ctx
    row = _row(ctx, tenant, name)
    registry.snapshots.wait(row.id)
    with ctx.db.write(f"deleting run {name!r}") as repo:
        keys = repo.blob_keys_of_run(row.id)
        repo.delete_run(row.id)
        ctx.blobs.delete(repo, keys)
    ctx.blobs.drop(keys)


async def applied_steps(
    registry: RunRegistry, tenant: str, name: str, *, start: int, stop: int | None, limit: int
) -> AppliedSteps:
    """The run's applied steps from ``start`` (to ``stop``), from the database alone."""

    def read() -> list[StepRecord]:
        row = _row(registry.ctx, tenant, name)
        with registry.ctx.db.read(f"listing the steps of run {name!r}") as repo:
            return list(repo.step_records(row.id, start, stop, limit))

    records = await run_in_threadpool(read)
    return AppliedSteps(
        steps=[
            AppliedStep(
                t=r.t,
                contributors=r.contributors,
                dropped=r.dropped,
                base_t=r.base_t,
                received={rank: datetime.fromtimestamp(seconds, UTC) for rank, seconds in r.received.items()},
                applied_at=r.applied_at,
            )
            for r in records
        ]
    )
