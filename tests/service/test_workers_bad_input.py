"""Several workers, bad input (the app in this process): a rank outside [0, world_size), a second world size, a
gradient for a future t, shapes that differ between ranks, another gradient for an applied (rank, t): each a clear
4xx, and nothing changes; a bad spec of workers is refused at creation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ..server import database, decode, encode
from .inprocess import InProcessClient, InProcessServer

SHAPES = {"w": [3, 2], "b": [2]}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessClient]:
    tmp = tmp_path_factory.mktemp("workers")
    with database("sqlite", tmp) as url, InProcessServer(url, tmp) as server, server.client() as c:
        yield c


def _create(client: InProcessClient, name: str, workers: dict[str, Any], optimizer: str = "adamw") -> Any:
    spec = {"params": [{"name": n, "shape": s} for n, s in SHAPES.items()], "optimizer": optimizer, "workers": workers}
    initial = {n: torch.full(s, 0.5) for n, s in SHAPES.items()}
    return client.post("/runs", content=encode(initial, {"run": json.dumps({"name": name, "spec": spec})}))


def _grad(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _step(client: InProcessClient, name: str, t: int, grads: dict[str, torch.Tensor], **query: Any) -> Any:
    return client.post(f"/runs/{name}/step", params={"t": t, **query}, content=encode(grads))


@pytest.mark.parametrize(
    ("workers", "words"),
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": 2, "quorum": 3}, "quorum"),
        ({"world_size": 2, "mode": "round-robin"}, "mode"),
        ({"world_size": 2, "mode": "async", "quorum": 1}, "quorum"),
        ({"world_size": 2, "max_staleness": 1}, "max_staleness"),
        ({"world_size": 2, "straggler_timeout_s": -1}, "straggler_timeout_s"),
    ],
)
def test_bad_workers_specs_are_refused(client: InProcessClient, workers: dict[str, Any], words: str) -> None:
    r = _create(client, "bad-workers", workers)
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert client.get("/runs/bad-workers").status_code == 404


def test_several_workers_cannot_share_a_closure_step(client: InProcessClient) -> None:
    r = _create(client, "lbfgs-ddp", {"world_size": 2}, optimizer="torch.LBFGS")
    assert r.status_code == 422 and "world_size=2" in r.json()["detail"], r.text


def test_bad_senders_are_refused_and_change_nothing(client: InProcessClient) -> None:
    assert _create(client, "ddp", {"world_size": 2, "straggler_timeout_s": 1}).status_code == 201
    before = client.get("/runs/ddp/digest").json()
    cases = [
        (_step(client, "ddp", 0, _grad(0)), 422, "send the step's rank"),
        (_step(client, "ddp", 0, _grad(0), rank=2), 422, "outside [0, 2)"),
        (_step(client, "ddp", 0, _grad(0), rank=0, world_size=4), 409, "world_size=2"),
        (_step(client, "ddp", 5, _grad(0), rank=0), 409, "ahead"),
        (_step(client, "ddp", 0, {"w": torch.ones(2, 3)}, rank=1), 422, "shape"),
        (_step(client, "ddp", 0, {"w": torch.full((3, 2), float("nan"))}, rank=1), 422, "NaN"),
    ]
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["detail"], (words, r.text)
    assert client.get("/runs/ddp/digest").json() == before
    # one-worker runs refuse another world
    assert _create(client, "solo", None).status_code == 201  # type: ignore[arg-type]
    r = _step(client, "solo", 0, _grad(0), rank=1, world_size=2)
    assert r.status_code == 409 and "one worker" in r.json()["detail"]


def test_a_rank_s_applied_gradient_is_answered_again_and_another_one_refused(client: InProcessClient) -> None:
    assert _create(client, "twice", {"world_size": 1}).status_code == 201
    first = _step(client, "twice", 0, _grad(0), rank=0)
    assert first.status_code == 200 and first.headers["Optim-T"] == "1"
    again = _step(client, "twice", 0, _grad(0), rank=0)
    assert again.status_code == 200 and again.headers.get("Optim-Replayed") == "true"
    assert torch.equal(decode(again.content)["w"], decode(first.content)["w"])
    other = _step(client, "twice", 0, _grad(9), rank=0)
    assert other.status_code == 409 and other.json()["reason"] == "other_gradient"
    steps = client.get("/runs/twice/steps").json()["steps"]
    assert [(s["t"], s["contributors"], s["dropped"]) for s in steps] == [(0, [0], [])]
