"""The optimizers that take more than one gradient per step, through a real server and ``RemoteOptimizer``, bit for
bit against torch and timm in this process: LBFGS by closure round trips (both line searches, on Rosenbrock and a
small MLP), Adahessian by the worker's Hessian estimates (a small CNN), and sparse gradients (an embedding bag)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import timm.optim
import torch
from torch import nn

from optim_client import RemoteOptimizer

from ..reference import bitwise_equal
from ..server import Server, database


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("protocols")
    with database("sqlite", tmp) as url:
        srv = Server(url, tmp, env={"OPTIM_DEFAULT_SNAPSHOT_EVERY": "3"}).start()  # snapshots between closure steps too
        yield srv
        srv.stop()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(bitwise_equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))

    def loss(self, _: int) -> torch.Tensor:
        return rosenbrock(self.x)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(1)
        self.data = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)

    def loss(self, _: int) -> torch.Tensor:
        x, y = self.data
        return nn.functional.mse_loss(self.net(x), y)


def _lbfgs_loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for step in range(steps):

        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            loss = model.loss(step)  # type: ignore[operator]
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("kind", [Point, Mlp])
def test_lbfgs_by_closure_round_trips_is_torch_s_lbfgs(
    server: Server, kind: Callable[[], nn.Module], line_search: str | None
) -> None:
    options = {
        "lr": 1 if kind is Point else 0.5,
        "max_iter": 20 if kind is Point else 8,
        "history_size": 5,
        "line_search_fn": line_search,
    }
    local, remote_model = kind(), kind()
    reference = torch.optim.LBFGS(local.parameters(), **options)
    remote = RemoteOptimizer(
        remote_model.named_parameters(), url=server.base, run=f"lbfgs-{uuid.uuid4().hex[:8]}", optimizer="torch.LBFGS", **options
    )
    assert remote.needs == ["closure"]
    assert _lbfgs_loop(remote_model, remote, 6) == _lbfgs_loop(local, reference, 6)
    assert _same(remote_model, local) and remote.t == 6
    if kind is Point:  # converges as torch's own does
        assert float(rosenbrock(remote_model.x)) < 1e-2  # type: ignore[arg-type]


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 3)
        g = torch.Generator().manual_seed(5)
        self.batches = [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)]

    def loss(self, step: int) -> torch.Tensor:
        x, y = self.batches[step]
        return nn.functional.cross_entropy(self.head(self.conv(x).flatten(1)), y)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("adahessian", {"lr": 0.1, "update_each": 1, "n_samples": 1}),
        ("adahessian", {"lr": 0.1, "update_each": 2, "n_samples": 2}),
        ("lookahead_adahessian", {"lr": 0.1, "update_each": 1, "n_samples": 1}),
    ],
)
def test_adahessian_by_the_worker_s_estimates_is_timm_s(server: Server, name: str, options: dict[str, Any]) -> None:
    local, remote_model = Cnn(), Cnn()
    reference = timm.optim.create_optimizer_v2(local, opt=name, **options)
    remote = RemoteOptimizer(
        remote_model.named_parameters(), url=server.base, run=f"hess-{uuid.uuid4().hex[:8]}", optimizer=name, **options
    )
    assert remote.needs == ["hessian"]
    for step in range(6):
        for model, opt in ((local, reference), (remote_model, remote)):
            opt.zero_grad()
            model.loss(step).backward(create_graph=True)
            opt.step()
        assert _same(remote_model, local), f"{name} {options} differs at step {step}"


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
        self.head = nn.Linear(8, 2)
        g = torch.Generator().manual_seed(7)
        self.batches = [(torch.randint(0, 50, (12,), generator=g), torch.randn(4, 2, generator=g)) for _ in range(5)]

    def loss(self, step: int) -> torch.Tensor:
        words, y = self.batches[step]
        offsets = torch.tensor([0, 3, 6, 9])
        return nn.functional.mse_loss(self.head(self.table(words, offsets)), y)


@pytest.mark.parametrize(
    ("name", "options", "sparse_only"),
    [
        ("torch.SparseAdam", {"lr": 0.05}, True),
        ("torch.SGD", {"lr": 0.1, "momentum": 0.9}, False),
        ("torch.Adagrad", {"lr": 0.1}, False),
    ],
)
def test_sparse_gradients_stay_sparse_and_step_as_in_torch(
    server: Server, name: str, options: dict[str, Any], sparse_only: bool
) -> None:
    local, remote_model = Bag(), Bag()
    cls = getattr(torch.optim, name.removeprefix("torch."))
    # SparseAdam takes sparse gradients only: the dense head gets its own optimizer, here and on the service
    params = (lambda m: [m.table.weight]) if sparse_only else (lambda m: list(m.parameters()))
    reference = cls(params(local), **options)
    named = [("table.weight", remote_model.table.weight)] if sparse_only else list(remote_model.named_parameters())
    remote = RemoteOptimizer(named, url=server.base, run=f"sparse-{uuid.uuid4().hex[:8]}", optimizer=name, **options)
    for step in range(5):
        for model, opt in ((local, reference), (remote_model, remote)):
            opt.zero_grad()
            model.loss(step).backward()
            assert model.table.weight.grad is not None and model.table.weight.grad.is_sparse
            opt.step()
        assert bitwise_equal(remote_model.table.weight, local.table.weight), f"{name} differs at step {step}"
        if not sparse_only:
            assert _same(remote_model, local)


def test_a_dense_only_optimizer_answers_torch_s_refusal_of_a_sparse_gradient(server: Server, tmp_path: Path) -> None:
    model = Bag()
    remote = RemoteOptimizer(model.named_parameters(), url=server.base, run=f"dense-{uuid.uuid4().hex[:8]}", optimizer="adamw")
    model.loss(0).backward()
    with pytest.raises(Exception, match="422") as refused:
        remote.step()
    assert "sparse" in str(refused.value)
    assert remote.t == 0
