"""Live runs: the in-memory RunStates, their durable log, background snapshots and recovery.

Every public method here is synchronous and runs in a worker thread, under the run's lock (held by
the route, see ``service.routes``), so requests on one run are serialized while tensor work stays off
the event loop and other runs proceed.

Durability ("log", the default): a step is applied in memory, then its gradient payload (as received),
the new ``t`` and a checksum of the parameters are committed in one transaction, then it is
acknowledged. If the commit fails, the in-memory state (now ahead of the database) is dropped and
recovered from the database on the next request. Snapshots are copied under the run's lock (a memcpy),
once the answer of the step that made one due is sent, and written by a background thread; the log
before the newest snapshot is pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import optim_core
from optim_core import RunSpec, RunState
from optim_core.run_state import Captured, StepResult
from optim_format import FormatError, snapshot
from schemas import RunCreate

from . import payloads
from .blobs import BlobStore, new_key, read_into
from .errors import (
    CheckpointConflict,
    CheckpointNotFound,
    Invalid,
    InvalidPayload,
    RecoveryFailed,
    RunConflict,
    RunNotFound,
    ServiceError,
    StepConflict,
    StorageUnavailable,
    from_engine,
)
from .models import Checkpoint, Event, Run, Snapshot
from .settings import Settings
from .stepper import Stepper

log = logging.getLogger("optim_service")


@dataclass
class Live:
    """A run in memory. ``seq`` counts applied events (steps and epoch steps)."""

    id: int
    tenant: str
    name: str
    durability: str
    snapshot_every: int
    state: RunState
    seq: int
    last_step_digest: str | None
    last_snapshot_seq: int
    last_snapshot_t: int | None
    created_at: Any = None

    @property
    def snapshot_due(self) -> bool:
        """``snapshot_every`` events or more since the last snapshot."""
        return self.seq - self.last_snapshot_seq >= self.snapshot_every


class _Superseded(Exception):
    """A snapshot whose run was deleted or rewritten while it was being written: dropped."""


class _StepAborted(Exception):
    """The step a log write was started for was not applied: its transaction rolls back."""


@dataclass
class LogWrite:
    """An event's log record being written in the background: the blob first, then (given ``event``) the row."""

    key: str | None
    payload: bytes | memoryview | None
    event: Future[dict[str, Any]] = field(default_factory=Future)
    done: Future[None] = field(default_factory=Future)


@dataclass(frozen=True)
class StepOutcome:
    result: StepResult
    replayed: bool
    params: dict[str, torch.Tensor]


