"""Durability and recovery: kill -9 at random moments loses no acknowledged step and resumes bit for
bit; snapshot-only runs lose at most what they say; a diverging log is refused loudly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import timm.optim
import torch
from alembic import command
from timm.scheduler import create_scheduler_v2
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from service.storage.database import SQLITE_PAGE_SIZE, alembic_config

from ..reference import DEVICES, assert_tree_bitwise, bitwise_equal, initial_params, make_grads, make_model, manifest, set_grads
from ..server import BLOB_STORES, DATABASES, Server, database, decode, encode, migrate

STEPS = 110
SPEC: dict[str, Any] = {
    "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
    "scheduler": {"name": "cosine", "num_epochs": STEPS, "warmup_epochs": 10, "warmup_lr": 1e-4, "min_lr": 1e-5},
    "ema": {"decay": 0.95},
}


def _reference(model: torch.nn.Module, grads: list[dict[str, torch.Tensor]]) -> tuple[torch.optim.Optimizer, AveragedModel]:
    """The uninterrupted in-process run: timm AdamW, timm warm-up + cosine per step, torch EMA."""
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=0.01, weight_decay=0.05)
    sched, _ = create_scheduler_v2(
        opt,
        sched="cosine",
        num_epochs=STEPS,
        warmup_epochs=10,
        warmup_lr=1e-4,
        min_lr=1e-5,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95))
    for k, g in enumerate(grads):
        set_grads(model, g)
        opt.step()
        sched.step_update(num_updates=k + 1)
        ema.update_parameters(model)
    return opt, ema


def _create(client: httpx.Client, model: torch.nn.Module, name: str, **policy: Any) -> None:
    run = {"name": name, "spec": {"params": manifest(model), **SPEC}, **policy}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code in (200, 201), r.text


def _wait_for_snapshot(client: httpx.Client, name: str, *, t: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (last := client.get(f"/runs/{name}").json()["last_snapshot_t"]) != t:
        assert time.monotonic() < deadline, f"no snapshot at t={t} after {timeout} s (last: {last})"
        time.sleep(0.05)


def _send(base: str, name: str, t: int, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as c:
        return c.post(f"/runs/{name}/step", params={"t": t, "loss": 1.0}, content=body)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("blobs", BLOB_STORES)
@pytest.mark.parametrize("db", DATABASES)
def test_kill_9_at_random_moments_resumes_bit_for_bit(db: str, blobs: str, seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    model = make_model(seed)
    # a 4 MB tensor makes each request last long enough for a kill to land in the middle of it
    model.table = torch.nn.Parameter(torch.randn(1_000_000, generator=torch.Generator().manual_seed(seed)) * 0.01)
    grads = make_grads(model, STEPS, seed=seed)
    bodies = [encode(g) for g in grads]
    kills = {k: rng.choice(["between", "during"]) for k in rng.sample(range(1, STEPS), 6)}
    name = "crash"
    with database(db, tmp_path) as url:
        server = Server(url, tmp_path, blob_store=blobs).start()
        with server.client() as client:
            _create(client, model, name, snapshot_every=16)
        acked = 0
        replays = 0
        k = 0
        while k < STEPS:
            mode = kills.pop(k, None)
            if mode == "between":
                server.kill()
            elif mode == "during":
                # a step in flight when the process dies: it may or may not have committed
                outcome: list[Any] = []
                th = threading.Thread(target=_send_into, args=(outcome, server.base, name, k, bodies[k]))
                th.start()
                time.sleep(rng.uniform(0.0, 0.08))
                server.kill()
                th.join()
                if outcome and isinstance(outcome[0], httpx.Response) and outcome[0].status_code == 200:
                    acked = k + 1  # it was acknowledged before the kill: it must survive
            if mode is not None:
                server.start()
                with server.client() as client:
                    t = client.get(f"/runs/{name}").json()["t"]
                assert t >= acked, f"acknowledged step t={acked} lost after kill -9 (run at t={t})"
            r = _send(server.base, name, k, bodies[k])  # the worker's retry of step k
            assert r.status_code == 200, r.text
            replays += r.headers.get("Optim-Replayed") == "true"
            acked = k + 1
            k += 1
        with server.client() as client:
            params = decode(client.get(f"/runs/{name}/params").content)
            ema = decode(client.get(f"/runs/{name}/averages/ema").content)
            run = client.get(f"/runs/{name}").json()
            assert client.post(f"/runs/{name}/checkpoints", json={"name": "end"}).status_code == 201
            exported = torch.load(io.BytesIO(client.get(f"/runs/{name}/checkpoints/end/export").content), weights_only=True)
        server.stop()
    opt, ref_ema = _reference(model, grads)
    print(f"kill -9 test: {replays} replayed retries")
    assert run["t"] == STEPS and server.starts == 7
    assert all(bitwise_equal(p, params[n]) for n, p in model.named_parameters())
    assert all(bitwise_equal(p, ema[n]) for n, p in ref_ema.module.named_parameters())
    assert run["lr"] == [g["lr"] for g in opt.param_groups]
    assert_tree_bitwise(opt.state_dict()["state"], exported["optimizer"]["state"], "optimizer state")


@pytest.mark.parametrize("device", DEVICES)
def test_kill_9_resumes_bit_for_bit_on_each_device(device: str, tmp_path: Path) -> None:
    """The server steps on ``device`` (OPTIM_DEVICE), is killed twice, and ends where the in-process optimizer on the
    same device ends: the GPU path is the code CI runs on the CPU, and is run where a GPU is present."""
    model = make_model(3)
    grads = make_grads(model, STEPS, seed=3)
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, env={"OPTIM_DEVICE": device}).start()
        with server.client() as client:
            _create(client, model, "device", snapshot_every=7)
        for k in range(STEPS):
            if k in (5, 13):
                server.kill()
                server.start()
            r = _send(server.base, "device", k, encode(grads[k]))
            assert r.status_code == 200, r.text
        with server.client() as client:
            params = decode(client.get("/runs/device/params").content)
        server.stop()
    local = make_model(3).to(device)
    _reference(local, [{n: g.to(device) for n, g in step.items()} for step in grads])  # steps local in place
    assert all(bitwise_equal(p.cpu(), params[n]) for n, p in local.named_parameters())


@pytest.mark.parametrize("db", DATABASES)
def test_a_killed_serving_process_is_replaced_on_the_same_port_and_resumes_bit_for_bit(db: str, tmp_path: Path) -> None:
    """kill -9 of the process that serves (between steps, and with a step in flight): its parent forks another one
    that answers on the same port, with nothing restarted by the test, and the run ends bit for bit where torch's."""
    model = make_model(4)
    model.table = torch.nn.Parameter(torch.randn(1_000_000, generator=torch.Generator().manual_seed(4)) * 0.01)
    grads = make_grads(model, STEPS, seed=4)
    bodies = [encode(g) for g in grads]
    kills = {7: "between", 30: "during", 31: "between", 64: "during"}
    with database(db, tmp_path) as url:
        server = Server(url, tmp_path).start()
        assert server.process is not None and server.proc is not None
        parent, serving = server.proc.pid, server.serving_pid
        assert serving != parent
        with server.client() as client:
            _create(client, model, "respawn", snapshot_every=16)
        for k in range(STEPS):
            mode = kills.get(k)
            if mode == "between":
                assert server.process.kill_serving() == [serving]
            elif mode == "during":
                outcome: list[Any] = []
                th = threading.Thread(target=_send_into, args=(outcome, server.base, "respawn", k, bodies[k]))
                th.start()
                time.sleep(0.02)
                assert server.process.kill_serving() == [serving]
                th.join()
            if mode is not None:  # kill_serving returned once the next serving process answered
                assert server.proc.pid == parent and server.proc.poll() is None
                assert server.serving_pid not in (serving, parent)
                serving = server.serving_pid
            r = _send(server.base, "respawn", k, bodies[k])  # the worker's retry, to the same address
            assert r.status_code == 200, r.text
        with server.client() as client:
            params = decode(client.get("/runs/respawn/params").content)
            ema = decode(client.get("/runs/respawn/averages/ema").content)
        log = (tmp_path / "server-0.log").read_text()
        server.stop()
    assert server.starts == 1 and log.count('"event": "respawn"') == len(kills)
    _, ref_ema = _reference(model, grads)
    assert all(bitwise_equal(p, params[n]) for n, p in model.named_parameters())
    assert all(bitwise_equal(p, ema[n]) for n, p in ref_ema.module.named_parameters())


