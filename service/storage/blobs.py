"""Where tensors live: one interface, two stores, both keeping every promise.

- ``DatabaseBlobStore``: chunks of bounded size as rows of ``blob_chunk``, written in the caller's
  transaction, so a step and its log record commit (or vanish) together.
- ``DirectoryBlobStore``: one file per blob, written and fsynced *before* the transaction that
  references it commits; a crash in between leaves a file that nothing references, which
  ``collect`` removes. Files that are no longer referenced are recycled: creating a 40 MB file costs
  20-130 ms on ext4 here (bimodally), rewriting one of the same size 13-16 ms, so dropped blobs wait in
  ``spare/`` for a new blob of their size, as PostgreSQL recycles its WAL segments.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import StorageUnavailable
from ..settings import Settings
from .repository import Repository
from .streams import BlobStream

if TYPE_CHECKING:  # the database module imports the repository too; the stores only need the type
    from .database import Database

# a blob is written from a sequence of buffers (a snapshot's header and each tensor's own memory, or one payload):
# never joined into one copy first
Parts = Sequence[bytes | memoryview]


# a staged blob (a background snapshot) is written in transactions of about this many bytes: short enough not
# to hold the database's write lock long (the steps' log writes wait for it), long enough to sync seldom
STAGE_BYTES = 16 * 1024 * 1024


def new_key() -> str:
    return uuid.uuid4().hex


class BlobStore(Protocol):
    def put(self, repo: Repository, key: str, parts: Parts) -> int:
        """Store the blob that is ``parts`` one after the other, in the caller's transaction; its size."""

    def put_staged(self, db: Database, key: str, parts: Parts) -> int:
        """Store a blob ahead of the transaction that will reference it, in short transactions of its own, so
        that a large write (a step's log payload, a snapshot) never holds the database's write lock for long, nor
        while anything else happens. Until a row references it, the blob is garbage to ``collect``; ``discard``
        removes it when it will not be."""

    def discard(self, db: Database, key: str) -> None: ...

    def reader(self, repo: Repository, key: str) -> contextlib.AbstractContextManager[BlobReader]:
        """The blob as a stream, read in order into the caller's memory (no whole copy of it in between)."""

    def delete(self, repo: Repository, keys: Iterable[str]) -> None:
        """Forget ``keys``; for files, only once the deleting transaction has committed (``collect``)."""

    def drop(self, keys: Iterable[str]) -> None:
        """After the transaction that deleted their rows committed: remove the blobs' files, if any."""

    def collect(self, repo: Repository) -> int:
        """Remove what nothing references any more (run at start-up, when no write is in flight)."""


class BlobReader(Protocol):
    size: int

    def readinto(self, out: memoryview) -> None:
        """Fill ``out`` with the blob's next ``len(out)`` bytes (StorageUnavailable if it has fewer)."""


def read_into(store: BlobStore, repo: Repository, key: str, alloc: Callable[[int], memoryview]) -> memoryview:
    """The whole blob, read into ``alloc(size)`` (a writable buffer of at least ``size`` bytes)."""
    with store.reader(repo, key) as blob:
        out = alloc(blob.size)[: blob.size]
        blob.readinto(out)
        return out


class _ChunkReader:
    def __init__(self, repo: Repository, key: str, sizes: list[tuple[int, int]]) -> None:
        self.repo, self.key, self.size = repo, key, sum(n for _, n in sizes)
        self._sizes = sizes
        self._next = 0
        self._chunk = memoryview(b"")

    def readinto(self, out: memoryview) -> None:
        pos = 0
        while pos < len(out):
            if not self._chunk:
                if self._next == len(self._sizes):
                    raise StorageUnavailable(f"blob {self.key} is shorter than {self.size} bytes")
                part, n = self._sizes[self._next]
                self._next += 1
                data = self.repo.chunk(self.key, part)
                if data is None or len(data) != n:
                    raise StorageUnavailable(f"blob {self.key} changed while it was read")
                self._chunk = memoryview(data)
            take = min(len(out) - pos, len(self._chunk))
            out[pos : pos + take] = self._chunk[:take]
            self._chunk = self._chunk[take:]
            pos += take


class _FileReader:
    def __init__(self, f: io.RawIOBase, key: str) -> None:
        self._f, self.key = f, key
        self.size = os.fstat(f.fileno()).st_size

    def readinto(self, out: memoryview) -> None:
        pos = 0
        try:
            while pos < len(out):
                n = self._f.readinto(out[pos:])
                if not n:
                    raise StorageUnavailable(f"blob {self.key} is shorter than {self.size} bytes")
                pos += n
        except OSError as exc:
            raise StorageUnavailable(f"could not read blob {self.key}: {exc.strerror or exc}") from exc


