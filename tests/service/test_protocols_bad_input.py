"""Bad input to the protocols, over HTTP (the app in this process): a closure evaluation not asked for, a sparse
gradient with indices out of range (and duplicates, which torch coalesces), a Hessian estimate of the wrong shape
or missing: each a clear 4xx, and nothing changes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from optim_format import framing

from ..server import database, decode, encode
from .inprocess import InProcessClient, InProcessServer


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessClient]:
    tmp = tmp_path_factory.mktemp("protocols")
    with database("sqlite", tmp) as url, InProcessServer(url, tmp) as server, server.client() as c:
        yield c


def _create(client: InProcessClient, name: str, optimizer: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    spec = {"params": [{"name": n, "shape": s} for n, s in shapes.items()], "optimizer": optimizer}
    initial = {n: torch.full(s, 0.5) for n, s in shapes.items()}
    r = client.post("/runs", content=encode(initial, {"run": json.dumps({"name": name, "spec": spec})}))
    assert r.status_code == 201, r.text


def _body(grads: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor] | None = None) -> bytes:
    return b"".join(bytes(p) for p in framing.parts(framing.flatten(grads, hessians)))


def _position(client: InProcessClient, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    r = client.get(f"/runs/{name}/params")
    return decode(r.content), dict(r.headers)


def test_closure_evaluations_not_asked_for_are_refused(client: InProcessClient) -> None:
    _create(client, "lbfgs", {"name": "torch.LBFGS", "lr": 0.5, "max_iter": 4}, {"w": [3]})
    grad = {"w": torch.tensor([1.0, -2.0, 0.5])}
    refused = [
        (client.post("/runs/lbfgs/step", params={"t": 0, "loss": 1.0}, content=_body(grad)), 422, "k=0"),
        (client.post("/runs/lbfgs/step", params={"t": 0, "k": 1, "loss": 1.0}, content=_body(grad)), 409, "first evaluation"),
        (client.post("/runs/lbfgs/step", params={"t": 0, "k": 0}, content=_body(grad)), 422, "loss"),
        (
            client.post("/runs/lbfgs/step", params={"t": 0, "k": 0, "loss": 1.0}, content=_body({"w": torch.ones(4)})),
            422,
            "shape",
        ),
    ]
    for r, status, words in refused:
        assert r.status_code == status and words in r.json()["detail"], r.text
    assert client.get("/runs/lbfgs").json()["t"] == 0
    first = client.post("/runs/lbfgs/step", params={"t": 0, "k": 0, "loss": 1.0}, content=_body(grad))
    assert first.status_code == 200 and first.headers["Optim-Evaluate"] == "1" and first.headers["Optim-T"] == "0"
    params, headers = _position(client, "lbfgs")
    assert headers["optim-evaluate"] == "1" and torch.equal(params["w"], decode(first.content)["w"])
    # a retry of evaluation 0 is answered again; another gradient for it, or an evaluation skipped ahead, is a 409
    again = client.post("/runs/lbfgs/step", params={"t": 0, "k": 0, "loss": 1.0}, content=_body(grad))
    assert again.status_code == 200 and again.headers["Optim-Replayed"] == "true" and again.content == first.content
    other = client.post("/runs/lbfgs/step", params={"t": 0, "k": 0, "loss": 1.0}, content=_body({"w": torch.zeros(3)}))
    assert other.status_code == 409 and other.json()["reason"] == "other_gradient"
    ahead = client.post("/runs/lbfgs/step", params={"t": 0, "k": 5, "loss": 1.0}, content=_body(grad))
    assert ahead.status_code == 409 and ahead.json()["expected_k"] == 1
    nan = client.post(
        "/runs/lbfgs/step", params={"t": 0, "k": 1, "loss": 1.0}, content=_body({"w": torch.tensor([float("nan")] * 3)})
    )
    assert nan.status_code == 422 and "NaN" in nan.json()["detail"]
    # mid-step the state is not digested (nor snapshotted): a clear 409, and the step still waits for evaluation 1
    assert client.get("/runs/lbfgs/digest").json()["reason"] == "step_in_progress"
    assert _position(client, "lbfgs")[1]["optim-evaluate"] == "1"
    # and a plain step's k, a closure run's step without one
    _create(client, "plain", {"name": "adamw", "lr": 0.1}, {"w": [3]})
    r = client.post("/runs/plain/step", params={"t": 0, "k": 0}, content=_body(grad))
    assert r.status_code == 422 and "closure" in r.json()["detail"]


@pytest.mark.parametrize(
    ("indices", "words"),
    [([[0, 7]], "out of range"), ([[0, -1]], "out of range"), ([[0.5, 1.0]], "int64")],
)
def test_sparse_gradients_out_of_range_are_refused_and_change_nothing(
    client: InProcessClient, indices: list[list[float]], words: str
) -> None:
    name = f"sparse-{abs(hash(str(indices))) % 10**6}"
    _create(client, name, {"name": "torch.SparseAdam", "lr": 0.1}, {"table": [5, 2]})
    before = client.get(f"/runs/{name}/digest").json()
    dtype = torch.float32 if isinstance(indices[0][0], float) else torch.int64
    entries = {"table#indices": torch.tensor(indices, dtype=dtype), "table#values": torch.ones(2, 2)}
    r = client.post(f"/runs/{name}/step", params={"t": 0}, content=encode(entries))
    assert r.status_code in (400, 422) and words in r.json()["detail"], r.text
    assert client.get(f"/runs/{name}/digest").json() == before


def test_duplicate_coordinates_are_coalesced_as_torch_does(client: InProcessClient) -> None:
    _create(client, "dupes", {"name": "torch.SparseAdam", "lr": 0.1}, {"table": [5, 2]})
    entries = {"table#indices": torch.tensor([[1, 1, 3]]), "table#values": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
    r = client.post("/runs/dupes/step", params={"t": 0}, content=encode(entries))
    assert r.status_code == 200, r.text
    table = torch.nn.Parameter(torch.full((5, 2), 0.5))
    opt = torch.optim.SparseAdam([table], lr=0.1)
    table.grad = torch.sparse_coo_tensor(entries["table#indices"], entries["table#values"], (5, 2))
    opt.step()
    assert torch.equal(decode(r.content)["table"], table.detach())


def test_bad_or_missing_hessian_estimates_are_refused_and_change_nothing(client: InProcessClient) -> None:
    _create(client, "hess", {"name": "adahessian", "lr": 0.1}, {"w": [2, 3], "b": [3]})
    before = client.get("/runs/hess/digest").json()
    grads = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    cases = [
        ({"w": torch.ones(3, 2), "b": torch.ones(3)}, "shape"),
        ({"w": torch.ones(2, 3)}, "missing"),
        ({"w": torch.ones(2, 3), "b": torch.ones(3), "c": torch.ones(1)}, "not asked for"),
        (None, "Hessian"),
    ]
    for hessians, words in cases:
        r = client.post("/runs/hess/step", params={"t": 0}, content=_body(grads, hessians))
        assert r.status_code == 422 and words in r.json()["detail"], (words, r.text)
    assert client.get("/runs/hess/digest").json() == before
    # what the worker needs for its step: the Hessian request, in the safetensors metadata of the parameters
    _, metadata = framing.views(client.get("/runs/hess/params").content)
    request = json.loads(metadata["hessian"])
    assert request["t"] == 0 and sorted(request["params"]) == ["b", "w"] and request["n_samples"] == 1
