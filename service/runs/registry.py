"""The one seam between requests (and background work) and a run's live state.

``RunRegistry.hold(tenant, name, write=...)`` is the only way to reach a run: it answers "who has this run
now" (this process: a run is loaded here on demand; a lease row would be claimed here when several replicas
share a database), takes the run's lock (``lock.RunLock``: readers side by side, one writer), loads the run
from the database if it is not in memory (``recovery.recover``), and yields a ``RunHandle``. Three ways to use
it, all built on ``hold``:

- ``call(tenant, name, fn, ...)``: ``fn(live, ...)`` in a worker thread under the hold; its result;
- ``answer(tenant, name, fn, ...)``: a response built by ``fn`` under the hold *and sent* under it, so that a
  step's answer can be sent from the live parameters (``payloads.LiveTensorsResponse``): a write hold becomes
  a read hold once the answer is built, so other readers may proceed while it is sent;
- ``hold`` itself, for routes that need two runs (fork) or none yet (create).

Memory: live runs past ``OPTIM_MAX_LIVE_BYTES`` are dropped, least recently used first, once no request holds
them (their state is durable; a run that only snapshots writes one first) and loaded again when next asked
for. A run's lock and its slot here go away when nothing holds it and it is not in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..payloads import LiveTensorsResponse
from . import recovery
from .live import Live, RunContext, RunKey
from .lock import RunLock
from .snapshots import Snapshots

log = logging.getLogger("optim_service")
T = TypeVar("T")


@dataclass
class _Slot:
    lock: RunLock = field(default_factory=RunLock)
    users: int = 0  # requests holding the lock or waiting for it
    live: Live | None = None


class RunHandle:
    """A held run: ``live`` is its state in memory (None for a run that does not exist yet, when the hold was
    taken without loading); ``install`` makes a just-created run live; ``downgrade`` turns a write hold into a
    read hold."""

    def __init__(self, key: RunKey, slot: _Slot, exclusive: bool) -> None:
        self.key, self._slot, self.exclusive = key, slot, exclusive

    @property
    def live(self) -> Live | None:
        return self._slot.live

    def install(self, live: Live | None) -> None:
        self._slot.live = live

    async def downgrade(self) -> None:
        if self.exclusive:
            await self._slot.lock.downgrade()
            self.exclusive = False


def default_budget(device: torch.device) -> int:
    """Half of the device's memory: the GPU's, or the host's (its cgroup's limit where that is lower)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory // 2)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total // 2