class DatabaseBlobStore:
    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes

    def _rows(self, parts: Parts) -> Iterator[memoryview]:
        """The blob's bytes as rows of at most ``chunk_bytes``: a row that lies inside one part is a slice of it
        (no copy), the rest is gathered into one buffer, reused: a row is valid until the next is asked for."""
        size = self.chunk_bytes
        scratch: memoryview | None = None
        fill = rows = 0
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                if fill == 0 and len(view) >= size:
                    rows += 1
                    yield view[:size]
                    view = view[size:]
                    continue
                if scratch is None:
                    scratch = memoryview(bytearray(size))
                take = min(size - fill, len(view))
                scratch[fill : fill + take] = view[:take]
                fill, view = fill + take, view[take:]
                if fill == size:
                    rows += 1
                    yield scratch
                    fill = 0
        if fill or not rows:  # an empty blob is one empty row
            yield scratch[:fill] if scratch is not None else memoryview(b"")

    def put(self, repo: Repository, key: str, parts: Parts) -> int:
        size = 0
        for i, row in enumerate(self._rows(parts)):
            repo.insert_chunk(key, i, row)
            size += len(row)
        return size

    def put_staged(self, db: Database, key: str, parts: Parts) -> int:
        size = 0
        rows = enumerate(self._rows(parts))
        try:
            # transactions of ~STAGE_BYTES, whatever the row size: each commit is a WAL sync
            while (first := next(rows, None)) is not None:
                with db.write(f"writing blob {key}") as repo:
                    staged = 0
                    for i, row in itertools.chain([first], rows):
                        repo.insert_chunk(key, i, row)
                        staged += len(row)
                        if staged >= STAGE_BYTES:
                            break
                size += staged
        except Exception:
            with contextlib.suppress(Exception):
                self.discard(db, key)
            raise
        return size

    def discard(self, db: Database, key: str) -> None:
        with db.write(f"discarding blob {key}") as repo:
            self.delete(repo, [key])

    @contextlib.contextmanager
    def reader(self, repo: Repository, key: str) -> Iterator[BlobReader]:
        # the sizes first, then one chunk at a time
        sizes = repo.chunk_sizes(key)
        if not sizes:
            raise StorageUnavailable(f"blob {key} is missing from the database")
        yield _ChunkReader(repo, key, sizes)

    def delete(self, repo: Repository, keys: Iterable[str]) -> None:
        repo.delete_chunks(keys)

    def drop(self, keys: Iterable[str]) -> None:
        pass  # the rows went with the transaction

    def collect(self, repo: Repository) -> int:
        dead = repo.chunk_keys() - repo.referenced_keys()
        self.delete(repo, dead)
        return len(dead)


@dataclass(frozen=True)
class Unsynced:
    """A blob's file written but not yet synced nor renamed to its key (``DirectoryBlobStore.write_unsynced``)."""

    key: str
    tmp: Path
    path: Path
    size: int
    rewritten: bool  # a spare's blocks rewritten: its data alone needs syncing