class Clock:
    """Named intervals of a request, in milliseconds (sent back as a ``Server-Timing`` header)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + (now - self._last) * 1e3
        self._last = now

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.laps.items())


def _yield_to_steps() -> None:
    """Background snapshots run at a lower CPU priority than the steps they must not slow down (on Linux a
    thread's own nice value; elsewhere setpriority would renice the whole process, so it is left alone)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


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


class _LogReader:
    """The payloads of the steps to replay, read in order by a thread of its own, ``ahead`` of the replay.

    Each is read into one of ``ahead + 1`` buffers, reused: asking for the next payload gives the previous
    one's buffer back (the step that used its gradients is done), so reading the log touches no fresh memory
    after the first few steps and no more than ``ahead + 1`` payloads are in memory at once. Each read is a
    short transaction of its own, so the database is not held for the whole replay.
    """

    def __init__(self, manager: RunManager, keys: list[str], ahead: int = 1) -> None:
        self._manager = manager
        self._keys = keys
        self._ahead = ahead
        self._buffers: list[memoryview | None] = [None] * (ahead + 1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recovery")
        self._reads = [self._pool.submit(self._read, i) for i in range(min(ahead, len(keys)))]
        self._next = 0

    def __enter__(self) -> _LogReader:
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

        with self._manager._db() as session:
            return read_into(self._manager.blobs, session, self._keys[i], alloc)

    def next(self) -> memoryview:
        """The next payload; the one returned before is not to be used any more."""
        i = self._next
        if i >= len(self._keys):
            raise RecoveryFailed("the log has more steps than payloads")
        if i + self._ahead < len(self._keys):
            self._reads.append(self._pool.submit(self._read, i + self._ahead))  # into payload i - 1's buffer
        self._next += 1
        try:
            return self._reads[i].result()
        except SQLAlchemyError as exc:
            raise self._manager._storage_failed(exc, "reading the log to replay") from exc


def _replay_step(state: RunState, grads: dict[str, torch.Tensor], t: int, loss: float | None) -> str:
    """A logged step applied again (on a stepper thread); the parameters' checksum after it. The gradients are
    views of the log reader's buffer, which is read into again only after this step: they are donated."""
    state.apply(grads, t, loss=loss, donate=True)
    return state.checksum()


def spec_digest(spec: RunSpec, durability: str, snapshot_every: int) -> str:
    canonical = json.dumps({"spec": spec.to_dict(), "durability": durability, "snapshot_every": snapshot_every}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class RunManager:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], blobs: BlobStore) -> None:
        self.settings = settings
        self.sessions = sessions
        self.blobs = blobs
        self.device = optim_core.pick_device(settings.device)
        self.stepper = Stepper(settings.steppers, settings.step_threads)
        self._live: dict[tuple[str, str], Live] = {}
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot", initializer=_yield_to_steps)
        # log writes run beside the optimizer step they record (see LogWrite)
        self._log_writers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="log")
        # kept here, not on the Live: a run evicted (and reloaded) must still wait for its snapshot in flight
        self._pending: dict[tuple[str, str], Future[None]] = {}

    def close(self) -> None:
        self._snapshots.shutdown(wait=True)
        self._log_writers.shutdown(wait=True)
        self.stepper.close()

    # ------------------------------------------------------------------ database helpers
    def _db(self) -> Session:
        return self.sessions()

    def _storage_failed(self, exc: Exception, what: str) -> StorageUnavailable:
        log.warning("storage failure while %s: %s", what, exc)
        return StorageUnavailable(
            f"the database is unavailable while {what}; nothing was acknowledged, retry: {exc.__class__.__name__}"
        )

    def _row(self, session: Session, tenant: str, name: str) -> Run:
        row = session.execute(select(Run).where(Run.tenant == tenant, Run.name == name)).scalar_one_or_none()
        if row is None:
            raise RunNotFound(f"run {name!r} does not exist")
        return row

    # ------------------------------------------------------------------ create / load
    def create(self, tenant: str, body: RunCreate, params: dict[str, torch.Tensor]) -> tuple[Live, bool]:
        """Create the run, or answer the existing one when the spec is the same. Returns (live, created)."""
        try:
            spec = RunSpec.from_dict(body.spec)
        except optim_core.EngineError as exc:
            raise from_engine(exc) from None
        snapshot_every = body.snapshot_every or self.settings.default_snapshot_every
        digest = spec_digest(spec, body.durability, snapshot_every)
        try:
            with self._db() as session:
                existing = session.execute(select(Run).where(Run.tenant == tenant, Run.name == body.name)).scalar_one_or_none()
                count = session.query(Run).filter(Run.tenant == tenant).count() if existing is None else 0
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "looking up the run") from exc
        if existing is not None:
            if existing.spec_digest != digest:
                raise RunConflict(f"run {body.name!r} exists with another spec (or durability policy); choose another name")
            return self.get(tenant, body.name), False
        if len(spec.params) > self.settings.max_tensors:
            raise Invalid(f"the run has {len(spec.params)} parameter tensors; the limit is {self.settings.max_tensors}")
        if count >= self.settings.max_runs:
            raise Invalid(f"this tenant has {count} runs, the limit is {self.settings.max_runs}")
        try:
            state = RunState(spec, params, device=self.device)
        except optim_core.EngineError as exc:
            raise from_engine(exc) from None
        parts, state_digest = state.parts(), state.digest()  # before the transaction (on a GPU, copies to the host)
        key = new_key()
        try:
            with self._db() as session, session.begin():
                run = Run(
                    tenant=tenant,
                    name=body.name,
                    spec=spec.to_dict(),
                    spec_digest=digest,
                    durability=body.durability,
                    snapshot_every=snapshot_every,
                    t=0,
                    epoch=0,
                    seq=0,
                )
                session.add(run)
                session.flush()
                size = self.blobs.put(session, key, parts)
                session.add(Snapshot(run_id=run.id, seq=0, t=0, digest=state_digest, blob_key=key, size=size))
                run_id, created_at = run.id, run.created_at
        except IntegrityError:
            # created meanwhile by a concurrent request: answer as if it had been first
            return self.create(tenant, body, params)
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "creating the run") from exc
        live = self._install(run_id, tenant, body.name, body.durability, snapshot_every, state, seq=0, created_at=created_at)
        return live, True

    def _install(
        self,
        run_id: int,
        tenant: str,
        name: str,
        durability: str,
        snapshot_every: int,
        state: RunState,
        *,
        seq: int,
        created_at: Any,
    ) -> Live:
        """A run whose newest snapshot is ``state`` at ``seq`` (just written), live from now on."""
        live = Live(
            id=run_id,
            tenant=tenant,
            name=name,
            durability=durability,
            snapshot_every=snapshot_every,
            state=state,
            seq=seq,
            last_step_digest=None,
            last_snapshot_seq=seq,
            last_snapshot_t=state.t,
            created_at=created_at,
        )
        self._live[(tenant, name)] = live
        return live

    def get(self, tenant: str, name: str) -> Live:
        """The live run, recovered from the database if it is not in memory."""
        live = self._live.get((tenant, name))
        if live is None:
            live = self._recover(tenant, name)
            self._live[(tenant, name)] = live
        return live

    def evict(self, tenant: str, name: str) -> None:
        self._live.pop((tenant, name), None)

    def _recover(self, tenant: str, name: str) -> Live:
        """Newest snapshot + replay of the log after it, checked against the recorded digests.

        The snapshot's tensors are read straight into their own memory (no copy of the whole blob in
        between); each logged payload is read by ``_LogReader`` into one of two reused buffers while the
        step before it is replayed.
        """
        # a snapshot of this run still being written would prune the log read below (the run's lock keeps
        # every other writer of its history out)
        self.wait_for_snapshot(tenant, name)
        try:
            with self._db() as session:
                row = self._row(session, tenant, name)
                snap = session.execute(
                    select(Snapshot).where(Snapshot.run_id == row.id).order_by(Snapshot.seq.desc()).limit(1)
                ).scalar_one_or_none()
                if snap is None:
                    raise RecoveryFailed(f"run {name!r} has no snapshot to recover from")
                events = (
                    session.execute(select(Event).where(Event.run_id == row.id, Event.seq > snap.seq).order_by(Event.seq))
                    .scalars()
                    .all()
                )
                last_step = session.execute(
                    select(Event.grad_digest)
                    .where(Event.run_id == row.id, Event.kind == "step")
                    .order_by(Event.seq.desc())
                    .limit(1)
                ).scalar_one_or_none()
                meta, tensors = self._read_state(session, snap.blob_key, f"run {name!r}: its snapshot at t={snap.t}")
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "recovering the run") from exc
        with _LogReader(self, [e.blob_key for e in events if e.kind == "step" and e.blob_key]) as reader:
            try:
                state = RunState.from_parts(meta, tensors, device=self.device, adopt=True)
            except optim_core.EngineError as exc:
                raise RecoveryFailed(f"run {name!r}: its snapshot at t={snap.t} cannot be loaded here: {exc}") from None
            del meta, tensors
            if not state.digest_matches(snap.digest):
                raise RecoveryFailed(f"run {name!r}: the snapshot at t={snap.t} does not match its recorded digest")
            seq = snap.seq
            for ev in events:
                if ev.seq != seq + 1:
                    raise RecoveryFailed(f"run {name!r}: the log jumps from event {seq} to {ev.seq}")
                if ev.kind == "step" and not ev.blob_key:
                    raise RecoveryFailed(f"run {name!r}: event {ev.seq} (t={ev.t}) is a step without its gradient")
                try:
                    if ev.kind == "step":
                        # views of the reader's buffer, which is not read into again before the step is done
                        grads, _ = payloads.decode(reader.next())
                        checksum = self.stepper.run(_replay_step, state, grads, ev.t, ev.value)
                        del grads
                    else:
                        state.step_epoch(metric=ev.value)
                        checksum = state.checksum()
                except (optim_core.EngineError, optim_core.StepFailed, ServiceError) as exc:
                    if isinstance(exc, StorageUnavailable):
                        raise
                    raise RecoveryFailed(f"run {name!r}: replaying event {ev.seq} (t={ev.t}) failed: {exc}") from None
                if checksum != ev.checksum:
                    raise RecoveryFailed(
                        f"run {name!r}: replaying event {ev.seq} (t={ev.t}) does not reproduce the recorded parameters; "
                        "refusing to resume a diverged state"
                    )
                seq = ev.seq
        if row.durability == "log" and (seq != row.seq or state.t != row.t):
            raise RecoveryFailed(f"run {name!r}: the log ends at t={state.t} but the run says t={row.t}")
        log.info("recovered run %r at t=%d (snapshot t=%d + %d events)", name, state.t, snap.t, len(events))
        return Live(
            id=row.id,
            tenant=tenant,
            name=name,
            durability=row.durability,
            snapshot_every=row.snapshot_every,
            state=state,
            seq=seq,
            last_step_digest=last_step,
            last_snapshot_seq=snap.seq,
            last_snapshot_t=snap.t,
            created_at=row.created_at,
        )

    # ------------------------------------------------------------------ the hot path
    def step(
        self,
        live: Live,
        *,
        t: int,
        payload: bytes | memoryview,
        content_type: str,
        loss: float | None,
        digest: str | None = None,
        clock: Clock | None = None,
    ) -> StepOutcome:
        """Apply a step's payload. ``digest``, when given, is ``payloads.digest(payload)`` of a binary payload,
        computed as it arrived (a JSON payload's digest is that of its safetensors encoding)."""
        state = live.state
        clock = clock or Clock()
        if content_type == "json":
            try:
                body = json.loads(bytes(payload))  # a JSON body is read as bytes: no copy
            except (ValueError, RecursionError) as exc:
                raise InvalidPayload(f"the body is not JSON: {exc}") from None
            if not isinstance(body, dict) or "grads" not in body:
                raise Invalid('a JSON step body is {"grads": {name: nested lists}, "loss": optional number}')
            if loss is None and body.get("loss") is not None:
                loss = body["loss"]
            grads = payloads.from_json_lists(body["grads"], state.params(), "grads")
            payload = payloads.encode(grads)
            digest = None
        else:
            grads, _ = payloads.decode(payload)
        gdigest = digest or payloads.digest(payload)
        clock.lap("decode")
        if t == state.t - 1 and live.last_step_digest is not None:
            if gdigest == live.last_step_digest:
                return StepOutcome(StepResult(t=state.t, lrs=state.lrs), replayed=True, params=state.params())
            raise StepConflict(
                f"step t={t} was already applied with a different gradient; the run is at t={state.t}",
                current_t=state.t,
                reason="other_gradient",
            )
        if t != state.t:
            what = "stale: resync from GET /runs/{run}/params" if t < state.t else "ahead of the run"
            raise StepConflict(
                f"gradient is for t={t} but the run is at t={state.t} ({what})",
                current_t=state.t,
                reason="stale" if t < state.t else "ahead",
            )
        # the gradient goes to the log while the optimizer steps: the payload is not the tensors the optimizer
        # is given (those are decoded copies), so both proceed at once and the answer waits for both. A run that
        # logs nothing gives the optimizer the body's own (writable) memory: the aligned gradients are not copied.
        writer = self._begin_log(live, payload)
        donate = writer is None and (content_type == "json" or (isinstance(payload, memoryview) and not payload.readonly))
        try:
            result = self.stepper.run(state.apply, grads, t, loss=loss, donate=donate)
        except optim_core.StepFailed as exc:
            self._abort_log(writer)
            self.evict(live.tenant, live.name)  # reloaded from the durable state on the next request
            raise Invalid(f"the optimizer failed on this gradient and nothing was applied: {exc}") from None
        except optim_core.EngineError as exc:
            self._abort_log(writer)
            raise from_engine(exc) from None
        except BaseException:
            self._abort_log(writer)
            raise
        clock.lap("step")
        self._commit_event(live, writer, kind="step", t=t, value=loss, grad_digest=gdigest)
        clock.lap("log")  # what the log write adds after the step (it ran beside it)
        live.last_step_digest = gdigest
        if live.durability == "snapshot":
            self._maybe_snapshot(live)  # its durability: taken before the answer (a log run's comes after it: maybe_snapshot)
        return StepOutcome(result, replayed=False, params=state.params())

    def step_epoch(self, live: Live, *, metric: float | None) -> StepResult:
        try:
            result = live.state.step_epoch(metric=metric)
        except optim_core.StepFailed as exc:
            self.evict(live.tenant, live.name)
            raise Invalid(f"the epoch step failed and nothing was applied: {exc}") from None
        except optim_core.EngineError as exc:
            raise from_engine(exc) from None
        self._commit_event(live, self._begin_log(live, None), kind="epoch", t=live.state.t, value=metric, grad_digest=None)
        return result

    def _begin_log(self, live: Live, payload: bytes | memoryview | None) -> LogWrite | None:
        """Start writing the event's log record: its payload's blob first, the row once ``_commit_event`` gives it."""
        if live.durability != "log":
            return None
        writer = LogWrite(key=new_key() if payload is not None else None, payload=payload)
        writer.done = self._log_writers.submit(self._write_log, live, writer)
        return writer

    def _write_log(self, live: Live, writer: LogWrite) -> None:
        with self._db() as session, session.begin():
            if writer.key is not None and writer.payload is not None:
                self.blobs.put(session, writer.key, [writer.payload])
            event = writer.event.result()  # what the step produced, or the step failed and this rolls back
            session.add(Event(run_id=live.id, **event["event"]))
            session.execute(update(Run).where(Run.id == live.id).values(**event["run"]))

    def _abort_log(self, writer: LogWrite | None) -> None:
        if writer is None:
            return
        writer.event.set_exception(_StepAborted())
        try:
            writer.done.result()
        except _StepAborted:
            pass
        except (SQLAlchemyError, StorageUnavailable) as exc:
            log.warning("discarding the log write of a step that was not applied: %s", exc)
        if writer.key is not None:
            self.blobs.drop([writer.key])

    def _commit_event(
        self, live: Live, writer: LogWrite | None, *, kind: str, t: int, value: float | None, grad_digest: str | None
    ) -> None:
        state = live.state
        if writer is not None:
            event = {
                "seq": live.seq + 1,
                "kind": kind,
                "t": t,
                "value": value,
                "grad_digest": grad_digest,
                "checksum": self.stepper.run(state.checksum),
                "blob_key": writer.key,
            }
            writer.event.set_result({"event": event, "run": {"t": state.t, "epoch": state.epoch, "seq": live.seq + 1}})
            try:
                writer.done.result()
            except (SQLAlchemyError, StorageUnavailable) as exc:
                # the state in memory is ahead of the database: drop it, recover on the next request
                self.evict(live.tenant, live.name)
                if writer.key is not None:
                    self.blobs.drop([writer.key])
                if isinstance(exc, StorageUnavailable):
                    raise
                raise self._storage_failed(exc, f"logging step t={t}") from exc
        live.seq += 1

    # ------------------------------------------------------------------ snapshots
    def wait_for_snapshot(self, tenant: str, name: str) -> None:
        """Let a background snapshot land before the run's history is rewritten (rollback, load, delete)."""
        pending = self._pending.get((tenant, name))
        if pending is not None:
            pending.result()

    def snapshot_due(self, tenant: str, name: str) -> bool:
        """Whether the live run logs its steps and has gone ``snapshot_every`` events past its last snapshot (a
        cheap read, without the run's lock)."""
        live = self._live.get((tenant, name))
        if live is None or live.durability != "log" or not live.snapshot_due:
            return False
        pending = self._pending.get((tenant, name))
        return pending is None or pending.done()  # one at a time: the step after it lands asks again

    def maybe_snapshot(self, tenant: str, name: str) -> None:
        """Start the background snapshot of a run that logs its steps if one is due, under the run's lock.

        Called once the answer of the step that made it due has been sent (``routes.runs.step``), not before:
        the capture (a memcpy of the whole state, ~9 ms for 120 MB on the CPU; on a GPU a copy to the host)
        then overlaps the worker's next step (its forward and backward, then its body on the way here) instead
        of delaying this answer. Its log holds every step meanwhile. A snapshot-only run, whose snapshots are
        its durability, takes them in the step, before the answer."""
        live = self._live.get((tenant, name))
        if live is not None:
            self._maybe_snapshot(live)

    def _maybe_snapshot(self, live: Live) -> None:
        if not live.snapshot_due:
            return
        pending = self._pending.get((live.tenant, live.name))
        if pending is not None and not pending.done():
            if live.durability == "log":
                return  # one at a time; the log holds every step meanwhile, and the next step tries again
            # a snapshot-only run promises to lose at most `snapshot_every` steps: the step waits for the one in
            # flight rather than leave this one to a next step that a preempted worker may never send
            with contextlib.suppress(Exception):  # a failed snapshot was logged by _write_snapshot
                pending.result()
            if not live.snapshot_due:
                return
        try:
            captured = live.state.capture()
        except Exception:
            log.exception("capturing run %r at t=%d failed", live.name, live.state.t)
            return
        self._pending[(live.tenant, live.name)] = self._snapshots.submit(self._write_snapshot, live, captured, live.seq)

    def _write_snapshot(self, live: Live, captured: Captured, seq: int) -> None:
        try:
            self.write_snapshot(live, captured, seq)
        except Exception:
            log.exception("snapshot of run %r at t=%d failed", live.name, captured.t)

    def write_snapshot(self, live: Live, captured: Captured, seq: int) -> None:
        digest = captured.digest()
        key = new_key()
        # the blob first, outside the transaction: the steps' log writes go on while 100s of MB are written
        size = self.blobs.put_staged(self.sessions, key, captured.parts())
        try:
            with self._db() as session, session.begin():
                row = session.get(Run, live.id)
                if row is None or (live.durability == "log" and row.seq < seq):
                    raise _Superseded  # deleted, or its history rewritten meanwhile: this state is no longer the run's
                dropped = self._record_snapshot(session, live, captured, seq, digest, key, size)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.blobs.discard(self.sessions, key)
            if isinstance(exc, _Superseded):
                return
            raise
        self.blobs.drop(dropped)
        live.last_snapshot_seq, live.last_snapshot_t = seq, captured.t

    def _record_snapshot(
        self, session: Session, live: Live, captured: Captured, seq: int, digest: str, key: str, size: int
    ) -> list[str]:
        """The snapshot's row, and the log and snapshots before it pruned; the blobs to drop once committed."""
        session.add(Snapshot(run_id=live.id, seq=seq, t=captured.t, digest=digest, blob_key=key, size=size))
        old = session.execute(select(Snapshot).where(Snapshot.run_id == live.id, Snapshot.seq < seq)).scalars().all()
        # the event at `seq` stays: it holds the digest a retry of the last step is checked against
        pruned = (
            session.execute(select(Event.blob_key).where(Event.run_id == live.id, Event.seq < seq, Event.blob_key.is_not(None)))
            .scalars()
            .all()
        )
        session.execute(delete(Event).where(Event.run_id == live.id, Event.seq < seq))
        for s in old:
            session.delete(s)
        dropped = [*pruned, *(s.blob_key for s in old)]
        self.blobs.delete(session, dropped)
        if live.durability == "snapshot":
            session.execute(update(Run).where(Run.id == live.id).values(t=captured.t, epoch=captured.epoch, seq=seq))
        return dropped

    def flush_all(self) -> None:
        """At shutdown: snapshot-only runs write what they have, so a clean stop loses nothing."""
        for live in list(self._live.values()):
            self.wait_for_snapshot(live.tenant, live.name)
            if live.durability == "snapshot" and live.seq > live.last_snapshot_seq:
                self.write_snapshot(live, live.state.capture(), live.seq)

    # ------------------------------------------------------------------ runs
    def list_runs(self, tenant: str) -> list[Run]:
        try:
            with self._db() as session:
                return list(session.execute(select(Run).where(Run.tenant == tenant).order_by(Run.id)).scalars())
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "listing runs") from exc

    def delete(self, tenant: str, name: str) -> None:
        self.wait_for_snapshot(tenant, name)
        try:
            with self._db() as session, session.begin():
                row = self._row(session, tenant, name)
                keys = self._blob_keys_of(session, row.id)
                session.delete(row)
                session.flush()
                self.blobs.delete(session, keys)
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "deleting the run") from exc
        self.evict(tenant, name)
        self.blobs.drop(keys)

    def _blob_keys_of(self, session: Session, run_id: int) -> list[str]:
        keys = list(session.execute(select(Event.blob_key).where(Event.run_id == run_id, Event.blob_key.is_not(None))).scalars())
        keys += session.execute(select(Snapshot.blob_key).where(Snapshot.run_id == run_id)).scalars().all()
        keys += session.execute(select(Checkpoint.blob_key).where(Checkpoint.run_id == run_id)).scalars().all()
        return [k for k in keys if k]

    # ------------------------------------------------------------------ checkpoints
    def create_checkpoint(self, live: Live, name: str) -> Checkpoint:
        # written here, under the run's lock, from the live state's memory: a copy (capture) is for background
        # writes; a snapshot in flight lands first, so that no capture of the state is in memory beside this
        self.wait_for_snapshot(live.tenant, live.name)
        parts, digest = live.state.parts(), live.state.digest()
        key = new_key()
        try:
            with self._db() as session, session.begin():
                size = self.blobs.put(session, key, parts)
                ckpt = Checkpoint(
                    run_id=live.id,
                    name=name,
                    seq=live.seq,
                    t=live.state.t,
                    epoch=live.state.epoch,
                    digest=digest,
                    blob_key=key,
                    size=size,
                )
                session.add(ckpt)
                session.flush()
        except IntegrityError:
            self.blobs.drop([key])
            raise CheckpointConflict(f"run {live.name!r} already has a checkpoint {name!r}") from None
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "writing the checkpoint") from exc
        return ckpt

    def list_checkpoints(self, live: Live) -> list[Checkpoint]:
        with self._db() as session:
            return list(session.execute(select(Checkpoint).where(Checkpoint.run_id == live.id).order_by(Checkpoint.id)).scalars())

    def _checkpoint(self, session: Session, live: Live, name: str) -> Checkpoint:
        ckpt = session.execute(
            select(Checkpoint).where(Checkpoint.run_id == live.id, Checkpoint.name == name)
        ).scalar_one_or_none()
        if ckpt is None:
            raise CheckpointNotFound(f"run {live.name!r} has no checkpoint {name!r}")
        return ckpt

    def checkpoint_state(self, live: Live, name: str) -> tuple[Checkpoint, RunState]:
        with self._db() as session:
            ckpt = self._checkpoint(session, live, name)
            meta, tensors = self._read_state(session, ckpt.blob_key, f"checkpoint {name!r}")
        try:
            return ckpt, RunState.from_parts(meta, tensors, device=self.device, adopt=True)
        except optim_core.EngineError as exc:
            raise RecoveryFailed(f"checkpoint {name!r} cannot be loaded here: {exc}") from None

    def _read_state(self, session: Session, key: str, what: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """A state's blob (snapshot or checkpoint), streamed into tensors of its own (``optim_format.snapshot.read``): no copy of
        the whole blob in between, and memory aligned as torch allocates it."""
        with self.blobs.reader(session, key) as blob:
            try:
                return snapshot.read(blob.size, blob.readinto)
            except FormatError as exc:
                raise RecoveryFailed(f"{what} cannot be loaded here: {exc}") from None

    def delete_checkpoint(self, live: Live, name: str) -> None:
        with self._db() as session, session.begin():
            ckpt = self._checkpoint(session, live, name)
            key = ckpt.blob_key
            session.delete(ckpt)
            self.blobs.delete(session, [key])
        self.blobs.drop([key])

    def rollback(self, live: Live, checkpoint: str) -> Live:
        """The run goes back to the checkpoint: its log and snapshots after it are dropped."""
        self.wait_for_snapshot(live.tenant, live.name)
        ckpt, state = self.checkpoint_state(live, checkpoint)
        return self._reset(live, state, seq=ckpt.seq)

    def load_state(self, live: Live, data: Any) -> Live:
        """Replace the run's state by a torch-format one (``RemoteOptimizer.load_state_dict``), durably."""
        self.wait_for_snapshot(live.tenant, live.name)
        try:
            state = live.state.load_export(data)
        except optim_core.EngineError as exc:
            raise from_engine(exc) from None
        return self._reset(live, state, seq=live.seq + 1)

    def _reset(self, live: Live, state: RunState, *, seq: int) -> Live:
        """Make ``state`` the run's whole history: one snapshot at ``seq``, no log, checkpoints kept."""
        parts, digest = state.parts(), state.digest()
        key = new_key()
        try:
            with self._db() as session, session.begin():
                dropped = [k for k in self._blob_keys_of(session, live.id) if k not in self._checkpoint_keys(session, live.id)]
                session.execute(delete(Event).where(Event.run_id == live.id))
                session.execute(delete(Snapshot).where(Snapshot.run_id == live.id))
                size = self.blobs.put(session, key, parts)
                session.add(Snapshot(run_id=live.id, seq=seq, t=state.t, digest=digest, blob_key=key, size=size))
                session.execute(update(Run).where(Run.id == live.id).values(t=state.t, epoch=state.epoch, seq=seq))
                self.blobs.delete(session, dropped)
        except SQLAlchemyError as exc:
            raise self._storage_failed(exc, "replacing the run's state") from exc
        self.blobs.drop(dropped)
        return self._install(
            live.id, live.tenant, live.name, live.durability, live.snapshot_every, state, seq=seq, created_at=live.created_at
        )

    def _checkpoint_keys(self, session: Session, run_id: int) -> set[str]:
        return set(session.execute(select(Checkpoint.blob_key).where(Checkpoint.run_id == run_id)).scalars())

    def fork(self, live: Live, *, checkpoint: str, name: str, durability: str | None, snapshot_every: int | None) -> Live:
        """A new run that starts from the checkpoint, with the same spec."""
        ckpt, state = self.checkpoint_state(live, checkpoint)
        durability = durability or live.durability
        snapshot_every = snapshot_every or live.snapshot_every
        parts, key = state.parts(), new_key()
        try:
            with self._db() as session, session.begin():
                run = Run(
                    tenant=live.tenant,
                    name=name,
                    spec=state.spec.to_dict(),
                    spec_digest=spec_digest(state.spec, durability, snapshot_every),
                    durability=durability,
                    snapshot_every=snapshot_every,
                    t=ckpt.t,
                    epoch=ckpt.epoch,
                    seq=ckpt.seq,
                )
                session.add(run)
                session.flush()
                size = self.blobs.put(session, key, parts)
                session.add(Snapshot(run_id=run.id, seq=ckpt.seq, t=ckpt.t, digest=ckpt.digest, blob_key=key, size=size))
                run_id, created_at = run.id, run.created_at
        except IntegrityError:
            self.blobs.drop([key])
            raise RunConflict(f"run {name!r} already exists") from None
        return self._install(run_id, live.tenant, name, durability, snapshot_every, state, seq=ckpt.seq, created_at=created_at)

    # ------------------------------------------------------------------ maintenance
    def collect_garbage(self) -> int:
        with self._db() as session, session.begin():
            return self.blobs.collect(session)
