"""The memory budget (``OPTIM_MAX_LIVE_BYTES``): runs past it leave memory, least recently used first, and come
back bitwise from the database; listing runs loads none of them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import timm.optim
import torch

from ..reference import bitwise_equal
from ..server import Server, database, decode, encode

MB = 1024 * 1024
RUNS, STEPS = 8, 4  # per wave; two waves
NUMEL = 2_000_000  # per run: 8 MB of parameters, 24 MB of AdamW state
STATE = 3 * 4 * NUMEL + 3 * 4  # parameters, exp_avg, exp_avg_sq (and three step counters)


def rss(server: Server) -> int:
    assert server.proc is not None
    for line in open(f"/proc/{server.serving_pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _shapes() -> dict[str, list[int]]:
    return {"a.weight": [500, 1000], "b.weight": [1000, 1000], "c.weight": [500, 1000]}


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in _shapes().items()}


def _grads(seed: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + t)
    return {n: torch.randn(s, generator=g) for n, s in _shapes().items()}


def _twin(seed: int) -> dict[str, torch.Tensor]:
    params = {n: torch.nn.Parameter(p) for n, p in _params(seed).items()}
    opt = timm.optim.create_optimizer_v2(list(params.values()), opt="adamw", lr=0.01)
    for t in range(STEPS):
        for n, g in _grads(seed, t).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}


class Sampler:
    """The server's resident memory, sampled every 20 ms while it runs."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.server))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wave(
    server: Server, seeds: range, errors: list[str], live: list[tuple[int, int, int]]
) -> dict[int, dict[str, torch.Tensor]]:
    """Runs ``seeds`` created, then stepped round robin by a worker each, taking turns: each step finds its run
    dropped from memory by the ones before it. Their answers."""
    with server.client() as c:
        for i in seeds:
            run = {
                "name": f"budget-{i}",
                "spec": {
                    "params": [{"name": n, "shape": s} for n, s in _shapes().items()],
                    "optimizer": {"name": "adamw", "lr": 0.01},
                },
                "snapshot_every": 3,
            }
            assert c.post("/runs", content=encode(_params(i), {"run": json.dumps(run)})).status_code == 201
    turn = threading.Condition()
    position = {"next": 0}
    answers: dict[int, dict[str, torch.Tensor]] = {}

    def worker(k: int, i: int) -> None:
        with server.client() as client:
            for t in range(STEPS):
                mine = t * len(seeds) + k
                with turn:
                    turn.wait_for(lambda mine=mine: position["next"] == mine)
                r = client.post(f"/runs/budget-{i}/step", params={"t": t}, content=encode(_grads(i, t)))
                if r.status_code != 200:
                    errors.append(f"budget-{i} t={t}: {r.status_code} {r.text[:200]}")
                answers[i] = decode(r.content) if r.status_code == 200 else {}
                listed = [run for run in client.get("/runs").json()["runs"] if run["live"]]
                live.append((t, len(listed), sum(run["state_bytes"] for run in listed)))
                with turn:
                    position["next"] += 1
                    turn.notify_all()

    threads = [threading.Thread(target=worker, args=(k, i)) for k, i in enumerate(seeds)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    return answers


def test_runs_past_the_budget_leave_memory_and_the_server_stays_within_it(tmp_path: Path) -> None:
    """Two waves of eight runs, stepped round robin by a worker each, in a budget of three runs: every run bitwise
    its in-process twin, no more than the budget live, and the second wave (eight more runs, 192 MB more state)
    adds nothing to the server's memory: what it holds is bounded by the budget, not by the runs it serves."""
    budget = int(3.5 * STATE)  # three runs fit, a fourth does not
    errors: list[str] = []
    live: list[tuple[int, int, int]] = []
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, blob_store="directory", env={"OPTIM_MAX_LIVE_BYTES": str(budget)}).start()
        idle = rss(server)
        with Sampler(server) as sampler:
            answers = _wave(server, range(RUNS), errors, live)
            first = sampler.peak
            answers.update(_wave(server, range(RUNS, 2 * RUNS), errors, live))
            second = sampler.peak
        server.stop()
    assert not errors, errors[:3]
    for i, answer in answers.items():
        twin = _twin(i)
        assert all(bitwise_equal(answer[n], twin[n]) for n in twin), f"budget-{i} differs from its twin"
    # runs are created with their parameters only (AdamW's moments come at their first step): once a run has
    # stepped it holds its whole state and three fit; the live ones never hold more than the budget
    assert all(live_bytes <= budget for _, _, live_bytes in live), live
    assert max(count for t, count, _ in live if t >= 1) == 3, live
    print(
        f"idle {idle / MB:.0f} MB; grown after the first wave {(first - idle) / MB:.0f} MB, after the second "
        f"{(second - idle) / MB:.0f} MB; budget {budget / MB:.0f} MB, one run {STATE / MB:.0f} MB"
    )
    assert second - first <= 2 * STATE, f"the second wave grew the server by {(second - first) / MB:.0f} MB"


@pytest.mark.parametrize("count", [200])
def test_runs_are_listed_after_a_restart_without_loading_any(tmp_path: Path, count: int) -> None:
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        spec = {"params": [{"name": "w", "shape": [10_000]}], "optimizer": {"name": "adamw", "lr": 0.01}}
        with server.client() as c:
            for i in range(count):
                run = {"name": f"many-{i}", "spec": spec}
                assert c.post("/runs", content=encode({"w": torch.zeros(10_000)}, {"run": json.dumps(run)})).status_code == 201
                if i % 50 == 0:
                    r = c.post(f"/runs/many-{i}/step", params={"t": 0}, content=encode({"w": torch.ones(10_000)}))
                    assert r.status_code == 200
        server.stop()
        server.start()
        with server.client() as c:
            before = rss(server)
            started = time.perf_counter()
            listed = c.get("/runs").json()["runs"]
            took = time.perf_counter() - started
            after = rss(server)
            one = c.get("/runs/many-50").json()
        server.stop()
    print(f"listed {len(listed)} runs in {took * 1e3:.0f} ms; RSS {before / MB:.0f} -> {after / MB:.0f} MB")
    assert len(listed) == count and not any(r["live"] for r in listed)
    assert [r["t"] for r in listed if r["name"] in ("many-0", "many-1", "many-50")] == [1, 0, 1]
    assert one["t"] == 1 and not one["live"] and one["lr"] == [0.01] and one["state_bytes"] == 3 * 4 * 10_000 + 4
    assert one["groups"][0]["params"] == ["w"] and one["group_sizes"] == [10_000]
    assert after - before < 20 * MB  # 200 runs of 120 KB each would be 24 MB; the answer itself is a few KB
