"""The per-step history through kill -9: a server killed at random moments of a run (between steps and while one
is in flight), restarted and retried, leaves the same history as a run that was never interrupted (but for
wall times and latencies), with no step recorded twice."""

from __future__ import annotations

import json
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ..reference import initial_params, make_grads, make_model, manifest
from ..server import DATABASES, Server, database, encode

STEPS = 60
SPEC: dict[str, Any] = {
    "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
    "scheduler": {"name": "cosine", "num_epochs": STEPS, "warmup_epochs": 5, "warmup_lr": 1e-4},
}
TIMED = {"time", "step_ms"}  # differ between any two runs


def _create(client: httpx.Client, model: torch.nn.Module, name: str) -> None:
    run = {"name": name, "spec": {"params": manifest(model), **SPEC}, "snapshot_every": 25}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code in (200, 201), r.text


def _step(client: httpx.Client, name: str, t: int, grads: dict[str, torch.Tensor]) -> httpx.Response:
    headers = {"Optim-Scalars": json.dumps({"acc": t / STEPS})}
    return client.post(
        f"/runs/{name}/step", params={"t": t, "loss": 1.0 / (t + 1), "return": "none"}, content=encode(grads), headers=headers
    )


def _history(client: httpx.Client, name: str) -> dict[str, Any]:
    series = client.get(f"/runs/{name}/history").json()["series"]
    return {k: v for k, v in series.items() if k not in TIMED}


@pytest.mark.parametrize("db", DATABASES)
def test_history_after_kill_9_equals_an_uninterrupted_run_s(db: str, tmp_path: Path) -> None:
    model = make_model()
    grads = make_grads(model, STEPS)
    rng = random.Random(20)
    kills = sorted(rng.sample(range(5, STEPS - 5), 3))
    with database(db, tmp_path) as url:
        server = Server(url, tmp_path).start()
        try:
            with server.client() as c:
                _create(c, model, "calm")
                for t in range(STEPS):
                    assert _step(c, "calm", t, grads[t]).status_code == 200
                expected = _history(c, "calm")
            name = f"killed-{uuid.uuid4().hex[:8]}"
            t = 0
            with server.client() as c:
                _create(c, model, name)
            while t < STEPS:
                if kills and t == kills[0]:
                    kills.pop(0)
                    # kill while a step is in flight (it may or may not have been committed), or between two steps
                    if rng.random() < 0.5:
                        sender = threading.Thread(target=lambda t=t: _quietly(server.base, name, t, grads[t]))
                        sender.start()
                        threading.Event().wait(rng.uniform(0.0, 0.05))
                        server.kill()
                        sender.join()
                    else:
                        server.kill()
                    server.start()
                with server.client() as c:
                    r = _step(c, name, t, grads[t])  # a retry of a step the killed server had applied is answered again
                    assert r.status_code == 200, r.text
                t += 1
            with server.client() as c:
                got = _history(c, name)
        finally:
            server.stop()
    assert got.keys() == expected.keys()
    for key, series in expected.items():
        assert got[key]["t"] == list(range(STEPS)) and got[key]["count"] == [1] * STEPS, key
        assert got[key]["mean"] == series["mean"], key  # the same bits: the replay is exact


def _quietly(base: str, name: str, t: int, grads: dict[str, torch.Tensor]) -> None:
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            _step(c, name, t, grads)
    except httpx.HTTPError:
        pass  # the server died under it