def _send_into(outcome: list[Any], base: str, name: str, t: int, body: bytes) -> None:
    try:
        outcome.append(_send(base, name, t, body))
    except httpx.TransportError as exc:
        outcome.append(exc)


@pytest.mark.parametrize("db", DATABASES)
def test_snapshot_only_runs_lose_at_most_what_they_say(db: str, tmp_path: Path) -> None:
    model = make_model()
    grads = make_grads(model, 12)
    with database(db, tmp_path) as url:
        server = Server(url, tmp_path).start()
        with server.client() as client:
            _create(client, model, "light", durability="snapshot", snapshot_every=5)
            for k in range(12):
                assert client.post("/runs/light/step", params={"t": k}, content=encode(grads[k])).status_code == 200
            _wait_for_snapshot(client, "light", t=10)  # written in the background (at a lower CPU priority)
        server.kill()
        server.start()
        with server.client() as client:
            r = client.post("/runs/light/step", params={"t": 12}, content=encode(grads[0]))
            assert r.status_code == 409 and r.json()["current_t"] == 10  # steps 11 and 12 are gone, as documented
            params = decode(client.get("/runs/light/params").content)
        server.stop()
    _reference(model, grads[:10])
    assert all(bitwise_equal(p, params[n]) for n, p in model.named_parameters())


