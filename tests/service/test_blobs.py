"""Blobs written from parts read back whole; the directory blob store recycles the files it forgets (a new 40 MB
file costs up to 10x a rewrite)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from service.storage import Database, blobs, make_engine
from service.storage.blobs import DatabaseBlobStore, DirectoryBlobStore, read_into

from ..reference import make_grads, make_model
from ..server import DATABASES, database
from .inprocess import InProcessServer
from .test_api import new_run, step

# parts around the database store's row size (8 bytes here): inside one row, exactly one, across rows, empty
PARTS = {
    "one small": [b"abc"],
    "one of exactly a row": [b"01234567"],
    "one over several rows": [bytes(range(30))],
    "small ones gathered": [b"ab", b"cde", b"", b"fghij", b"k"],
    "small then large": [b"xyz", bytes(range(100, 125)), b"q"],
    "empty blob": [],
    "only empty parts": [b"", b""],
}


@pytest.mark.parametrize("kind", DATABASES)
@pytest.mark.parametrize("store_kind", ["database", "directory"])
@pytest.mark.parametrize("layout", list(PARTS))
def test_a_blob_written_from_parts_reads_back_as_their_concatenation(
    tmp_path: Path, kind: str, store_kind: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "STAGE_BYTES", 16)  # a staged blob of more than two rows takes several transactions
    parts = [memoryview(p) for p in PARTS[layout]]
    whole = b"".join(parts)
    with database(kind, tmp_path) as url:
        db = Database(make_engine(Settings(database_url=url, data_dir=tmp_path)))
        try:
            store = DatabaseBlobStore(chunk_bytes=8) if store_kind == "database" else DirectoryBlobStore(tmp_path / "blobs")
            with db.write("a test") as repo:
                assert store.put(repo, "a" * 32, parts) == len(whole)
            assert store.put_staged(db, "b" * 32, parts) == len(whole)
            with db.read("a test") as repo:
                for key in ("a" * 32, "b" * 32):
                    assert bytes(read_into(store, repo, key, lambda n: memoryview(bytearray(n)))) == whole
                    if store_kind == "database":
                        sizes = [n for _, n in repo.chunk_sizes(key)]
                        assert max(sizes) <= 8 and sum(sizes) == len(whole)
        finally:
            db.close()


def _read(store: DirectoryBlobStore, key: str) -> bytes:
    return bytes(read_into(store, None, key, lambda n: memoryview(bytearray(n))))


def _spares(store: DirectoryBlobStore) -> list[Path]:
    return sorted(store.spare_dir.iterdir())


def test_a_dropped_blob_is_rewritten_in_place_by_the_next_blob_of_its_size(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path)
    store.put(None, "a" * 32, [b"x" * 1000])  # a file needs no transaction
    inode = store._path("a" * 32).stat().st_ino
    store.drop(["a" * 32])
    assert not store._path("a" * 32).exists() and len(_spares(store)) == 1
    store.put(None, "b" * 32, [b"y" * 1000])
    assert _read(store, "b" * 32) == b"y" * 1000
    assert store._path("b" * 32).stat().st_ino == inode  # the same file, not a new one
    assert _spares(store) == []


def test_a_blob_of_another_size_gets_a_new_file_and_leaves_the_spare(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path)
    store.put(None, "a" * 32, [b"x" * 1000])
    store.drop(["a" * 32])
    store.put(None, "b" * 32, [b"y" * 999])  # a shorter blob must not keep a stale tail
    assert _read(store, "b" * 32) == b"y" * 999
    assert len(_spares(store)) == 1


@pytest.mark.parametrize("limit", [0, 2500])
def test_spares_are_bounded_by_bytes(tmp_path: Path, limit: int) -> None:
    store = DirectoryBlobStore(tmp_path, spare_bytes=limit)
    keys = [c * 32 for c in "abcd"]
    for key in keys:
        store.put(None, key, [os.urandom(1000)])
    store.drop(keys)
    assert len(_spares(store)) == limit // 1000
    assert not any(store._path(k).exists() for k in keys)  # the rest were removed


def test_spares_survive_a_restart_and_are_not_collected(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path / "blobs")
    store.put(None, "a" * 32, [b"x" * 100])
    store.drop(["a" * 32, "f" * 32])  # a key with no file is already forgotten
    with database("sqlite", tmp_path) as url:
        db = Database(make_engine(Settings(database_url=url, data_dir=tmp_path)))
        with db.write("a test") as repo:
            assert DirectoryBlobStore(tmp_path / "blobs").collect(repo) == 0
        db.close()
    again = DirectoryBlobStore(tmp_path / "blobs")
    assert again._take_spare(100) is not None and again._take_spare(100) is None


def _blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file() and "spare" not in p.parts]


def _chunks(server: Any) -> bool:
    with server.registry.ctx.db.read("a test") as repo:
        return bool(repo.any_chunk())


@pytest.mark.parametrize("kind", DATABASES)
def test_the_default_store_is_files_beside_sqlite_and_rows_of_postgresql(tmp_path: Path, kind: str) -> None:

    model = make_model()
    with database(kind, tmp_path) as url, InProcessServer(url, tmp_path) as server, server.client() as client:
        name = new_run(client, model)
        assert step(client, name, 0, make_grads(model, 1)[0]).status_code == 200
        if kind == "sqlite":
            assert isinstance(server.registry.ctx.blobs, DirectoryBlobStore)
            assert _blob_files(tmp_path) and not _chunks(server)
        else:
            assert isinstance(server.registry.ctx.blobs, DatabaseBlobStore)
            assert _chunks(server) and not _blob_files(tmp_path)


def test_a_sqlite_database_that_holds_blobs_keeps_them_under_the_default(tmp_path: Path) -> None:
    """A deployment that started with database blobs, restarted with the default: its runs read as before."""

    model = make_model()
    with database("sqlite", tmp_path) as url:
        with InProcessServer(url, tmp_path, blob_store="database") as server, server.client() as client:
            name = new_run(client, model)
            assert step(client, name, 0, make_grads(model, 1)[0]).status_code == 200
            before = client.get(f"/runs/{name}/digest").json()
        with InProcessServer(url, tmp_path) as server, server.client() as client:
            assert isinstance(server.registry.ctx.blobs, DatabaseBlobStore)
            assert client.get(f"/runs/{name}/digest").json() == before
            assert step(client, name, 1, make_grads(model, 2)[1]).status_code == 200
        assert not _blob_files(tmp_path)
