"""API keys and tenants: another tenant's run does not exist for you; keys are stored hashed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from service.auth import is_loopback

from ..reference import initial_params, make_grads, make_model, manifest
from ..server import Server, database, encode


def _key(url: str, tmp: Path, tenant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", tenant],
        env={"OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": str(tmp), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, str, str]]:
    tmp = tmp_path_factory.mktemp("auth")
    with database("sqlite", tmp) as url:
        alice, bob = _key(url, tmp, "alice"), _key(url, tmp, "bob")
        srv = Server(url, tmp, env={"OPTIM_AUTH": "required"}).start()
        yield srv, alice, bob, url
        srv.stop()


def _as(server: Server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.base, headers=headers, timeout=60)


def test_keys_are_stored_hashed_and_shown_once(secured: tuple[Server, str, str, str]) -> None:
    _, alice, _, url = secured
    assert alice.startswith("osk_") and len(alice) > 40
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(sa.text("SELECT tenant, key_hash, prefix FROM api_key"))]
    engine.dispose()
    assert all(alice not in row and alice[12:] not in "".join(row) for row in stored)
    assert {row[0] for row in stored} >= {"alice", "bob"}


def test_requests_without_a_valid_key_are_refused(secured: tuple[Server, str, str, str]) -> None:
    server, *_ = secured
    for key in (None, "osk_not-a-key"):
        with _as(server, key) as c:
            r = c.get("/runs")
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert r.json()["error"] == "Unauthorized"
    with _as(server, None) as c:
        assert c.get("/healthz").status_code == 200  # liveness needs no key


def test_another_tenants_run_does_not_exist(secured: tuple[Server, str, str, str]) -> None:
    server, alice, bob, _ = secured
    model = make_model()
    run = {"name": "shared-name", "spec": {"params": manifest(model), "optimizer": {"name": "sgd", "lr": 0.1}}}
    body = encode(initial_params(model), {"run": json.dumps(run)})
    grads = encode(make_grads(model, 1)[0])
    with _as(server, alice) as a, _as(server, bob) as b:
        assert a.post("/runs", content=body).status_code == 201
        assert a.post("/runs/shared-name/step", params={"t": 0}, content=grads).status_code == 200
        digest = a.get("/runs/shared-name/digest").json()
        for method, path, kwargs in [
            ("GET", "/runs/shared-name", {}),
            ("GET", "/runs/shared-name/params", {}),
            ("POST", "/runs/shared-name/step", {"params": {"t": 1}, "content": grads}),
            ("POST", "/runs/shared-name/checkpoints", {"json": {"name": "steal"}}),
            ("DELETE", "/runs/shared-name", {}),
        ]:
            r = b.request(method, path, **kwargs)
            assert r.status_code == 404 and r.json()["error"] == "RunNotFound", (method, path, r.text)
        assert "shared-name" not in {r["name"] for r in b.get("/runs").json()["runs"]}
        # bob may have a run of the same name: names are per tenant
        assert b.post("/runs", content=body).status_code == 201
        assert b.get("/runs/shared-name").json()["t"] == 0
        assert a.get("/runs/shared-name/digest").json() == digest


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_which_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback  # off loopback, authentication is always on


def test_auth_is_off_on_loopback_and_the_log_says_so(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        local = Server(url, tmp_path).start()
        with httpx.Client(base_url=local.base) as c:
            assert c.get("/runs").status_code == 200
        local.stop()
        assert "authentication off" in local.log() and "'local'" in local.log()
