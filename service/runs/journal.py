"""The step log of a run that logs its steps (durability "log", the default): every acknowledged event (a step
with its gradient payload as received, an epoch step) is durable before its answer.

An event is a step (its gradient payload as received), an evaluation ``k`` of a closure step (LBFGS: each is
logged before the step goes on with it) or an epoch step. Its record is written in two parts, and the optimizer
step runs beside the first:
1. ``begin``: the payload's blob, on a log writer thread, staged ahead of the row that will name it (files are
   fsync'd; database rows are committed in short transactions of their own), so no database lock is held while
   the optimizer steps. With blobs in files, a step's body is already on its way: the route opens its file before
   the body arrives and the log writer writes each piece as it comes (``stream``, ``Inflow``,
   ``storage.streams``), so the disk works while the network does and the optimizer takes the body's memory as its
   gradients (no copy); a request that applies nothing cancels it;
2. ``commit``: once the step is done, one short write transaction: the event's row (its checksum of the new
   parameters, the gradient's digest) and the run's position and description in its ``run`` row.
A crash between the two leaves a blob that nothing names, which the blob store collects at start-up; a step
the optimizer refused discards its blob (``abort``). If the commit fails, the state in memory is ahead of the
database: the run is marked stale (the registry drops it; the next request recovers it) and the answer is 503.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import StorageUnavailable
from ..storage import new_key
from ..storage.blobs import DirectoryBlobStore
from ..storage.streams import BlobStream
from .live import Live, RunContext

log = logging.getLogger("optim_service")


@dataclass
class LogWrite:
    """An event's record being written: its payload's blob (if any) on a log writer thread."""

    key: str | None
    blob: Future[int] | None
    started: float = field(default_factory=time.perf_counter)  # replaying the event costs about what this took
    # a payload streamed in as it arrived (``Inflow``): every byte is in the kernel's hands, so the optimizer may
    # take the body's memory as its gradients
    written: Future[None] | None = None


class Inflow:
    """A step's payload going to the log while its body arrives (``storage.streams``): the step takes it as its log
    write (``take``); a request that applies nothing leaves it, and it is cancelled (``release``)."""

    def __init__(self, stream: BlobStream) -> None:
        self.stream = stream
        self._taken = False

    def take(self) -> LogWrite:
        self._taken = True
        return LogWrite(key=self.stream.key, blob=self.stream.durable, written=self.stream.written)

    def release(self) -> None:
        """The request is over: the payload is dropped unless a step took it (non-blocking)."""
        if not self._taken:
            self.stream.cancel()


def stream(ctx: RunContext, live: Live | None, size: int) -> Inflow | None:
    """The log write of a step body of ``size`` bytes, started before it arrives; None where it cannot be: the run is
    not in memory (its first request after a start), logs nothing, gathers its ranks' gradients into one step (the
    log holds them as parts), the blobs are in the database, or the body is empty."""
    if live is None or live.durability != "log" or size == 0 or not isinstance(ctx.blobs, DirectoryBlobStore):
        return None
    workers = live.state.spec.workers
    if workers is not None and workers.mode == "sync":
        return None
    return Inflow(ctx.blobs.open_stream(new_key(), size, ctx.log_writers))


def begin(
    ctx: RunContext, live: Live, payload: bytes | memoryview | list[memoryview] | None, inflow: Inflow | None = None
) -> LogWrite | None:
    """Start writing the record of the event about to be applied (its payload: a body, or the parts of one; or the
    body's ``inflow``, already on its way); None for a run that logs nothing."""
    if inflow is not None:
        return inflow.take()
    if live.durability != "log":
        return None
    if payload is None:
        return LogWrite(key=None, blob=None)
    key = new_key()
    parts = payload if isinstance(payload, list) else [payload]
    return LogWrite(key=key, blob=ctx.log_writers.submit(ctx.blobs.put_staged, ctx.db, key, parts))


def abort(ctx: RunContext, writer: LogWrite | None) -> None:
    """The event was not applied: its blob goes."""
    if writer is None or writer.key is None or writer.blob is None:
        return
    try:
        writer.blob.result()
    except StorageUnavailable as exc:
        log.warning("discarding the log write of a step that was not applied: %s", exc)
    try:
        ctx.blobs.discard(ctx.db, writer.key)
    except StorageUnavailable as exc:  # it is garbage to the next start-up's collection
        log.warning("could not discard blob %s: %s", writer.key, exc)


def commit(
    ctx: RunContext,
    live: Live,
    writer: LogWrite | None,
    *,
    kind: str,
    t: int,
    value: float | None,
    grad_digest: str | None,
    k: int | None = None,
    record: dict[str, Any] | None = None,
    marks: dict[int, tuple[int, str]] | None = None,
    history: list[tuple[str, float | None]] | None = None,
) -> None:
    """Make the event just applied durable (a run that logs its steps), and count it. ``record``: the applied
    step's contributors (``storage.models.StepRecord``); ``marks``: the ranks' last applied gradients;
    ``history``: the applied step's values by name (``series.sample``), written with its record, or by a
    snapshot-only run with its next snapshot."""
    rows = [(t, name, value) for name, value in history or ()]
    if writer is None and rows and live.durability == "snapshot":
        live.unwritten_history.extend(rows)
    if writer is not None:
        state = live.state
        event = {
            "seq": live.seq + 1,
            "kind": kind,
            "t": t,
            "k": k,
            "value": value,
            "grad_digest": grad_digest,
            "checksum": ctx.stepper.run(state.checksum),
            "blob_key": writer.key,
        }
        try:
            if writer.blob is not None:
                writer.blob.result()
            with ctx.db.write(f"logging the {kind} at t={t}") as repo:
                repo.add_event(live.id, **event)
                if record is not None:
                    repo.add_step_record(live.id, t=t, applied_at=datetime.now(UTC), **record)
                repo.series.add(live.id, rows)
                extra = {"worker_marks": _marks_json({**live.marks, **marks})} if marks else {}
                repo.update_run(
                    live.id,
                    t=state.t,
                    epoch=state.epoch,
                    seq=live.seq + 1,
                    lrs=state.lrs,
                    skipped_steps=state.skipped_steps,
                    rejected_steps=live.rejected_steps,
                    state_bytes=live.measure(),
                    **extra,
                )
        except StorageUnavailable:
            live.stale = f"its {kind} at t={t} was applied in memory but could not be logged"
            abort(ctx, writer)
            raise
        live.note_replay_cost(time.perf_counter() - writer.started)
    live.seq += 1
    if record is not None:  # a step was applied (a closure step's last evaluation included)
        live.pace.tick()


def _marks_json(marks: dict[int, tuple[int, str]]) -> dict[str, list[Any]]:
    return {str(rank): [t, digest] for rank, (t, digest) in marks.items()}
