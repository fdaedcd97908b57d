"""Load and faults: many workers at once, PostgreSQL restarted under a run, a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import timm.optim
import torch

from ..reference import bitwise_equal, initial_params, make_grads, make_model, manifest, set_grads
from ..server import PrivatePostgres, Server, database, decode, encode, migrate

STEPS = 25


def _create(client: httpx.Client, model: torch.nn.Module, name: str) -> None:
    run = {"name": name, "spec": {"params": manifest(model), "optimizer": {"name": "adamw", "lr": 0.01}}, "snapshot_every": 7}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 201, r.text


def _reference(model: torch.nn.Module, grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=0.01)
    for g in grads:
        set_grads(model, g)
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[n], b[n]) for n in a)


def test_16_workers_on_8_runs(tmp_path: Path) -> None:
    runs = {f"load-{i}": make_model(i) for i in range(8)}
    grads = {name: make_grads(model, STEPS, seed=100 + i) for i, (name, model) in enumerate(runs.items())}
    bodies = {name: [encode(g) for g in gs] for name, gs in grads.items()}
    errors: list[str] = []
    health: list[float] = []
    stop = threading.Event()
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        with server.client() as c:
            for name, model in runs.items():
                _create(c, model, name)

        def worker(name: str) -> None:
            # two workers per run race for every step: exactly one applies it, the other is told (replay or 409)
            t = 0
            deadline = time.monotonic() + 120
            with server.client() as c:
                while t < STEPS and time.monotonic() < deadline:
                    r = c.post(f"/runs/{name}/step", params={"t": t}, content=bodies[name][t])
                    if r.status_code == 200:
                        t = int(r.headers["Optim-T"])
                    elif r.status_code == 409:
                        t = r.json()["current_t"]
                    else:
                        errors.append(f"{name} t={t}: {r.status_code} {r.text[:200]}")
                        return

        def poll_health() -> None:
            with server.client() as c:
                while not stop.is_set():
                    start = time.monotonic()
                    if c.get("/healthz", timeout=10).status_code != 200:
                        errors.append("healthz failed")
                    health.append(time.monotonic() - start)
                    time.sleep(0.05)

        poller = threading.Thread(target=poll_health)
        poller.start()
        workers = [threading.Thread(target=worker, args=(name,)) for name in runs for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        poller.join()
        with server.client() as c:
            final = {name: (c.get(f"/runs/{name}").json()["t"], decode(c.get(f"/runs/{name}/params").content)) for name in runs}
        server.stop()
    assert not errors, errors[:5]
    assert len(health) > 5  # /healthz answered throughout (each within its 10 s timeout)
    for i, name in enumerate(runs):
        t, params = final[name]
        assert t == STEPS, f"{name} ended at t={t}"
        assert _same(params, _reference(make_model(i), grads[name])), f"{name}: a step was lost or applied twice"


@pytest.mark.skipif(not Path("/usr/lib/postgresql").exists(), reason="no PostgreSQL installation to start a private server from")
def test_postgres_restarted_during_a_run(tmp_path: Path) -> None:
    model = make_model(11)
    grads = make_grads(model, STEPS, seed=11)
    bodies = [encode(g) for g in grads]
    unavailable: list[httpx.Response] = []
    pg = PrivatePostgres()
    pg.start()
    try:
        url = pg.url
        migrate(url, tmp_path)
        server = Server(url, tmp_path).start()
        with server.client() as c:
            _create(c, model, "pg-restart")
            t = 0
            restarted = False
            deadline = time.monotonic() + 120
            while t < STEPS:
                assert time.monotonic() < deadline, f"the run did not get past t={t} after PostgreSQL came back"
                if t == 10 and not restarted:
                    pg.stop()
                    threading.Timer(2.0, pg.start).start()
                    restarted = True
                r = c.post("/runs/pg-restart/step", params={"t": t}, content=bodies[t])
                if r.status_code == 503:
                    unavailable.append(r)
                    time.sleep(float(r.headers["Retry-After"]) / 4)
                    continue
                assert r.status_code == 200, r.text
                t = int(r.headers["Optim-T"])
            params = decode(c.get("/runs/pg-restart/params").content)
        server.stop()
    finally:
        pg.remove()
    assert unavailable, "no step was in flight while PostgreSQL was down"
    assert all(r.headers.get("Retry-After") and r.json()["error"] == "StorageUnavailable" for r in unavailable)
    assert _same(params, _reference(make_model(11), grads))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


CAN_MOUNT = os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not CAN_MOUNT, reason="mounting a small tmpfs (a disk that fills up) needs root")
def test_a_full_disk_acknowledges_nothing_and_the_run_goes_on(tmp_path: Path) -> None:
    disk = Path(tempfile.mkdtemp(prefix="optim-full-"))
    assert _mount_tmpfs(disk, "10m"), "could not mount a tmpfs"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, disk, ignore_errors=True)
        stack.callback(subprocess.run, ["umount", str(disk)], capture_output=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(512, 512)  # ~1 MiB of parameters: each logged gradient is ~1 MiB
        grads = make_grads(model, 5, seed=3)
        url = f"sqlite:///{tmp_path / 'optim.db'}"  # the database on a disk with room; the blobs on the small one
        migrate(url, tmp_path)
        server = Server(url, disk, blob_store="directory")
        stack.callback(server.kill)  # before the unmount, whatever happens
        server.start()
        with server.client() as c:
            _create(c, model, "full")
            filler = disk / "filler"
            free = shutil.disk_usage(disk).free
            filler.write_bytes(b"\0" * (free - int(2.5 * 1024 * 1024)))
            statuses = []
            for t in range(5):
                before = c.get("/runs/full/digest").json()
                r = c.post("/runs/full/step", params={"t": t}, content=encode(grads[t]))
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert "No space left" in r.json()["detail"] and r.headers["Retry-After"]
                    assert c.get("/runs/full/digest").json() == before  # the run is where it was
                    filler.unlink()  # the operator frees space; the worker retries
                    r = c.post("/runs/full/step", params={"t": t}, content=encode(grads[t]))
                assert r.status_code == 200, r.text
            params = decode(c.get("/runs/full/params").content)
        server.stop()
        assert statuses.count(503) == 1 and statuses[:2] == [200, 200]
        assert _same(params, _reference(_linear(), grads))


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(512, 512)
