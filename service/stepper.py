"""The threads the optimizer steps run on, each with an OpenMP team of several threads.

The service sets ``OMP_NUM_THREADS=1`` (see ``service/__init__.py``): libgomp gives every thread that
opens a parallel region a team of its own, and the many threads of a web service (its worker pool,
the log writers, the snapshot thread) would each grow one and spin on the cores the step needs. The
step itself is the one place more threads pay: on 2 vCPUs, AdamW over 10M parameters takes 26 ms on
one OpenMP thread and 16 ms on two (``fused``: 11 and 7; measured in a worker thread beside the
others, ``bench/``). So the steps are handed to a few dedicated threads (``OPTIM_STEPPERS``, default
one), each with a team of ``OPTIM_STEP_THREADS`` (default: every core this process may run on), and
everything else keeps one thread. One stepper serializes the steps of concurrent runs, each using
every core; a host with many cores and many small runs steps more of them at once with more steppers
of fewer threads each.

torch sets a thread's team size when the thread first runs a parallel operation, from its global
setting (``torch.set_num_threads``, which also sets the calling thread's). A stepper therefore runs
that first initialisation, then sets its own size; once every stepper is started, the global setting
goes back to what it was, for the threads that start later.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
T = TypeVar("T")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container's cpuset narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Stepper:
    def __init__(self, steppers: int = 1, threads: int = 0) -> None:
        self.steppers = steppers
        self.threads = threads or available_cores()
        self._pool = ThreadPoolExecutor(max_workers=steppers, thread_name_prefix="step")
        before = torch.get_num_threads()
        # each start waits for the others, so that every one lands on a thread of its own
        started = threading.Barrier(steppers)
        for future in [self._pool.submit(self._start, started) for _ in range(steppers)]:
            future.result()
        torch.set_num_threads(before)  # the global default again, for every other thread

    def _start(self, started: threading.Barrier) -> None:
        torch.get_num_threads()  # torch's own first initialisation of this thread, which would reset the size later
        torch.set_num_threads(self.threads)
        started.wait()

    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a stepper thread; its result, or its exception raised here."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