class RunRegistry:
    def __init__(self, ctx: RunContext, snapshots: Snapshots) -> None:
        self.ctx, self.snapshots = ctx, snapshots
        self.budget = ctx.settings.max_live_bytes if ctx.settings.max_live_bytes is not None else default_budget(ctx.device)
        self._slots: dict[RunKey, _Slot] = {}
        self._recent: OrderedDict[RunKey, None] = OrderedDict()  # live runs, least recently used first
        self._shrinking: asyncio.Lock | None = None

    # ------------------------------------------------------------------ what is here
    def live(self, tenant: str, name: str) -> Live | None:
        """The run's state if it is in memory here (a read without the lock: for descriptions, not for work)."""
        slot = self._slots.get((tenant, name))
        return slot.live if slot is not None else None

    def live_runs(self) -> list[Live]:
        return [s.live for s in self._slots.values() if s.live is not None]

    def live_bytes(self) -> int:
        return sum(live.state_bytes for live in self.live_runs())

    # ------------------------------------------------------------------ the seam
    @contextlib.asynccontextmanager
    async def hold(self, tenant: str, name: str, *, write: bool = False, load: bool = True) -> AsyncIterator[RunHandle]:
        """Hold the run: its lock (shared, or exclusive with ``write``), and its state loaded unless ``load`` is
        False. Released when the block ends; a run left ``stale`` is dropped then, and the memory budget kept."""
        key = (tenant, name)
        slot = self._slots.setdefault(key, _Slot())
        slot.users += 1
        # loading changes the slot: it takes the write lock, then gives it up for a read lock if that was asked
        handle = RunHandle(key, slot, exclusive=write or (load and slot.live is None))
        try:
            await slot.lock.acquire(write=handle.exclusive)
            try:
                if load and slot.live is None:
                    slot.live = await run_in_threadpool(recovery.recover, self.ctx, self.snapshots, tenant, name)
                if not write:
                    await handle.downgrade()
                if slot.live is not None:
                    self._recent[key] = None
                    self._recent.move_to_end(key)
                yield handle
            finally:
                await slot.lock.release(write=handle.exclusive)
        finally:
            slot.users -= 1
            await self._settle(key, slot)

    async def call(self, tenant: str, name: str, fn: Callable[..., T], /, *args: Any, write: bool = False) -> T:
        """``fn(live, *args)`` in a worker thread, under the run's hold."""
        async with self.hold(tenant, name, write=write) as run:
            assert run.live is not None
            return await run_in_threadpool(fn, run.live, *args)

    def answer(
        self,
        tenant: str,
        name: str,
        fn: Callable[..., Response | Later],
        /,
        *args: Any,
        write: bool = False,
        after: Callable[[], Awaitable[None]] | None = None,
        finally_: Callable[[], None] | None = None,
    ) -> Response:
        """A response that holds the run while ``fn(live, *args)`` builds it and while it is sent (or, if ``fn``
        answers ``Later``, that is awaited and sent after the hold); ``after`` runs once the hold is released (a
        due snapshot); ``finally_`` once the response is over, whatever happened (it must not block)."""
        return _HeldResponse(self, tenant, name, fn, args, write, after, finally_)

    # ------------------------------------------------------------------ memory
    async def _settle(self, key: RunKey, slot: _Slot) -> None:
        """After a hold: drop a stale state, keep the budget, forget a slot nothing uses."""
        live = slot.live
        if live is not None and live.stale and slot.users == 0:
            log.warning(
                "run %r is dropped from memory (%s); it is recovered from the database when next asked for", key[1], live.stale
            )
            live.close()
            slot.live = None
        if slot.live is not None and slot.users == 0:
            try:
                slot.live.measure()
            except Exception:  # the answer is given; its accounting must not turn it into an error
                log.exception("measuring run %r failed; its last measure stands", key[1])
        if slot.live is None:
            self._recent.pop(key, None)
        if slot.users == 0 and slot.live is None and slot.lock.free:
            self._slots.pop(key, None)
        if self.live_bytes() > self.budget:
            await self._shrink()

    async def _shrink(self) -> None:
        """Drop idle runs, least recently used first, until the live ones fit the budget."""
        self._shrinking = self._shrinking or asyncio.Lock()
        async with self._shrinking:
            for key in list(self._recent):
                if self.live_bytes() <= self.budget:
                    break
                slot = self._slots.get(key)
                if slot is None or slot.live is None or slot.users or slot.live.closure is not None:
                    continue  # in use: the run being served, or one in the middle of a closure step, stays
                if not slot.lock.try_acquire_write():
                    continue
                try:
                    live = slot.live
                    await run_in_threadpool(self.snapshots.before_drop, live)
                    live.close()
                    slot.live = None
                    self._recent.pop(key, None)
                    log.info(
                        "run %r dropped from memory (%d bytes) to keep within %d bytes",
                        live.name,
                        live.state_bytes,
                        self.budget,
                        extra={"event": "eviction", "run": live.name, "t": live.state.t, "bytes": live.state_bytes},
                    )
                except Exception:
                    log.exception("run %r could not be dropped from memory; it stays", key[1])
                finally:
                    await slot.lock.release(write=True)
                if slot.users == 0 and slot.live is None:
                    self._slots.pop(key, None)
            # a RunState is a web of cycles (modules, optimizers, schedulers hold each other): without a collection
            # its tensors would wait for the collector's next full pass, and the memory they free would not be reused
            gc.collect()

    async def drop_all(self) -> None:
        """At shutdown: every run leaves memory as it would under the budget (snapshot-only runs write theirs)."""
        for key, slot in list(self._slots.items()):
            async with self.hold(*key, write=True, load=False) as run:
                if run.live is not None:
                    await run_in_threadpool(self.snapshots.before_drop, run.live)
                    run.live.close()
                    slot.live = None


@dataclass(frozen=True)
class Later:
    """An answer not ready under the hold (a sync step waiting for other ranks): ``respond()`` is awaited, and its
    response sent, once the hold is released."""

    respond: Callable[[], Awaitable[Response]]


class _HeldResponse(Response):
    """See ``RunRegistry.answer``. Errors before the answer starts go to the app's exception handlers, as any
    route's do."""

    def __init__(
        self,
        registry: RunRegistry,
        tenant: str,
        name: str,
        fn: Callable[..., Response | Later],
        args: tuple[Any, ...],
        write: bool,
        after: Callable[[], Awaitable[None]] | None,
        finally_: Callable[[], None] | None,
    ) -> None:
        super().__init__()
        self.registry, self.tenant, self.name, self.fn, self.args = registry, tenant, name, fn, args
        self.write, self.after, self.finally_ = write, after, finally_

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._respond(scope, receive, send)
        finally:
            if self.finally_ is not None:
                self.finally_()

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        later: Later | None = None
        async with self.registry.hold(self.tenant, self.name, write=self.write) as run:
            assert run.live is not None
            response = await run_in_threadpool(self.fn, run.live, *self.args)
            if isinstance(response, Later):
                later = response
            else:
                if isinstance(response, LiveTensorsResponse):
                    response.lock_held = True
                await run.downgrade()  # the answer only reads the run: other readers need not wait for its send
                await response(scope, receive, send)
        if later is not None:
            await (await later.respond())(scope, receive, send)
        if self.after is not None:
            await self.after()
