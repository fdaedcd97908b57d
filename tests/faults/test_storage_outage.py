"""The database unavailable, every route of the OpenAPI document called: none answers 500, and once the database
is back every run is bitwise where it was.

SQLite: another connection holds the write lock (``BEGIN EXCLUSIVE``, which in WAL mode still lets readers in:
reads answer, writes are 503). PostgreSQL: a private server of the test's own, stopped (everything that touches
the database is 503). The app runs in this process (``tests/service/inprocess.py``) with a short database
timeout, so that each refused request comes back in a second.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..reference import initial_params, make_grads, make_model, manifest
from ..server import PrivatePostgres, database, encode
from ..service.inprocess import InProcessClient, InProcessServer

RUNS = ("victim", "snapshotted")  # a run that logs its steps, and one that only snapshots
SPEC = {"optimizer": {"name": "adamw", "lr": 0.01}, "ema": {"decay": 0.9}, "scheduler": {"name": "StepLR", "step_size": 2}}


def _setup(client: InProcessClient) -> dict[str, Any]:
    """Two runs at t=3 with a checkpoint each; what the outage's requests need (bodies read before it)."""
    model = make_model()
    grads = make_grads(model, 4)
    for name, durability in zip(RUNS, ("log", "snapshot"), strict=True):
        run = {"name": name, "spec": {"params": manifest(model), **SPEC}, "durability": durability, "snapshot_every": 2}
        assert client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)})).status_code == 201
        for t in range(3):
            assert client.post(f"/runs/{name}/step", params={"t": t}, content=encode(grads[t])).status_code == 200
        assert client.post(f"/runs/{name}/checkpoints", json={"name": "c0"}).status_code == 201
    fresh = {"name": "fresh", "spec": {"params": manifest(model), **SPEC}}
    return {
        "grad": encode(grads[3]),
        "state": client.get("/runs/victim/state").content,
        "create": encode(initial_params(model), {"run": json.dumps(fresh)}),
    }


def _request(method: str, path: str, bodies: dict[str, Any]) -> dict[str, Any]:
    """A request a client could send to this route of the OpenAPI document, on the run ``victim``."""
    url = path.format(run="victim", name="c0", kind="ema")
    kwargs: dict[str, Any] = {}
    if (method, path) == ("POST", "/runs"):
        kwargs["content"] = bodies["create"]
    elif path.endswith("/step") and "schedule" not in path:
        kwargs.update(params={"t": 3}, content=bodies["grad"])
    elif path.endswith("/schedule/step"):
        kwargs["json"] = {"metric": None}
    elif path.endswith("/preview"):
        kwargs["params"] = {"steps": 5}
    elif method == "PUT" and path.endswith("/state"):
        kwargs["content"] = bodies["state"]
    elif method == "POST" and path.endswith("/checkpoints"):
        kwargs["json"] = {"name": "c1"}
    elif path.endswith("/rollback"):
        kwargs["json"] = {"checkpoint": "c0"}
    elif path.endswith("/fork"):
        kwargs["json"] = {"checkpoint": "c0", "name": "forked"}
    return {"method": method, "url": url, **kwargs}


def _digests(client: InProcessClient) -> dict[str, Any]:
    return {name: client.get(f"/runs/{name}/digest").json() for name in RUNS}


def _matrix(server: InProcessServer, outage: Callable[[], contextlib.AbstractContextManager[None]]) -> dict[str, int]:
    with server.client() as client:
        bodies = _setup(client)
        before = _digests(client)
        paths = client.get("/openapi.json").json()["paths"]
        routes = [(m.upper(), p) for p, item in paths.items() for m in item]
        seen: dict[str, int] = {}
        with outage():
            # deletes last: a route that succeeded in the outage (it needs no database) must not hide the others
            for method, path in sorted(routes, key=lambda r: r[0] == "DELETE"):
                r = client.request(**_request(method, path, bodies))
                seen[f"{method} {path}"] = r.status_code
                assert r.status_code < 500 or r.status_code == 503, f"{method} {path}: {r.status_code} {r.text[:300]}"
                if r.status_code == 503 and path != "/readyz":  # the probe says "unavailable" in its own shape
                    assert r.json()["error"] == "StorageUnavailable" and r.headers["Retry-After"], r.text
        # the database is back: every run where it was (a run dropped from memory is recovered from it)
        assert _digests(client) == before
        assert client.get("/runs/victim").json()["t"] == 3
    return seen


def test_sqlite_locked_by_another_connection(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url, InProcessServer(url, tmp_path, database_timeout_s=0.5) as server:

        @contextlib.contextmanager
        def locked() -> Iterator[None]:
            other = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                other.execute("ROLLBACK")
                other.close()

        seen = _matrix(server, locked)
    print(json.dumps(seen, indent=1))
    # writes wait for the lock and give up; reads take no write lock and answer
    assert seen["POST /runs"] == seen["POST /runs/{run}/step"] == seen["POST /runs/{run}/checkpoints"] == 503
    assert seen["GET /runs"] == seen["GET /runs/{run}"] == seen["GET /runs/{run}/checkpoints"] == 200


@pytest.mark.skipif(not Path("/usr/lib/postgresql").exists(), reason="no PostgreSQL installation to start a private server from")
def test_postgresql_stopped(tmp_path: Path) -> None:
    pg = PrivatePostgres()
    pg.start()
    try:
        with InProcessServer(pg.url, tmp_path, database_timeout_s=1, blob_store="directory") as server:

            @contextlib.contextmanager
            def stopped() -> Iterator[None]:
                pg.stop()
                try:
                    yield
                finally:
                    pg.start()

            seen = _matrix(server, stopped)
    finally:
        pg.remove()
    print(json.dumps(seen, indent=1))
    assert seen["POST /runs"] == seen["POST /runs/{run}/step"] == seen["GET /runs"] == seen["GET /runs/{run}"] == 503
    assert seen["GET /healthz"] == 200 and seen["GET /readyz"] == 503
