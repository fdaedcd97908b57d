"""The C allocator's settings for a process that moves tens of megabytes per request.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and returns it with ``munmap`` when freed, so each step's bodies and tensors touch new pages:
a 40 MB buffer then costs 10–30 ms of page faults before a byte is copied (measured in
``bench/``: encoding 40 MB took 42 ms before, 14 ms after). Keeping large blocks in the heap
(no mmap, a high trim threshold) makes the next step reuse warm memory. The process then keeps
its peak heap instead of giving it back, which the service does anyway: its runs stay in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("optim_service")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def tune() -> bool:
    """Apply the settings (glibc only); whether they were applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= libc.mallopt(M_TOP_PAD, 64 << 20) == 1
    # one arena: a step's buffers are allocated by whichever worker thread serves it, and freed by another
    ok &= libc.mallopt(M_ARENA_MAX, 1) == 1
    if not ok:
        log.warning("mallopt refused the allocator settings; large requests will be slower")
    return ok
