"""A run's lock: many readers or one writer, writers first, and a writer may become a reader.

Requests on one run are serialized where they change it (a step, a rollback) and run side by side where they
only read it (its parameters, its digest, a step's answer being sent). Writers waiting keep new readers out, so
a stream of reads cannot starve the steps. Everything here runs on the event loop; the work under the lock runs
in threads.
"""

from __future__ import annotations

import asyncio


class RunLock:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @property
    def free(self) -> bool:
        return not self._writer and self._readers == 0 and self._writers_waiting == 0

    async def acquire(self, *, write: bool) -> None:
        async with self._cond:
            if write:
                self._writers_waiting += 1
                try:
                    await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
                finally:
                    self._writers_waiting -= 1
                self._writer = True
            else:
                await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
                self._readers += 1

    async def release(self, *, write: bool) -> None:
        async with self._cond:
            if write:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()

    async def downgrade(self) -> None:
        """The writer becomes a reader, letting other readers in (not writers) without a gap between."""
        async with self._cond:
            self._writer = False
            self._readers += 1
            self._cond.notify_all()

    def try_acquire_write(self) -> bool:
        """Take the write lock if nobody holds or waits for it (the state is only ever changed on the loop)."""
        if not self.free:
            return False
        self._writer = True
        return True
