"""A step's gradient written to its log file as the body arrives (``storage.streams``): read back whole, on a
spare's blocks when one fits, published only when every byte came and it was synced; a body the step does not
take leaves no file behind. Against the real file system and the app in this process."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from service.errors import StorageUnavailable
from service.storage import streams
from service.storage.blobs import DirectoryBlobStore, read_into

from ..reference import bitwise_equal
from ..server import database, decode, encode
from .inprocess import InProcessClient, InProcessServer

KEY = "a" * 32


@pytest.fixture
def writers() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def _read(store: DirectoryBlobStore, key: str) -> bytes:
    return bytes(read_into(store, None, key, lambda n: memoryview(bytearray(n))))


def _files(root: Path) -> list[Path]:
    """The blobs' files (spares apart)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "spare" not in p.parts)


# piece sizes, with the kernel told to write back every 16 bytes: none, one, several across that, uneven ones
LAYOUTS = {"empty": [], "one piece": [40], "pieces across writebacks": [10, 10, 10, 10, 3], "uneven": [1, 31, 64, 2]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_streamed_blob_reads_back_as_the_pieces_fed(
    tmp_path: Path, writers: ThreadPoolExecutor, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "FLUSH_BYTES", 16)
    data = os.urandom(sum(LAYOUTS[layout]))
    buf, pos = memoryview(bytearray(data)), 0
    store = DirectoryBlobStore(tmp_path)
    stream = store.open_stream(KEY, len(data), writers)
    for n in LAYOUTS[layout]:
        stream.feed(buf[pos : pos + n])
        pos += n
    assert stream.close().result(10) == len(data)
    assert stream.written.done()
    assert _read(store, KEY) == data
    assert _files(tmp_path) == [store._path(KEY)]  # published under its key, no temporary file left


def test_a_streamed_blob_rewrites_a_spare_of_its_size(tmp_path: Path, writers: ThreadPoolExecutor) -> None:
    store = DirectoryBlobStore(tmp_path)
    store.put(None, "b" * 32, [b"x" * 5000])
    inode = store._path("b" * 32).stat().st_ino
    store.drop(["b" * 32])
    stream = store.open_stream(KEY, 5000, writers)
    stream.feed(memoryview(b"y" * 5000))
    assert stream.close().result(10) == 5000
    assert _read(store, KEY) == b"y" * 5000
    assert store._path(KEY).stat().st_ino == inode
    assert list(store.spare_dir.iterdir()) == []


@pytest.mark.parametrize("spare", [False, True])
def test_a_cancelled_stream_publishes_nothing(tmp_path: Path, writers: ThreadPoolExecutor, spare: bool) -> None:
    """A body that did not arrive whole, or that no step took: its file goes (a spare's back to the spares)."""
    store = DirectoryBlobStore(tmp_path)
    if spare:
        store.put(None, "b" * 32, [b"x" * 100])
        store.drop(["b" * 32])
    stream = store.open_stream(KEY, 100, writers)
    stream.feed(memoryview(b"z" * 60))
    stream.cancel()
    stream.written.result(10)
    with pytest.raises(StorageUnavailable, match="cancelled"):
        stream.durable.result(10)
    assert _files(tmp_path) == []
    assert len(list(store.spare_dir.iterdir())) == int(spare)


def test_a_stream_shorter_than_its_size_is_not_published(tmp_path: Path, writers: ThreadPoolExecutor) -> None:
    store = DirectoryBlobStore(tmp_path)
    stream = store.open_stream(KEY, 100, writers)
    stream.feed(memoryview(b"z" * 99))
    with pytest.raises(StorageUnavailable, match="99 bytes were written of 100"):
        stream.close().result(10)
    assert _files(tmp_path) == []


def test_a_stream_cancelled_after_it_was_closed_is_dropped(tmp_path: Path, writers: ThreadPoolExecutor) -> None:
    """The route closes the stream once the body is in; a step that then refuses it cancels it: the file goes
    whether the cancel came before or after its sync."""
    store = DirectoryBlobStore(tmp_path)
    for key, wait in (("c" * 32, False), ("d" * 32, True)):
        stream = store.open_stream(key, 10, writers)
        stream.feed(memoryview(b"q" * 10))
        durable = stream.close()
        if wait:
            durable.result(10)
        stream.cancel()
    assert _eventually(lambda: _files(tmp_path) == [])


def test_a_closed_stream_takes_no_more_pieces(tmp_path: Path, writers: ThreadPoolExecutor) -> None:
    stream = DirectoryBlobStore(tmp_path).open_stream(KEY, 1, writers)
    stream.feed(memoryview(b"a"))
    stream.close().result(10)
    with pytest.raises(RuntimeError, match="closed"):
        stream.feed(memoryview(b"b"))


# ------------------------------------------------------------------------------------------------ in the service
N = 3_000_000  # 12 MB of gradient: several of the body reader's pieces


def _new_run(client: InProcessClient, name: str) -> None:
    run = {"name": name, "spec": {"params": [{"name": "w", "shape": [N]}], "optimizer": {"name": "torch.AdamW", "lr": 0.01}}}
    r = client.post("/runs", content=encode({"w": torch.zeros(N)}, {"run": json.dumps(run)}))
    assert r.status_code == 201, r.text


def _eventually(check: Callable[[], bool], timeout: float = 10) -> bool:
    """``check()`` within ``timeout`` seconds (a cancelled stream's file is removed by a log writer thread)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_large_steps_logged_as_they_arrive_recover_bitwise(tmp_path: Path) -> None:
    """Every step's body is one file, named by its log record; a restart replays them to the same state as the
    reference (torch's AdamW in this process)."""
    w = torch.nn.Parameter(torch.zeros(N))
    reference = torch.optim.AdamW([w], lr=0.01)
    gen = torch.Generator().manual_seed(5)
    with database("sqlite", tmp_path) as url:
        with InProcessServer(url, tmp_path) as server, server.client() as client:
            assert isinstance(server.registry.ctx.blobs, DirectoryBlobStore)
            _new_run(client, "big")
            for t in range(3):
                grad = torch.randn(N, generator=gen)
                r = client.post("/runs/big/step", params={"t": t}, content=encode({"w": grad}))
                assert r.status_code == 200, r.text
                w.grad = grad
                reference.step()
                assert bitwise_equal(decode(r.content)["w"], w.detach())
            before = client.get("/runs/big/digest").json()
            live = server.registry.live("local", "big")
            assert live is not None
            with server.registry.ctx.db.read("a test") as repo:
                keys = [e.blob_key for e in repo.events_after(live.id, 0) if e.kind == "step"]
            assert len(keys) == 3
            for key, size in zip(keys, [len(encode({"w": torch.zeros(N)}))] * 3, strict=True):
                assert server.registry.ctx.blobs._path(key).stat().st_size == size  # type: ignore[attr-defined]
        with InProcessServer(url, tmp_path) as server, server.client() as client:
            assert client.get("/runs/big/digest").json() == before  # recovered: the snapshot of t=0, then the log
            assert bitwise_equal(decode(client.get("/runs/big/params").content)["w"], w.detach())


@pytest.mark.parametrize("how", ["stale", "ahead", "not safetensors"])
def test_a_refused_large_step_leaves_no_log_file(tmp_path: Path, how: str) -> None:
    with database("sqlite", tmp_path) as url, InProcessServer(url, tmp_path) as server, server.client() as client:
        _new_run(client, "big")
        body = encode({"w": torch.ones(N)})
        assert client.post("/runs/big/step", params={"t": 0}, content=body).status_code == 200
        files, digest = _files(tmp_path / "blobs"), client.get("/runs/big/digest").json()
        refused = {"stale": (0, encode({"w": torch.full((N,), 2.0)})), "ahead": (5, body), "not safetensors": (1, b"x" * N)}
        t, content = refused[how]
        r = client.post("/runs/big/step", params={"t": t}, content=content)
        assert r.status_code in (400, 409), r.text
        assert _eventually(lambda: _files(tmp_path / "blobs") == files)
        assert client.get("/runs/big/digest").json() == digest
