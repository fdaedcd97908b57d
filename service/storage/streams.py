"""A blob written while its bytes arrive: a step's gradient goes to its log file as the request body streams in.

The body of a 10M-parameter step is 40 MB. Written after it has arrived, its file's write and sync run beside the
optimizer step and after it (on this project's 2-vCPU machine the disk syncs 40 MB in 16-70 ms). Written as it
arrives, the disk works while the network does: each piece the body reader hands over (``feed``) is written at
its offset on a log writer thread, and every ``FLUSH_BYTES`` the kernel is asked to start writing them to disk,
so that when the last byte has arrived little remains to be made durable.

Pieces are views of the body's own buffer, which the reader never writes again: nothing is copied. A stream is
written by at most one log writer thread at a time (``_drain``), and holds none while it waits for the body.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING

from ..errors import StorageUnavailable

if TYPE_CHECKING:  # the store opens streams; a stream only hands its file back to it
    from .blobs import DirectoryBlobStore, Unsynced

# every this many bytes of a file being streamed, the kernel is told to start writing them to disk (without
# waiting for it: a sync would hold up the next piece), so the disk writes while the body still arrives and the
# final sync finds little left. Linux starts the writeback of dirty pages on POSIX_FADV_DONTNEED (as PostgreSQL's
# pg_flush_data falls back to); the pages leave the cache once written, which a log read only at recovery does not
# mind.
FLUSH_BYTES = 8 * 1024 * 1024
_start_writeback = getattr(os, "posix_fadvise", None)


class BlobStream:
    """``feed`` pieces in order, then ``close`` (the blob durable under its key: ``durable``) or ``cancel`` (the
    file goes back to the store's spares or is removed). ``written``: every byte fed is in the kernel's hands, so
    the buffer the pieces view may be written again (the optimizer may take the gradients' memory as its own)."""

    def __init__(self, store: DirectoryBlobStore, file: Unsynced, fd: int, executor: Executor) -> None:
        self.key = file.key
        self.written: Future[None] = Future()
        self.durable: Future[int] = Future()
        self._store, self._file, self._fd, self._executor = store, file, fd, executor
        self._lock = threading.Lock()
        self._pieces: deque[memoryview] = deque()
        self._draining = False
        self._closing: str | None = None  # "close" or "cancel"
        self._finishing = False  # the last piece is written: the file is being synced, published or given back
        self._offset = self._flushed = 0
        self._error: OSError | None = None

    def feed(self, piece: memoryview) -> None:
        """The next ``len(piece)`` bytes of the blob (a view that stays valid and unchanged until ``written``)."""
        with self._lock:
            if self._closing is not None:
                raise RuntimeError("a closed blob stream was fed")
            self._pieces.append(piece)
            self._kick()

    def close(self) -> Future[int]:
        """Every piece is fed: the blob is made durable under its key (its size, or StorageUnavailable)."""
        with self._lock:
            if self._closing is None:
                self._closing = "close"
                self._kick()
        return self.durable

    def cancel(self) -> None:
        """The blob will not be used (the body did not arrive whole, or nothing will name it): dropped, unsynced if
        it is not yet being synced (else once it is)."""
        with self._lock:
            if not self._finishing:
                self._closing = "cancel"
                self._kick()
                return
        self.durable.add_done_callback(self._drop_if_published)

    def _drop_if_published(self, durable: Future[int]) -> None:
        if durable.exception() is None:
            self._store.drop([self.key])

    def _kick(self) -> None:
        if not self._draining:
            self._draining = True
            self._executor.submit(self._drain)

    def _drain(self) -> None:
        """On a log writer thread: write what was fed, in order, then finish if the stream is closed."""
        try:
            self._drain_pieces()
        except BaseException as exc:  # never leave a waiter hanging
            for future in (self.written, self.durable):
                if not future.done():
                    future.set_exception(StorageUnavailable(f"could not write blob {self.key}: {exc}"))
            raise

    def _drain_pieces(self) -> None:
        while True:
            with self._lock:
                if not self._pieces or self._closing == "cancel":
                    if self._closing is None:
                        self._draining = False  # the next feed starts another drain
                        return
                    how, self._finishing = self._closing, True
                    break
                piece = self._pieces.popleft()
            if self._error is None:
                try:
                    self._write(piece)
                except OSError as exc:
                    self._error = exc
        self._finish(how)

    def _write(self, piece: memoryview) -> None:
        while piece:
            n = os.pwrite(self._fd, piece, self._offset)
            piece, self._offset = piece[n:], self._offset + n
        if self._offset - self._flushed >= FLUSH_BYTES and _start_writeback is not None:
            _start_writeback(self._fd, self._flushed, self._offset - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._offset

    def _finish(self, how: str) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        file, error = self._file, self._error
        self.written.set_result(None)
        if how == "cancel":
            self._store.give_back(file)
            self.durable.set_exception(StorageUnavailable(f"blob {self.key} was cancelled"))
            return
        if error is None and self._offset != file.size:
            error = OSError(f"{self._offset} bytes were written of {file.size}")
        if error is not None:
            file.tmp.unlink(missing_ok=True)
            self.durable.set_exception(StorageUnavailable(f"could not write blob {self.key}: {error.strerror or error}"))
            return
        try:
            self.durable.set_result(self._store.sync(file))
        except StorageUnavailable as exc:
            self.durable.set_exception(exc)
