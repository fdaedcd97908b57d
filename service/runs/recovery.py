"""Recovery: a run's state from the database, bitwise the state it had when its last event was acknowledged.

The newest snapshot (checked against its recorded digest), then every logged event after it replayed in order,
each checked against the checksum of the parameters recorded with it: a log that does not reproduce is refused
loudly (``RecoveryFailed``), never resumed. The snapshot's tensors are read straight into memory of their own
(``optim_format.snapshot.read``) and become the run's parameters; each logged payload is read by ``LogReader``
into one of two reused buffers, on a thread of its own, while the step before it is replayed.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

import optim_core
from optim_core import RunState
from optim_core.closure import ClosureStep, Done
from optim_format import FormatError, snapshot

from .. import payloads
from ..errors import RecoveryFailed, RunNotFound, ServiceError, StorageUnavailable
from ..storage import BlobStore, Database, Repository
from ..storage.blobs import read_into
from .live import Live, RunContext
from .snapshots import Snapshots

log = logging.getLogger("optim_service")


def recover(ctx: RunContext, snapshots: Snapshots, tenant: str, name: str) -> Live:
    began = time.perf_counter()
    with ctx.db.read(f"looking up run {name!r}") as repo:
        row = repo.run(tenant, name)
        if row is None:
            raise RunNotFound(f"run {name!r} does not exist")
    # a snapshot of this run still being written would prune the log read below (the run's lock keeps every
    # other writer of its history out)
    snapshots.wait(row.id)
    with ctx.db.read(f"recovering run {name!r}") as repo:
        snap = repo.newest_snapshot(row.id)
        if snap is None:
            raise RecoveryFailed(f"run {name!r} has no snapshot to recover from")
        events = repo.events_after(row.id, snap.seq)
        last_applied = repo.last_gradient(row.id)
        meta, tensors = read_state(ctx.blobs, repo, snap.blob_key, f"run {name!r}: its snapshot at t={snap.t}")
    with LogReader(ctx.db, ctx.blobs, [e.blob_key for e in events if e.kind in ("step", "eval") and e.blob_key]) as reader:
        try:
            state = RunState.from_parts(meta, tensors, device=ctx.device, adopt=True)
        except optim_core.EngineError as exc:
            raise RecoveryFailed(f"run {name!r}: its snapshot at t={snap.t} cannot be loaded here: {exc}") from None
        del meta, tensors
        if not state.digest_matches(snap.digest):
            raise RecoveryFailed(f"run {name!r}: the snapshot at t={snap.t} does not match its recorded digest")
        seq = snap.seq
        loaded = time.perf_counter()
        closure: ClosureStep | None = None  # a closure step being replayed, evaluation by evaluation
        for ev in events:
            if ev.seq != seq + 1:
                raise RecoveryFailed(f"run {name!r}: the log jumps from event {seq} to {ev.seq}")
            if ev.kind in ("step", "eval") and not ev.blob_key:
                raise RecoveryFailed(f"run {name!r}: event {ev.seq} (t={ev.t}) is a {ev.kind} without its gradient")
            try:
                if ev.kind == "step":
                    # views of the reader's buffer, which is not read into again before the step is done
                    grads, hessians = payloads.decode_gradients(reader.next(), state.spec.shapes())
                    checksum = ctx.stepper.run(_replay_step, state, grads, hessians, ev.t, ev.value)
                    del grads, hessians
                elif ev.kind == "eval":
                    if ev.k is None or ev.value is None:
                        raise RecoveryFailed(f"run {name!r}: event {ev.seq} (t={ev.t}) is an evaluation without its k or loss")
                    grads, _ = payloads.decode_gradients(reader.next(), state.spec.shapes())
                    if closure is None:
                        closure = ctx.stepper.run(state.begin_closure_step, ev.t)
                    # copied, not donated: torch's step may hold them past the reader's reuse of the buffer
                    if isinstance(ctx.stepper.run(closure.provide, ev.k, ev.value, grads), Done):
                        closure = None
                    checksum = state.checksum()
                    del grads
                else:
                    state.step_epoch(metric=ev.value)
                    checksum = state.checksum()
            except (optim_core.EngineError, optim_core.StepFailed, ServiceError) as exc:
                if closure is not None:
                    closure.abandon()
                if isinstance(exc, StorageUnavailable):
                    raise
                raise RecoveryFailed(f"run {name!r}: replaying event {ev.seq} (t={ev.t}) failed: {exc}") from None
            if checksum != ev.checksum:
                if closure is not None:
                    closure.abandon()
                raise RecoveryFailed(
                    f"run {name!r}: replaying event {ev.seq} (t={ev.t}) does not reproduce the recorded parameters; "
                    "refusing to resume a diverged state"
                )
            seq = ev.seq
    if row.durability == "log" and (seq != row.seq or state.t != row.t):
        raise RecoveryFailed(f"run {name!r}: the log ends at t={state.t} but the run says t={row.t}")
    seconds, read = time.perf_counter() - began, snap.size + reader.bytes_read
    ctx.metrics.recovery_seconds.observe(seconds)
    ctx.metrics.recovery_bytes.inc(read)
    ctx.metrics.recovered_events.inc(len(events))
    fields = {"event": "recovery", "run": name, "t": state.t, "snapshot_t": snap.t, "replayed": len(events), "bytes": read}
    log.info(
        "recovered run %r at t=%d (snapshot t=%d + %d events) in %.2f s",
        name,
        state.t,
        snap.t,
        len(events),
        seconds,
        extra={**fields, "ms": round(seconds * 1e3, 1)},
    )
    live = Live(
        id=row.id,
        tenant=tenant,
        name=name,
        durability=row.durability,
        snapshot_every=row.snapshot_every,
        state=state,
        seq=seq,
        last_applied=last_applied,
        closure=closure,
        last_snapshot_seq=snap.seq,
        last_snapshot_t=snap.t,
        rejected_steps=row.rejected_steps,
        marks={int(rank): (int(t), str(digest)) for rank, (t, digest) in (row.worker_marks or {}).items()},
        recovery_target_s=ctx.settings.recovery_target_s,
        load_s=loaded - began,
        replay_s=(time.perf_counter() - loaded) / len(events) if events else 0.0,
    )
    live.measure()
    return live


def read_state(blobs: BlobStore, repo: Repository, key: str, what: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """A state's blob (snapshot or checkpoint), streamed into tensors of its own (``optim_format.snapshot.read``):
    no copy of the whole blob in between, and memory aligned as torch allocates it."""
    with blobs.reader(repo, key) as blob:
        try:
            return snapshot.read(blob.size, blob.readinto)
        except FormatError as exc:
            raise RecoveryFailed(f"{what} cannot be loaded here: {exc}") from None


def _replay_step(
    state: RunState, grads: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], t: int, loss: float | None
) -> str:
    """A logged step applied again (on a stepper thread); the parameters' checksum after it. The gradients are
    views of the log reader's buffer, which is read into again only after this step: they are donated."""
    takes_hessians = "hessian" in state.entry.needs or hessians
    state.apply(grads, t, loss=loss, donate=True, hessians=hessians if takes_hessians else None)
    return state.checksum()


