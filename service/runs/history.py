"""A run's history as the user shapes it: named checkpoints (create, list, read, delete), rollback to one, a
torch-format state loaded over the run, and forks of a checkpoint into a new run.

Each function runs under the run's hold (write, except reads of checkpoints), in a worker thread. A checkpoint
is written from the live state's own memory under the run's lock (a capture copy is for background writes).
Rewriting a run's history (rollback, load) makes the new state its one snapshot, drops its log and snapshots
(checkpoints stay), and resets the live state in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import optim_core
from optim_core import RunState

from ..errors import CheckpointConflict, CheckpointNotFound, RecoveryFailed, RunConflict, from_engine
from ..storage import Duplicate, Repository, new_key
from ..storage.models import Checkpoint, Run
from .live import Live, RunContext, described, spec_digest
from .recovery import read_state
from .snapshots import Snapshots


def create_checkpoint(ctx: RunContext, snapshots: Snapshots, live: Live, name: str) -> Checkpoint:
    # a snapshot in flight lands first, so that no capture of the state is in memory beside this one's write
    snapshots.wait(live.id)
    parts, digest = live.state.parts(), live.state.digest()
    key = new_key()
    try:
        with ctx.db.write(f"writing checkpoint {name!r}") as repo:
            size = ctx.blobs.put(repo, key, parts)
            return repo.add_checkpoint(
                live.id, name=name, seq=live.seq, t=live.state.t, epoch=live.state.epoch, digest=digest, blob_key=key, size=size
            )
    except Duplicate:
        ctx.blobs.drop([key])
        raise CheckpointConflict(f"run {live.name!r} already has a checkpoint {name!r}") from None


def checkpoints(ctx: RunContext, live: Live) -> Sequence[Checkpoint]:
    with ctx.db.read(f"listing the checkpoints of run {live.name!r}") as repo:
        return repo.checkpoints(live.id)


def _checkpoint(repo: Repository, live: Live, name: str) -> Checkpoint:
    ckpt = repo.checkpoint(live.id, name)
    if ckpt is None:
        raise CheckpointNotFound(f"run {live.name!r} has no checkpoint {name!r}")
    return ckpt


def checkpoint_state(ctx: RunContext, live: Live, name: str) -> tuple[Checkpoint, RunState]:
    with ctx.db.read(f"reading checkpoint {name!r}") as repo:
        ckpt = _checkpoint(repo, live, name)
        meta, tensors = read_state(ctx.blobs, repo, ckpt.blob_key, f"checkpoint {name!r}")
    try:
        return ckpt, RunState.from_parts(meta, tensors, device=ctx.device, adopt=True)
    except optim_core.EngineError as exc:
        raise RecoveryFailed(f"checkpoint {name!r} cannot be loaded here: {exc}") from None


def export_checkpoint(ctx: RunContext, live: Live, name: str) -> dict[str, Any]:
    """The checkpoint as plain torch/timm objects (``RunState.export``), for ``torch.save``."""
    return checkpoint_state(ctx, live, name)[1].export()


def delete_checkpoint(ctx: RunContext, live: Live, name: str) -> None:
    with ctx.db.write(f"deleting checkpoint {name!r}") as repo:
        ckpt = _checkpoint(repo, live, name)
        key = ckpt.blob_key
        repo.delete_checkpoint(ckpt.id)
        ctx.blobs.delete(repo, [key])
    ctx.blobs.drop([key])


def rollback(ctx: RunContext, snapshots: Snapshots, live: Live, checkpoint: str) -> Live:
    """The run goes back to the checkpoint: its log and snapshots after it are dropped."""
    snapshots.wait(live.id)
    ckpt, state = checkpoint_state(ctx, live, checkpoint)
    return _reset(ctx, live, state, seq=ckpt.seq)


def load_state(ctx: RunContext, snapshots: Snapshots, live: Live, data: Any) -> Live:
    """Replace the run's state by a torch-format one (``RemoteOptimizer.load_state_dict``), durably."""
    snapshots.wait(live.id)
    try:
        state = live.state.load_export(data)
    except optim_core.EngineError as exc:
        raise from_engine(exc) from None
    return _reset(ctx, live, state, seq=live.seq + 1)


def _reset(ctx: RunContext, live: Live, state: RunState, *, seq: int) -> Live:
    """Make ``state`` the run's whole history: one snapshot at ``seq``, no log, checkpoints kept."""
    parts, digest, facts = state.parts(), state.digest(), described(state)
    key = new_key()
    with ctx.db.write(f"replacing the state of run {live.name!r}") as repo:
        dropped = repo.clear_history(live.id)
        repo.forget_steps_from(live.id, state.t)  # the steps after it are no longer the run's
        repo.series.forget_from(live.id, state.t)  # nor their history
        size = ctx.blobs.put(repo, key, parts)
        repo.add_snapshot(live.id, seq=seq, t=state.t, digest=digest, blob_key=key, size=size)
        repo.update_run(live.id, **facts, seq=seq, last_snapshot_t=state.t, last_snapshot_at=_now(), worker_marks=None)
        ctx.blobs.delete(repo, dropped)
    ctx.blobs.drop(dropped)
    live.reset(state, seq=seq)
    return live


def fork(ctx: RunContext, live: Live, *, checkpoint: str, name: str, durability: str | None, snapshot_every: int | None) -> Run:
    """A new run that starts from the checkpoint, with the same spec; loaded when first asked for."""
    ckpt, state = checkpoint_state(ctx, live, checkpoint)
    durability = durability or live.durability
    snapshot_every = snapshot_every or live.snapshot_every
    parts, facts, key = state.parts(), described(state), new_key()
    try:
        with ctx.db.write(f"forking run {live.name!r} into {name!r}") as repo:
            run = repo.add_run(
                tenant=live.tenant,
                name=name,
                spec=state.spec.to_dict(),
                spec_digest=spec_digest(state.spec, durability, snapshot_every),
                durability=durability,
                snapshot_every=snapshot_every,
                **facts,
                seq=ckpt.seq,
                last_snapshot_t=ckpt.t,
                last_snapshot_at=_now(),
            )
            size = ctx.blobs.put(repo, key, parts)
            repo.add_snapshot(run.id, seq=ckpt.seq, t=ckpt.t, digest=ckpt.digest, blob_key=key, size=size)
            return run
    except Duplicate:
        ctx.blobs.drop([key])
        raise RunConflict(f"run {name!r} already exists") from None


def _now() -> datetime:
    return datetime.now(UTC)