def test_a_log_that_does_not_reproduce_is_refused_loudly(tmp_path: Path) -> None:
    model = make_model()
    grads = make_grads(model, 3)
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        with server.client() as client:
            _create(client, model, "tampered")
            for k in range(3):
                client.post("/runs/tampered/step", params={"t": k}, content=encode(grads[k]))
        server.kill()
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE event SET checksum = 'not-what-it-was' WHERE seq = 2"))
        engine.dispose()
        server.start()
        with server.client() as client:
            # describing and listing read the database alone: they still answer, and say where the run stands
            assert client.get("/runs/tampered").json()["t"] == 3
            assert [r["name"] for r in client.get("/runs").json()["runs"]] == ["tampered"]
            r = client.get("/runs/tampered/params")  # its state must be recovered: refused
            assert r.status_code == 500 and r.json()["error"] == "RecoveryFailed"
            assert "does not reproduce" in r.json()["detail"] and "t=1" in r.json()["detail"]
            assert client.post("/runs/tampered/step", params={"t": 3}, content=encode(grads[0])).status_code == 500
        server.stop()


def test_directory_store_collects_orphans_at_start(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, blob_store="directory").start()
        model = make_model()
        with server.client() as client:
            _create(client, model, "gc")
            client.post("/runs/gc/step", params={"t": 0}, content=encode(make_grads(model, 1)[0]))
        server.kill()
        orphan = tmp_path / "blobs" / "ab" / ("ab" + uuid.uuid4().hex[2:])
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"written, fsynced, never committed")
        kept = {p.name for p in (tmp_path / "blobs").glob("*/*")} - {orphan.name}
        server.start()
        assert not orphan.exists()
        assert {p.name for p in (tmp_path / "blobs").glob("*/*")} == kept and len(kept) == 2
        with server.client() as client:
            assert client.get("/runs/gc").json()["t"] == 1
        server.stop()


@pytest.mark.parametrize("db", DATABASES)
def test_migrations_up_down_up_and_no_drift(db: str, tmp_path: Path) -> None:
    with database(db, tmp_path) as url:
        cfg = alembic_config(url)
        command.downgrade(cfg, "base")
        engine = sa.create_engine(url)
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        command.upgrade(cfg, "head")
        assert {"run", "event", "snapshot", "checkpoint", "blob_chunk"} <= set(sa.inspect(engine).get_table_names())
        engine.dispose()
        command.check(cfg)  # raises when the models and the migrations disagree


def test_server_refuses_a_database_that_is_not_at_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, tmp_path, revision="0002")
    server = Server(url, tmp_path)
    with pytest.raises(RuntimeError, match=f"OPTIM_DATABASE_URL={url} optim-service migrate"):
        server.start(timeout=60)


def test_rollback_waits_for_a_snapshot_in_flight(tmp_path: Path) -> None:
    """Regression from review: a background snapshot landing after a rollback rewrote the history."""
    model = make_model()
    model.table = torch.nn.Parameter(torch.zeros(3_000_000))  # a slow snapshot
    grads = make_grads(model, 6)
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        with server.client() as client:
            _create(client, model, "race", snapshot_every=1)
            client.post("/runs/race/step", params={"t": 0}, content=encode(grads[0]))
            assert client.post("/runs/race/checkpoints", json={"name": "one"}).status_code == 201
            for k in range(1, 4):
                assert client.post("/runs/race/step", params={"t": k}, content=encode(grads[k])).status_code == 200
            assert client.post("/runs/race/rollback", json={"checkpoint": "one"}).json()["t"] == 1
            digest = client.get("/runs/race/digest").json()
        server.stop()  # a clean stop lets every snapshot in flight land (or be refused) before the process ends
        server.start()
        with server.client() as client:
            assert client.get("/runs/race/digest").json() == digest
            assert client.post("/runs/race/step", params={"t": 1}, content=encode(grads[1])).status_code == 200
        server.stop()


def _page_size(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("PRAGMA page_size").fetchone()[0]


def test_a_new_sqlite_database_gets_large_pages(tmp_path: Path) -> None:
    """Alembic used to create the file before the service's pragmas ran: 4 KiB pages, 3x slower blob writes."""
    migrate(f"sqlite:///{tmp_path / 'new.db'}", tmp_path)
    assert _page_size(tmp_path / "new.db") == SQLITE_PAGE_SIZE


def test_migrate_rebuilds_an_sqlite_file_with_small_pages_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # a file as the earlier versions made it
        conn.execute("PRAGMA page_size=4096")
        conn.execute("CREATE TABLE scratch (x)")
    command.upgrade(alembic_config(url), "head")  # the schema as earlier versions migrated it: pages left as they are
    assert _page_size(path) == 4096
    model = make_model()
    server = Server(url, tmp_path).start()
    with server.client() as client:
        _create(client, model, "kept")
        assert client.post("/runs/kept/step", params={"t": 0}, content=encode(make_grads(model, 1)[0])).status_code == 200
        digest = client.get("/runs/kept/digest").json()
    server.stop()
    env = {**os.environ, "OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4096 -> 65536" in done.stdout
    assert _page_size(path) == SQLITE_PAGE_SIZE
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    server.start()
    with server.client() as client:
        assert client.get("/runs/kept/digest").json() == digest
    server.stop()