def _fresh_buffer(size: int) -> memoryview:
    """A buffer for the payloads replayed: anonymous pages of its own (huge pages where the kernel gives
    them on request: a fresh 4 KiB page costs a fault, and a 40 MB payload is 10,000 of them)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        return memoryview(bytearray(size))
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(buf)[:size]


class LogReader:
    """The payloads of the steps to replay, read in order by a thread of its own, ``ahead`` of the replay.

    Each is read into one of ``ahead + 1`` buffers, reused: asking for the next payload gives the previous
    one's buffer back (the step that used its gradients is done), so reading the log touches no fresh memory
    after the first few steps and no more than ``ahead + 1`` payloads are in memory at once. Each read is a
    short read transaction of its own, so the database is not held for the whole replay.
    """

    def __init__(self, db: Database, blobs: BlobStore, keys: list[str], ahead: int = 1) -> None:
        self._db, self._blobs = db, blobs
        self._keys = keys
        self._ahead = ahead
        self._buffers: list[memoryview | None] = [None] * (ahead + 1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recovery")
        self._reads = [self._pool.submit(self._read, i) for i in range(min(ahead, len(keys)))]
        self._next = 0
        self.bytes_read = 0

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, i: int) -> memoryview:
        slot = i % len(self._buffers)

        def alloc(size: int) -> memoryview:
            buf = self._buffers[slot]
            if buf is None or len(buf) < size:
                buf = self._buffers[slot] = _fresh_buffer(size)
            return buf[:size]

        with self._db.read("reading the log to replay") as repo:
            return read_into(self._blobs, repo, self._keys[i], alloc)

    def next(self) -> memoryview:
        """The next payload; the one returned before is not to be used any more."""
        i = self._next
        if i >= len(self._keys):
            raise RecoveryFailed("the log has more steps than payloads")
        if i + self._ahead < len(self._keys):
            self._reads.append(self._pool.submit(self._read, i + self._ahead))  # into payload i - 1's buffer
        self._next += 1
        payload = self._reads[i].result()
        self.bytes_read += payload.nbytes
        return payload
