"""Seeing a running server (issue 20): ``GET /metrics`` scraped and parsed as Prometheus would while a run trains,
its key option, and the JSON lines of the server's log (a request, a background event, no API key)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from optim_client import RemoteOptimizer

from ..reference import make_model
from ..server import Server, database
from .test_isolation import _key


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics``: (name, sorted labels) -> value."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def train(server: Server, run: str, steps: int, **options: Any) -> RemoteOptimizer:
    model = make_model()
    opt = RemoteOptimizer(model.named_parameters(), url=server.base, run=run, optimizer="adamw", lr=1e-2, **options)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(loss=1.0)
    return opt


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("metrics")
    with database("sqlite", tmp) as url:
        srv = Server(url, tmp, env={"OPTIM_LOG_LEVEL": "info"}).start()
        yield srv
        srv.stop()


def test_a_scrape_shows_the_steps_of_a_training_run(server: Server) -> None:
    run = f"m-{uuid.uuid4().hex[:8]}"
    with server.client() as c:
        before = scrape(c)
        opt = train(server, run, 20, snapshot_every=5)
        during = scrape(c)
        for _ in range(7):
            opt.step(loss=1.0)
        stale = c.post(f"/runs/{run}/step", params={"t": 3}, json={"grads": {}})
        assert stale.status_code == 409
        after = scrape(c)
    opt.close()
    for phase in ("receive", "wait", "decode", "step", "log", "encode"):
        bucket = "optim_step_phase_seconds_count"
        assert value(during, bucket, phase=phase) - value(before, bucket, phase=phase) == 20, phase
        assert value(after, bucket, phase=phase) - value(during, bucket, phase=phase) == 7, phase
    assert value(during, "optim_steps_total", tenant="local") - value(before, "optim_steps_total", tenant="local") == 20
    assert value(after, "optim_steps_total", tenant="local") - value(during, "optim_steps_total", tenant="local") == 7
    assert value(after, "optim_step_bytes_total", tenant="local") > value(during, "optim_step_bytes_total", tenant="local")
    conflicts = "optim_rejected_requests_total"
    assert (
        value(after, conflicts, status="409", error="StepConflict") - value(during, conflicts, status="409", error="StepConflict")
        == 1
    )
    assert value(after, "optim_live_runs") >= 1 and value(after, "optim_live_bytes") > 0
    assert value(after, "optim_snapshot_seconds_count") >= 1 and value(after, "optim_snapshot_bytes_total") > 0
    assert not any(dict(labels).get("run") for _, labels in after)  # no run label unless OPTIM_METRICS_PER_RUN


def test_a_recovery_is_counted_and_every_line_of_the_log_is_json(server: Server) -> None:
    run = f"r-{uuid.uuid4().hex[:8]}"
    train(server, run, 6, snapshot_every=4).close()
    server.stop()
    server.start()
    with server.client() as c:
        assert c.get(f"/runs/{run}/params").status_code == 200  # loaded: recovered from its snapshot and log
        samples = scrape(c)
    assert value(samples, "optim_recovery_seconds_count") == 1 and value(samples, "optim_recovery_bytes_total") > 0
    assert value(samples, "optim_recovery_replayed_events_total") >= 1
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]  # each line is JSON
    steps = [x for x in lines if x.get("event") == "request" and x["path"] == f"/runs/{run}/step"]
    assert len(steps) == 6 and [x["t"] for x in steps] == list(range(1, 7))
    for x in steps:
        assert x["status"] == 200 and x["run"] == run and x["tenant"] == "local" and x["method"] == "POST"
        assert x["bytes_in"] > 0 and x["bytes_out"] > 0 and {"receive", "step", "log"} <= set(x["phases"])
    recovered = [x for x in lines if x.get("event") == "recovery" and x.get("run") == run]
    assert len(recovered) == 1 and recovered[0]["t"] == 6 and recovered[0]["replayed"] >= 1
    assert any(x.get("event") == "snapshot" and x.get("run") == run for x in lines)


@pytest.mark.parametrize("option", [{"OPTIM_METRICS_REQUIRE_KEY": "true"}, {}], ids=["option", "default-with-keys"])
def test_the_key_option_and_no_key_in_the_logs(tmp_path: Path, option: dict[str, str]) -> None:
    """The option requires a key; so does a server that requires API keys by default (the scrape names tenants)."""
    with database("sqlite", tmp_path) as url:
        key = _key(url, tmp_path, "alice")
        env = {**option, "OPTIM_AUTH": "required", "OPTIM_LOG_LEVEL": "info"}
        server = Server(url, tmp_path, env=env).start()
        try:
            with server.client() as c:
                assert c.get("/metrics").status_code == 401
                assert c.get("/metrics", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
                ok = c.get("/metrics", headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200 and "optim_steps_total" in ok.text
                assert c.get("/runs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            time.sleep(0.2)
        finally:
            server.stop()
    log = server.log()
    assert key not in log and key[:12] not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert [x["status"] for x in lines if x.get("event") == "request" and x["path"] == "/metrics"] == [401, 401, 200]
    assert any(x.get("event") == "request" and x.get("tenant") == "alice" for x in lines)


def test_the_open_scrape_needs_no_key(server: Server) -> None:
    with server.client() as c:
        assert "optim_live_runs" in {name for name, _ in scrape(c)}
