"""The API against a real server process, where only the real server can tell: requests answered while a large
step runs, and a step's answer sent from the live parameters under uvicorn's flow control. The rest of the API
is tested with the app in this process (``tests/service/test_api.py``)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ..reference import bitwise_equal, initial_params, manifest
from ..server import DATABASES, Server, database, decode, encode


@pytest.fixture(scope="module", params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    with database(request.param, tmp) as url:
        # the SQLite server keeps blobs in the database, the PostgreSQL one in a directory: both are exercised
        srv = Server(
            url,
            tmp,
            blob_store="database" if request.param == "sqlite" else "directory",
            env={"OPTIM_MAX_BODY_BYTES": str(4 * 1024 * 1024)},
        )
        srv.start()
        yield srv
        srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


SPEC: dict[str, Any] = {
    "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
    "scheduler": {"name": "cosine", "num_epochs": 40, "warmup_epochs": 4, "warmup_lr": 1e-4},
    "ema": {"decay": 0.9},
}


def new_run(client: httpx.Client, model: torch.nn.Module, **changes: Any) -> str:
    name = f"run-{uuid.uuid4().hex[:10]}"
    run = {"name": name, "spec": {"params": manifest(model), **SPEC, **changes}}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 201, r.text
    return name


def step(client: httpx.Client, name: str, t: int, grads: dict[str, torch.Tensor], **params: Any) -> httpx.Response:
    return client.post(f"/runs/{name}/step", params={"t": t, **params}, content=encode(grads))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[n], b[n]) for n in a)


def test_other_requests_answer_while_a_large_step_runs(server: Server, client: httpx.Client) -> None:
    big = {"w": torch.zeros(1_000_000)}
    name = f"big-{uuid.uuid4().hex[:8]}"
    run = {"name": name, "spec": {"params": [{"name": "w", "shape": [1_000_000]}], "optimizer": {"name": "adamw"}}}
    assert client.post("/runs", content=encode(big, {"run": json.dumps(run)})).status_code == 201
    order: list[str] = []
    slow = threading.Thread(target=lambda: (step(server.client(), name, 0, {"w": torch.ones(1_000_000)}), order.append("step")))
    slow.start()
    while slow.is_alive() and not order:
        if client.get("/healthz").status_code == 200 and "healthz" not in order:
            order.append("healthz")
    slow.join()
    assert order[0] == "healthz" and "step" in order


def _step_read_slowly(port: int, name: str, t: int, grads: dict[str, torch.Tensor], answered: threading.Event) -> bytes:
    """POST a step and read its answer slowly through a small receive buffer, so that most of the answer
    waits in the server's transport while it is read; ``answered`` is set once the answer's headers are in."""
    body = encode(grads)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.connect(("127.0.0.1", port))
        head = f"POST /runs/{name}/step?t={t} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(32 * 1024)
        status, answer = data.split(b"\r\n\r\n", 1)
        assert status.startswith(b"HTTP/1.1 200"), status
        answered.set()
        while chunk := sock.recv(32 * 1024):
            answer += chunk
            time.sleep(0.001)
    return answer


def test_a_step_s_answer_is_its_parameters_while_a_next_step_waits(tmp_path: Path) -> None:
    """A step's answer is sent from the live parameters (no copy) under the run's lock: a next step that
    arrives while the answer is still being read waits for it, and the answer is exactly the step's result
    (the same step on a twin run, read at once). 16 MB of parameters: more than the kernel's socket buffers
    take (4 MB here), so most of the answer waits in the server's transport while the next step arrives."""
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        try:
            with server.client() as client:
                _answers_while_stepping(server, client, 4_000_000)
        finally:
            server.stop()


def _answers_while_stepping(server: Server, client: httpx.Client, n: int) -> None:
    names = [f"live-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        run = {"name": name, "spec": {"params": [{"name": "w", "shape": [n]}], "optimizer": {"name": "adamw", "lr": 0.1}}}
        assert client.post("/runs", content=encode({"w": torch.zeros(n)}, {"run": json.dumps(run)})).status_code == 201
    slow, twin = names
    gen = torch.Generator().manual_seed(3)
    for t in (0, 2, 4):  # each round, two steps: the one read slowly and the next
        grad, later = ({"w": torch.randn(n, generator=gen)} for _ in range(2))
        expected = decode(step(client, twin, t, grad).content)["w"]
        answered = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            reading = pool.submit(_step_read_slowly, server.port, slow, t, grad, answered)
            assert answered.wait(30)
            stepping = pool.submit(step, server.client(), slow, t + 1, later)  # a second worker's next step
            got = decode(reading.result(60))["w"]
            stepped = stepping.result(60)
        assert bitwise_equal(got, expected), f"the answer of step t={t} carried bytes of step t={t + 1}"
        assert stepped.status_code == 200 and not bitwise_equal(decode(stepped.content)["w"], expected)
        assert step(client, twin, t + 1, later).status_code == 200  # the twin keeps up


def test_a_body_cut_off_part_way_leaves_no_log_file_and_changes_nothing(tmp_path: Path) -> None:
    """The default (files beside SQLite) writes a step's body to its log file as it arrives: a worker that dies
    part way through sending it leaves no file behind, the run where it was, and its retry is applied."""
    n = 3_000_000  # 12 MB: several of the body reader's pieces reach the file before the connection drops
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, blob_store="auto").start()
        try:
            with server.client() as client:
                run = {"name": "cut", "spec": {"params": [{"name": "w", "shape": [n]}], "optimizer": {"name": "torch.AdamW"}}}
                assert client.post("/runs", content=encode({"w": torch.zeros(n)}, {"run": json.dumps(run)})).status_code == 201
                assert step(client, "cut", 0, {"w": torch.ones(n)}).status_code == 200
                files = _blob_files(tmp_path)
                digest = client.get("/runs/cut/digest").json()
                body = encode({"w": torch.full((n,), 0.5)})
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    head = f"POST /runs/cut/step?t=1 HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
                    sock.sendall(head.encode() + body[: len(body) * 2 // 3])
                    time.sleep(0.5)  # the pieces that came are written
                deadline = time.monotonic() + 10
                while _blob_files(tmp_path) != files and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _blob_files(tmp_path) == files
                assert client.get("/runs/cut/digest").json() == digest
                assert step(client, "cut", 1, {"w": torch.full((n,), 0.5)}).status_code == 200
        finally:
            server.stop()


def _blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file() and "spare" not in p.parts)
