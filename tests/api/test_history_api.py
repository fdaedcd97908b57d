"""The per-step history through a real server: what ``RemoteOptimizer`` sends (a closure's loss, ``step(loss=)``,
``log(...)``) is what ``GET /runs/{run}/history`` answers, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from optim_client import RemoteOptimizer

from ..reference import make_model
from ..server import DATABASES, Server, database


@pytest.fixture(scope="module", params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"history-api-{request.param}")
    with database(request.param, tmp) as url:
        srv = Server(url, tmp).start()
        yield srv
        srv.stop()


def _loss(model: nn.Module, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    h = model.norm(model.embed(x))
    for block in model.blocks:
        h = torch.relu(block(h))
    return nn.functional.mse_loss(model.head(h), y)


def test_the_worker_s_loss_and_scalars_are_its_history(server: Server) -> None:
    model = make_model()
    run = f"h-{uuid.uuid4().hex[:10]}"
    opt = RemoteOptimizer(model.named_parameters(), url=server.base, run=run, optimizer="adamw", lr=1e-2, weight_decay=0.05)
    sent: dict[str, list[float]] = {"loss": [], "acc": [], "val/loss": []}
    for k in range(9):
        opt.zero_grad()
        if k % 3 == 0:  # a closure's loss is sent as torch's step returns it

            def closure(k: int = k) -> torch.Tensor:
                loss = _loss(model, k)
                loss.backward()
                return loss

            loss = opt.step(closure)
        else:
            loss = _loss(model, k)
            loss.backward()
            if k % 3 == 1:
                opt.log(acc=k / 10)
                opt.log({"val/loss": 2.0 * k})
            opt.step(loss=loss)
        sent["loss"].append(float(loss.detach()))
        if k % 3 == 1:
            sent["acc"].append(k / 10)
            sent["val/loss"].append(2.0 * k)
    opt.close()
    with server.client() as c:
        answer = c.get(f"/runs/{run}/history").json()
    series = answer["series"]
    assert answer["t"] == 9 and answer["bucket"] == 1
    assert series["loss"]["t"] == list(range(9)) and series["loss"]["mean"] == pytest.approx(sent["loss"], rel=1e-6)
    assert series["acc"]["t"] == [1, 4, 7] and series["acc"]["mean"] == sent["acc"]  # each with the step after log()
    assert series["val/loss"]["mean"] == sent["val/loss"]
    assert {"lr/0", "lr/1", "grad_norm", "param_norm", "step_ms", "time"} <= set(series)
    assert "update_norm" not in series  # the default norms are the cheap ones


def test_a_closure_optimizer_records_the_loss_its_step_returned(server: Server) -> None:
    x = nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    run = f"lbfgs-{uuid.uuid4().hex[:10]}"
    opt = RemoteOptimizer([("x", x)], url=server.base, run=run, optimizer="torch.LBFGS", lr=1)
    returned = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        loss.backward()
        return loss

    for k in range(3):
        opt.log(step=float(k))
        returned.append(float(opt.step(closure).detach()))
    opt.close()
    with server.client() as c:
        series = c.get(f"/runs/{run}/history").json()["series"]
    assert series["loss"]["t"] == [0, 1, 2] and series["loss"]["mean"] == pytest.approx(returned)
    assert series["step"]["mean"] == [0.0, 1.0, 2.0]
