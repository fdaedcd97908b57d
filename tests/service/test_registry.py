"""The seam to a run's state (``service.runs.registry``): its lock, its memory budget, and slots that go away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import timm.optim
import torch

from service.runs.lock import RunLock

from ..reference import bitwise_equal
from ..server import database, decode, encode
from .inprocess import InProcessServer


def test_readers_share_writers_wait_and_come_first() -> None:
    async def scenario() -> list[str]:
        lock, order = RunLock(), []
        await lock.acquire(write=False)
        await lock.acquire(write=False)  # two readers at once
        writer = asyncio.create_task(lock.acquire(write=True))
        await asyncio.sleep(0.01)
        assert not writer.done()  # waits for both readers
        late_reader = asyncio.create_task(lock.acquire(write=False))
        await asyncio.sleep(0.01)
        assert not late_reader.done()  # a waiting writer keeps new readers out
        await lock.release(write=False)
        await lock.release(write=False)
        await writer
        order.append("writer")
        assert not late_reader.done() and not lock.try_acquire_write()
        await lock.downgrade()  # the writer becomes a reader: the late reader joins it at once
        await late_reader
        order.append("reader")
        await lock.release(write=False)
        await lock.release(write=False)
        assert lock.free and lock.try_acquire_write()
        await lock.release(write=True)
        return order

    assert asyncio.run(scenario()) == ["writer", "reader"]


def test_a_cancelled_writer_does_not_block_readers() -> None:
    async def scenario() -> None:
        lock = RunLock()
        await lock.acquire(write=False)
        writer = asyncio.create_task(lock.acquire(write=True))
        await asyncio.sleep(0.01)
        writer.cancel()  # its client went away while it waited
        await asyncio.sleep(0.01)
        await asyncio.wait_for(lock.acquire(write=False), 1)

    asyncio.run(scenario())


def _create(client, name: str, durability: str = "log", snapshot_every: int = 100) -> None:  # type: ignore[no-untyped-def]
    run = {
        "name": name,
        "spec": {"params": [{"name": "w", "shape": [1000]}], "optimizer": {"name": "adamw", "lr": 0.1}},
        "durability": durability,
        "snapshot_every": snapshot_every,
    }
    assert client.post("/runs", content=encode({"w": torch.zeros(1000)}, {"run": json.dumps(run)})).status_code == 201


def _grad(t: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(1000, generator=torch.Generator().manual_seed(t))}


def _twin(steps: int) -> torch.Tensor:
    w = torch.nn.Parameter(torch.zeros(1000))
    opt = timm.optim.create_optimizer_v2([w], opt="adamw", lr=0.1)
    for t in range(steps):
        w.grad = _grad(t)["w"]
        opt.step()
    return w.detach()


def test_a_run_s_slot_and_lock_go_away_with_it(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url, InProcessServer(url, tmp_path) as server, server.client() as c:
        for i in range(5):
            _create(c, f"gone-{i}")
            assert c.post(f"/runs/gone-{i}/step", params={"t": 0}, content=encode(_grad(0))).status_code == 200
        assert len(server.registry.live_runs()) == 5
        for i in range(5):
            assert c.delete(f"/runs/gone-{i}").status_code == 204
        assert c.get("/runs/gone-0/params").status_code == 404  # asked for after it went: no slot stays behind
        assert server.registry._slots == {} and server.registry.live_runs() == []


@pytest.mark.parametrize("durability", ["log", "snapshot"])
def test_runs_past_the_budget_leave_memory_and_come_back_exact(tmp_path: Path, durability: str) -> None:
    # a run here holds 12 KB (parameters and AdamW's two moments): room for two
    with (
        database("sqlite", tmp_path) as url,
        InProcessServer(url, tmp_path, max_live_bytes=25_000) as server,
        server.client() as c,
    ):
        names = [f"lru-{i}" for i in range(4)]
        for name in names:
            _create(c, name, durability)
        for t in range(3):
            for name in names:
                r = c.post(f"/runs/{name}/step", params={"t": t}, content=encode(_grad(t)))
                assert r.status_code == 200, r.text
                live = {run["name"]: run["state_bytes"] for run in c.get("/runs").json()["runs"] if run["live"]}
                assert sum(live.values()) <= 25_000 and name in live  # the run just served stays; the least recently used go
                assert t == 0 or len(live) == 2  # once every run has its optimizer state, two fit
        assert server.registry.live_bytes() <= 25_000
        # a snapshot-only run wrote its snapshot as it left: nothing it acknowledged is lost
        for name in names:
            assert bitwise_equal(decode(c.get(f"/runs/{name}/params").content)["w"], _twin(3))


@pytest.mark.parametrize("target_s", [0.0, 1e-9])
def test_snapshots_keep_a_run_s_recovery_within_its_target(tmp_path: Path, target_s: float) -> None:
    """OPTIM_RECOVERY_TARGET_S: a target no replay can meet snapshots every step it can (one in flight at a time),
    long before snapshot_every; 0 leaves snapshots to snapshot_every. A recovered run knows its replay rate."""
    with (
        database("sqlite", tmp_path) as url,
        InProcessServer(url, tmp_path, recovery_target_s=target_s) as server,
        server.client() as c,
    ):
        _create(c, "rto", snapshot_every=1000)
        for t in range(6):
            assert c.post("/runs/rto/step", params={"t": t}, content=encode(_grad(t))).status_code == 200
        (live,) = server.registry.live_runs()
        assert live.replay_s > 0  # measured on the live steps
        server.registry.snapshots.wait(live.id)
        last = c.get("/runs/rto").json()["last_snapshot_t"]
        assert (last >= 5) if target_s else (last == 0), last
        assert server.portal is not None
        server.portal.call(server.registry.drop_all)
        assert bitwise_equal(decode(c.get("/runs/rto/params").content)["w"], _twin(6))  # recovered
        (again,) = server.registry.live_runs()
        assert again.load_s > 0 and again.seq - again.last_snapshot_seq == 6 - last
        assert (again.replay_s > 0) == (last < 6)  # measured on the replay, where there was one


def test_a_snapshot_only_run_s_waiting_history_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its history rows wait in memory for its next snapshot: past MAX_UNWRITTEN_HISTORY one is taken early."""
    from service.runs import live as live_module

    monkeypatch.setattr(live_module, "MAX_UNWRITTEN_HISTORY", 10)
    with (
        database("sqlite", tmp_path) as url,
        InProcessServer(url, tmp_path, recovery_target_s=0) as server,
        server.client() as c,
    ):
        _create(c, "quiet", durability="snapshot", snapshot_every=1000)
        for t in range(6):
            r = c.post("/runs/quiet/step", params={"t": t, "loss": 1.0}, content=encode(_grad(t)))
            assert r.status_code == 200
        (live,) = server.registry.live_runs()
        server.registry.snapshots.wait(live.id)
        assert c.get("/runs/quiet").json()["last_snapshot_t"] > 0 and len(live.unwritten_history) < 10 + 8
        losses = c.get("/runs/quiet/history", params={"names": "loss"}).json()["series"]["loss"]
        assert losses["t"] == list(range(live.last_snapshot_t))  # what the snapshots wrote, step by step
