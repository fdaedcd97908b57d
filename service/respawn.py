"""Restart after a crash: a parent that holds the imports and the listening socket, and a serving process forked
from it, forked again at once when it is killed.

A cold start of the server spends 4-5 s importing torch and timm (timm pulls in torchvision, which pulls in
``torch._dynamo``) before it answers; a worker whose server died (the OOM killer, a segfault, ``kill -9``) waits for
all of it before its next step is acknowledged. Here that import happens once, in a parent that does nothing else:
it binds the port, forks the process that serves, and when that process is killed by a signal, forks another one
that serves the same socket (connections queued meanwhile are answered by the new one). The new process starts
with every module already imported, so it answers within a fraction of a second, recovers a run on its first request
(snapshot + log, as after any restart) and the worker's retry is acknowledged. PostgreSQL's postmaster does the same
for its backends (``restart_after_crash``), gunicorn's ``preload_app`` the same for its workers.

What the parent does not do: it serves nothing, creates no thread, touches no database and no CUDA device before a
fork (each serving process makes its own, a CUDA context not surviving a fork), and it restarts only a process that a
signal killed. One that exits by itself (a failed start: schema not migrated, port taken) ends the parent with its
exit code, as it would have ended the server. SIGTERM and SIGINT go to the serving process, which stops as it always
does (snapshot-only runs write their snapshot); the parent then exits with its code. If the parent itself is killed,
the kernel kills the serving process too (``PR_SET_PDEATHSIG``), so a supervisor above sees one service.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("optim_service")

FORWARDED = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1
# a serving process killed sooner than this after its start counts towards a crash loop, which backs off
CRASH_LOOP_S = 10.0
MAX_BACKOFF_S = 5.0


def backoff(crashes: int) -> float:
    """Seconds to wait before the next fork after ``crashes`` quick deaths in a row: none for the first, then
    0.2 s doubling up to 5 s (a process that dies on its first request each time does not spin the CPU)."""
    return 0.0 if crashes <= 1 else min(0.1 * 2 ** (crashes - 1), MAX_BACKOFF_S)


def serve(sock: socket.socket, run: Callable[[socket.socket], int]) -> int:
    """Fork a process that runs ``run(sock)`` and exits with what it returns; fork another whenever one is killed by
    a signal; return how the last one ended, as ``subprocess`` says it (minus the signal's number if a signal ended
    it: uvicorn raises the signal that stopped it again once it has stopped)."""
    child = 0
    stopping: int | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = signum
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    crashes = 0
    try:
        while True:
            started = time.monotonic()
            child = _fork(sock, run)
            if stopping is not None:  # asked to stop between two forks: the new process stops too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, stopping)
            _, status = os.waitpid(child, 0)
            child = 0
            code = os.waitstatus_to_exitcode(status)
            if stopping is not None or os.WIFEXITED(status):
                return code
            lived = time.monotonic() - started
            crashes = crashes + 1 if lived < CRASH_LOOP_S else 1
            wait = backoff(crashes)
            log.error(
                "the serving process was killed by %s after %.1f s; a new one serves the same socket%s",
                signal.Signals(os.WTERMSIG(status)).name,
                lived,
                f" in {wait:.1f} s ({crashes} quick deaths in a row)" if wait else "",
                extra={"event": "respawn", "signal": os.WTERMSIG(status), "lived_s": round(lived, 3)},
            )
            time.sleep(wait)
            if stopping is not None:
                return -stopping
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_like(code: int) -> None:
    """End this process as the serving process ended: with its exit code, or killed by the same signal."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        signal.raise_signal(-code)
    sys.exit(code if code >= 0 else 128 - code)


def _fork(sock: socket.socket, run: Callable[[socket.socket], int]) -> int:
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for s in FORWARDED:
            signal.signal(s, signal.SIG_DFL)
        # a group of its own: a terminal's Ctrl-C reaches the parent alone, which passes it on once (uvicorn takes a
        # second SIGINT as "stop without waiting for the requests in flight")
        os.setpgid(0, 0)
        _die_with(parent)
        code = run(sock)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _die_with(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