class DirectoryBlobStore:
    def __init__(self, root: Path, spare_bytes: int = 2 * 1024**3) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # files no longer referenced, kept to be rewritten: by size, at most ``spare_bytes`` in all
        self.spare_dir = root / "spare"
        self.spare_dir.mkdir(exist_ok=True)
        self.spare_bytes = spare_bytes
        self._spares: dict[int, list[Path]] = {}
        self._spare_total = 0
        self._spare_lock = threading.Lock()
        for path in self.spare_dir.iterdir():
            size = path.stat().st_size
            self._spares.setdefault(size, []).append(path)
            self._spare_total += size

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def put(self, repo: Repository | None, key: str, parts: Parts) -> int:
        return self.sync(self.write_unsynced(key, parts))

    def write_unsynced(self, key: str, parts: Parts) -> Unsynced:
        """The first half of ``put``: ``parts`` written into the blob's file at page cache speed, not yet durable nor
        named by its key (a snapshot written from the live state under the run's hold, synced after it)."""
        views = [memoryview(part).cast("B") for part in parts]
        file, fd = self._open(key, sum(len(v) for v in views))
        try:
            try:
                for view in views:
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            file.tmp.unlink(missing_ok=True)
            raise StorageUnavailable(f"could not write blob {key}: {exc.strerror or exc}") from exc
        return file

    def open_stream(self, key: str, size: int, executor: Executor) -> BlobStream:
        """A blob of ``size`` bytes written as they arrive (``streams``), on ``executor``'s threads."""
        file, fd = self._open(key, size)
        return BlobStream(self, file, fd, executor)

    def _open(self, key: str, size: int) -> tuple[Unsynced, int]:
        """The file a blob of ``size`` bytes is written into, open for writing, and what ``sync`` will publish."""
        path = self._path(key)
        # a spare of the same size is rewritten in place: its size and blocks stay, so only the data is synced
        spare = self._take_spare(size)
        tmp = spare or path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY) if spare else os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            if spare:
                self.give_back(Unsynced(key=key, tmp=tmp, path=path, size=size, rewritten=True))
            raise StorageUnavailable(f"could not write blob {key}: {exc.strerror or exc}") from exc
        return Unsynced(key=key, tmp=tmp, path=path, size=size, rewritten=spare is not None), fd

    def give_back(self, file: Unsynced) -> None:
        """A blob's file that will not be published (a cancelled stream): a spare again, or removed."""
        with contextlib.suppress(OSError):
            if not (file.rewritten and self._recycle(file.tmp)):
                file.tmp.unlink(missing_ok=True)

    def sync(self, written: Unsynced) -> int:
        """The second half of ``put``: the file made durable under its key (the rename too), its size answered."""
        try:
            fd = os.open(written.tmp, os.O_RDONLY)
            try:
                if written.rewritten:
                    os.fdatasync(fd)
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(written.tmp, written.path)
            dir_fd = os.open(written.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself is durable before the row that names the file commits
            finally:
                os.close(dir_fd)
        except OSError as exc:
            written.tmp.unlink(missing_ok=True)
            raise StorageUnavailable(f"could not write blob {written.key}: {exc.strerror or exc}") from exc
        return written.size

    def put_staged(self, db: Database, key: str, parts: Parts) -> int:
        return self.put(None, key, parts)  # a file needs no transaction

    def discard(self, db: Database, key: str) -> None:
        self.drop([key])

    @contextlib.contextmanager
    def reader(self, repo: Repository, key: str) -> Iterator[BlobReader]:
        try:
            f = open(self._path(key), "rb", buffering=0)  # closed below
        except OSError as exc:
            raise StorageUnavailable(f"could not read blob {key}: {exc.strerror or exc}") from exc
        with f:
            yield _FileReader(f, key)

    def delete(self, repo: Repository, keys: Iterable[str]) -> None:
        pass  # the files go in drop(), once the transaction that forgot them has committed

    def drop(self, keys: Iterable[str]) -> None:
        """Forget blobs that no committed row references: kept as spares while there is room, else removed."""
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                if not self._recycle(path):
                    path.unlink()

    def _take_spare(self, size: int) -> Path | None:
        with self._spare_lock:
            same = self._spares.get(size)
            if not same:
                return None
            self._spare_total -= size
            return same.pop()

    def _recycle(self, path: Path) -> bool:
        """Move ``path`` to the spares (no fsync: after a crash it is garbage wherever it is)."""
        size = path.stat().st_size
        with self._spare_lock:
            if size == 0 or self._spare_total + size > self.spare_bytes:
                return False
            self._spare_total += size
        spare = self.spare_dir / new_key()
        try:
            os.rename(path, spare)
        except OSError:
            with self._spare_lock:
                self._spare_total -= size
            raise
        with self._spare_lock:
            self._spares.setdefault(size, []).append(spare)
        return True

    def collect(self, repo: Repository) -> int:
        live = repo.referenced_keys()
        removed = 0
        for path in self.root.glob("*/*"):
            if path.parent == self.spare_dir:
                continue
            if path.name.split(".")[0] not in live:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def blob_store_kind(settings: Settings, repo: Repository) -> str:
    """``OPTIM_BLOB_STORE`` made concrete. ``auto`` keeps a SQLite database's tensors in files beside it (the way
    SQLite's own WAL sits beside it: the fast path of one host), unless the database already holds blobs of its
    own (a deployment that started with ``database`` keeps reading them); a PostgreSQL database keeps them in its
    rows, so that servers sharing it need share no filesystem."""
    if settings.blob_store != "auto":
        return settings.blob_store
    return "directory" if settings.is_sqlite and not repo.any_chunk() else "database"


def make_blob_store(settings: Settings, repo: Repository) -> BlobStore:
    if blob_store_kind(settings, repo) == "directory":
        return DirectoryBlobStore(settings.blob_dir, spare_bytes=settings.blob_spare_bytes)
    return DatabaseBlobStore(settings.blob_chunk_bytes)
