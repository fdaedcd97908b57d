"""Snapshots: the full state at some event, the base recovery replays the log onto.

A run that logs its steps takes one every ``snapshot_every`` events, once the answer of the step that made it due
is sent (``start``, called under the run's read hold): the capture (a memcpy of the whole state, ~9 ms for
120 MB on the CPU; on a GPU a copy to the host) then overlaps the worker's next forward and backward instead of
delaying the answer, and a thread of its own, at a lower CPU priority, writes it. A snapshot-only run, whose
snapshots are its durability, takes them in the step, before the answer (``take_if_due``).

Publishing a snapshot (one write transaction) records it, prunes the log and the snapshots before it, and
writes the run's description (last snapshot, state bytes, groups); a snapshot whose run was deleted or rewritten
meanwhile is dropped. At most one snapshot of a run is in flight; whoever rewrites a run's history (rollback,
load, delete, recovery) waits for it first (``wait``).

A run on the CPU whose blobs are files needs no copy: the capture writes the state's own tensors into the
snapshot's file under the hold (page cache speed: the next step of the run waits for it, nothing else), and the
writer thread syncs and publishes it. Elsewhere (database blobs, a GPU's state copied to the host), a capture is a
copy of the whole state waiting for the one writer thread: at most ``IN_FLIGHT`` of them exist at
once, whatever the number of runs, so that many runs coming due together do not queue a copy each (measured:
ten 48 MB runs due in the same round queued 480 MB of copies). A run that logs its steps, finding no room, is
captured at a later step (its log holds every step meanwhile); a snapshot-only run waits for room.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from optim_core.run_state import Captured

from ..storage import new_key
from ..storage.blobs import DirectoryBlobStore
from .live import POSITION, Live, RunContext, described

log = logging.getLogger("optim_service")
IN_FLIGHT = 2  # captured states in memory at once, being written or waiting for the writer


class _Superseded(Exception):
    """A snapshot whose run was deleted or rewritten while it was being written: dropped."""


def _yield_to_steps() -> None:
    """Background snapshots run at a lower CPU priority than the steps they must not slow down (on Linux a
    thread's own nice value; elsewhere setpriority would renice the whole process, so it is left alone)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Snapshots:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot", initializer=_yield_to_steps)
        # by run id, not on the Live: a run dropped from memory (and loaded again) must still wait for its snapshot
        self._pending: dict[int, Future[None]] = {}
        self._room = threading.BoundedSemaphore(IN_FLIGHT)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # ------------------------------------------------------------------ when
    def in_flight(self, run_id: int) -> bool:
        pending = self._pending.get(run_id)
        return pending is not None and not pending.done()

    def in_flight_count(self) -> int:
        return sum(1 for pending in list(self._pending.values()) if not pending.done())

    def wait(self, run_id: int) -> None:
        """Let a snapshot in flight land (or fail) before the run's history is read or rewritten."""
        pending = self._pending.get(run_id)
        if pending is not None:
            with contextlib.suppress(Exception):  # a failed snapshot was logged by _write
                pending.result()

    def due(self, live: Live) -> bool:
        """Whether a run that logs its steps should start a snapshot now (a cheap read, without the run's lock):
        one at a time per run; the step after the one in flight lands asks again."""
        return live.durability == "log" and live.snapshot_due and live.closure is None and not self.in_flight(live.id)

    # ------------------------------------------------------------------ taking one
    def start(self, live: Live, *, wait_for_room: bool = False) -> None:
        """Capture the state (under the run's hold) and write it in the background, if one is due and there is
        room for its copy (or, with ``wait_for_room``, once there is). A run on the CPU with the directory store
        needs no copy: its state is written into the snapshot's file here, at page cache speed, and the file is
        synced and published in the background (``_write_in_place``)."""
        if live.closure is not None:  # a closure step under way: snapshots are taken between steps
            return
        if not live.snapshot_due or self.in_flight(live.id):
            return
        if isinstance(self.ctx.blobs, DirectoryBlobStore) and live.state.device.type == "cpu":
            self._write_in_place(live, self.ctx.blobs)
            return
        if not self._room.acquire(blocking=wait_for_room):
            return
        try:
            captured = live.state.capture()
            history, live.unwritten_history = live.unwritten_history, []
            future = self._writer.submit(self._write, live, captured, live.seq, described(live.state), history)
        except Exception:
            self._room.release()
            log.exception("capturing run %r at t=%d failed", live.name, live.state.t)
            return
        self._track(live.id, future, room=True)

    def _write_in_place(self, live: Live, blobs: DirectoryBlobStore) -> None:
        try:
            view = live.state.capture(copy=False)  # the state's own tensors: written before the hold is released
            digest = view.digest()
            unsynced = blobs.write_unsynced(new_key(), view.parts())
            t, seq, facts = view.t, live.seq, described(live.state)
            history, live.unwritten_history = live.unwritten_history, []
            del view
        except Exception:
            log.exception("writing the snapshot of run %r at t=%d failed", live.name, live.state.t)
            return

        started = time.perf_counter()

        def finish() -> None:
            try:
                size = blobs.sync(unsynced)
                self._publish(live, unsynced.key, size, digest, t, seq, facts, history, started)
            except Exception:
                live.unwritten_history[:0] = history  # the next snapshot writes them
                log.exception("snapshot of run %r at t=%d failed", live.name, t)

        self._track(live.id, self._writer.submit(finish), room=False)

    def _track(self, run_id: int, future: Future[None], *, room: bool) -> None:
        self._pending[run_id] = future
        future.add_done_callback(functools.partial(self._landed, run_id, room))

    def _landed(self, run_id: int, room: bool, done: Future[None]) -> None:
        if room:
            self._room.release()
        if self._pending.get(run_id) is done:
            del self._pending[run_id]

    def take_if_due(self, live: Live) -> None:
        """A snapshot-only run promises to lose at most ``snapshot_every`` steps: the step that makes one due
        waits for the one in flight rather than leave it to a next step a preempted worker may never send."""
        if not live.snapshot_due:
            return
        self.wait(live.id)
        self.start(live, wait_for_room=True)

    def before_drop(self, live: Live) -> None:
        """Before a run leaves memory (the budget, shutdown): a snapshot-only run writes what it has not."""
        self.wait(live.id)
        if live.durability == "snapshot" and live.seq > live.last_snapshot_seq:
            history, live.unwritten_history = live.unwritten_history, []
            self.write(live, live.state.capture(), live.seq, described(live.state), history)

    def _write(self, live: Live, captured: Captured, seq: int, facts: dict[str, Any], history: list[Any]) -> None:
        try:
            self.write(live, captured, seq, facts, history)
        except Exception:
            live.unwritten_history[:0] = history  # the next snapshot writes them
            log.exception("snapshot of run %r at t=%d failed", live.name, captured.t)

    def write(self, live: Live, captured: Captured, seq: int, facts: dict[str, Any], history: list[Any] | None = None) -> None:
        """Write the captured state, then publish it with ``facts`` (``described`` of the state at the capture) and
        (a snapshot-only run) the history of the steps since the last one, or drop it if the run moved on without it."""
        started = time.perf_counter()
        digest = captured.digest()
        key = new_key()
        # the blob first, outside the transaction: the steps' log records go on while 100s of MB are written
        size = self.ctx.blobs.put_staged(self.ctx.db, key, captured.parts())
        self._publish(live, key, size, digest, captured.t, seq, facts, history, started)

    def _publish(
        self,
        live: Live,
        key: str,
        size: int,
        digest: str,
        t: int,
        seq: int,
        facts: dict[str, Any],
        history: list[Any] | None,
        started: float,
    ) -> None:
        """Record the snapshot written under ``key`` (with the history a snapshot-only run kept since its last one),
        prune what it makes unneeded, and describe the run."""
        try:
            with self.ctx.db.write(f"publishing the snapshot of run {live.name!r} at t={t}") as repo:
                row = repo.run_by_id(live.id)
                if row is None or (live.durability == "log" and row.seq < seq):
                    raise _Superseded  # deleted, or its history rewritten meanwhile: this state is no longer the run's
                repo.add_snapshot(live.id, seq=seq, t=t, digest=digest, blob_key=key, size=size)
                repo.series.add(live.id, history or [])
                # the event at `seq` stays: it holds the digest a retry of the last step is checked against
                dropped = repo.prune_events_before(live.id, seq) + repo.prune_snapshots_before(live.id, seq)
                self.ctx.blobs.delete(repo, dropped)
                if live.durability == "log":  # its position goes with each step record, not with a snapshot behind it
                    facts = {k: v for k, v in facts.items() if k not in POSITION}
                else:  # a snapshot-only run's snapshots are its position
                    facts = {**facts, "seq": seq}
                repo.update_run(live.id, **facts, last_snapshot_t=t, last_snapshot_at=datetime.now(UTC))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.ctx.blobs.discard(self.ctx.db, key)
            if isinstance(exc, _Superseded):
                return
            raise
        self.ctx.blobs.drop(dropped)
        live.last_snapshot_seq, live.last_snapshot_t = seq, t
        seconds = time.perf_counter() - started
        self.ctx.metrics.snapshot_seconds.observe(seconds)
        self.ctx.metrics.snapshot_bytes.inc(size)
        fields = {"event": "snapshot", "run": live.name, "t": t, "ms": round(seconds * 1e3, 1), "bytes": size}
        log.info("snapshot of run %r at t=%d", live.name, t, extra=fields)
