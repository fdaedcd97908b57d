"""Every catalogue entry over HTTP (the app in this process): created with its library's defaults alone it answers
201 and steps (the way it steps: a closure evaluation, Hessian estimates, sparse gradients); one odd value for
each of its hyper-parameters never gets a 5xx from create, step or read; and ``GET /runs`` answers 200 after each.

The odd values are the engine fuzz's (``tests/engine/test_fuzz_specs.py``), one a hyper-parameter here: the engine
test walks them all without HTTP; this one proves the service answers what the engine raises.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from optim_core import get_optimizer
from optim_format import framing

from ..engine.test_fuzz_specs import ENTRIES, ODD_VALUES
from ..reference import initial_params, make_model, manifest
from ..server import database, encode
from .inprocess import InProcessClient, InProcessServer

pytestmark = pytest.mark.slow  # ~2,000 runs created: a few minutes


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessClient]:
    tmp = tmp_path_factory.mktemp("catalogue")
    with database("sqlite", tmp) as url, InProcessServer(url, tmp) as server, server.client() as c:
        yield c


def _step_body(name: str, model: torch.nn.Module, client: InProcessClient, run: str) -> tuple[dict[str, Any], bytes]:
    """A first step the way the entry steps: query and body."""
    entry = get_optimizer(name)
    grads = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    hessians = None
    params: dict[str, Any] = {"t": 0, "loss": 1.0}
    if "sparse_grad" in entry.needs:
        grads = {n: g.to_sparse(1) for n, g in grads.items()}
    if "closure" in entry.needs:
        params["k"] = 0
    if "hessian" in entry.needs:
        _, metadata = framing.views(client.get(f"/runs/{run}/params").content)
        requested = json.loads(metadata["hessian"])["params"]
        hessians = {n: torch.zeros_like(grads[n]) for n in requested}
    body = b"".join(bytes(p) for p in framing.parts(framing.flatten(grads, hessians)))
    return params, body


def _try(client: InProcessClient, name: str, optimizer: dict[str, Any]) -> int:
    """Create, step, describe: each answer below 500 (their error shape whole); the create's status."""
    entry = get_optimizer(name)
    model = make_model(only_2d="2d_params" in entry.needs)
    run = f"fuzz-{uuid.uuid4().hex[:10]}"
    body = {"name": run, "spec": {"params": manifest(model), "optimizer": optimizer}}
    created = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(body)}))
    answers = [created]
    if created.status_code == 201:
        query, grads = _step_body(name, model, client, run)
        answers.append(client.post(f"/runs/{run}/step", params=query, content=grads))
        answers.append(client.get(f"/runs/{run}"))
        answers.append(client.get(f"/runs/{run}/schedule"))
    answers.append(client.get("/runs"))
    for r in answers:
        assert r.status_code < 500, f"{optimizer}: {r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            assert set(r.json()) >= {"error", "detail"} and r.json()["detail"], r.text
    assert answers[-1].status_code == 200  # one run cannot poison the listing
    return created.status_code


@pytest.mark.parametrize("name", ENTRIES)
def test_every_entry_is_answered_over_http(client: InProcessClient, name: str) -> None:
    entry = get_optimizer(name)
    defaults = _try(client, name, {"name": name})
    assert defaults == (422 if entry.required else 201), f"{name} with its library's defaults: {defaults}"
    statuses = []
    for index, hyperparameter in enumerate(entry.hyperparameters):
        options: dict[str, Any] = {"name": name, hyperparameter: ODD_VALUES[(index + len(name)) % len(ODD_VALUES)]}
        if entry.required and hyperparameter not in entry.required:
            options.update({r: 0.01 for r in entry.required})
        statuses.append(_try(client, name, options))
    assert set(statuses) <= {201, 422}, statuses
