"""The Hessian protocol (``optim_core.hessian``, ``optim_client.hessian``): a worker that answers the run's
request with ``hutchinson`` after ``loss.backward(create_graph=True)``, and the engine stepping with those
estimates, are bitwise timm's ``Adahessian`` in-process; the generator and ``p.hess`` resume from a snapshot."""

from __future__ import annotations

import json
from typing import Any

import pytest
import timm.optim
import torch
from torch import nn

from optim_client.hessian import hutchinson, needs_graph
from optim_core import GradientError, NonFiniteGradient, RunState
from optim_core import hessian as engine_hessian
from optim_core.errors import ProtocolRequired
from optim_format.hessian import HessianRequest

from ..reference import assert_tree_bitwise, bitwise_equal, initial_params, manifest

COVERS = ("adahessian", "lookahead_adahessian")  # routed here by test_optimizer_parity
LR, WD, STEPS = 0.05, 0.01, 6
DROP = (3, "head.bias")  # at step 3 this parameter has no gradient: timm neither estimates nor counts it


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 2)
        with torch.no_grad():  # a dead channel: its weights' second derivatives are signed zeros
            self.conv.bias[0] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU: a dead unit's gradient is a product with 0, its derivative a signed zero, which timm adds to 0.0
        return self.head(self.norm(torch.relu(self.conv(x)).flatten(1)))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, generator=g)) for _ in range(steps)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], drop: bool, *, create_graph: bool = True) -> None:
    model.zero_grad(set_to_none=True)
    _loss(model, batch).backward(create_graph=create_graph)
    if drop:
        model.get_parameter(DROP[1]).grad = None


def _options(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "lr": LR, "weight_decay": WD, **kw}


def _reference(name: str, kw: dict[str, Any], steps: int, *, drop: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Cnn()
    base_kw = {k: v for k, v in kw.items() if not k.startswith("lookahead_")}
    opt = timm.optim.create_optimizer_v2(model, opt=name.removeprefix("lookahead_"), lr=LR, weight_decay=WD, **base_kw)
    if name.startswith("lookahead_"):
        opt = timm.optim.Lookahead(opt, k=kw.get("lookahead_k", 6))
    for t, batch in enumerate(_batches(steps)):
        _backward(model, batch, drop and t == DROP[0])
        opt.step()
    return model, opt


class Worker:
    """The worker's loop: its own model, the run's parameters, the request as JSON, ``hutchinson``."""

    def __init__(self) -> None:
        self.model = Cnn()

    def step(self, run: RunState, t: int, batch: tuple[torch.Tensor, torch.Tensor], *, drop: bool = True) -> None:
        request = json.loads(json.dumps(run.hessian_request().to_dict()))  # what travels
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(run.params()[n])
        _backward(self.model, batch, drop and t == DROP[0], create_graph=needs_graph(request))
        hessians = hutchinson(request, self.model.named_parameters())
        grads = {n: p.grad.detach() for n, p in self.model.named_parameters() if p.grad is not None}
        run.apply(grads, t, hessians=hessians)


def _hess_of(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    return {n: p.hess for n, p in model.named_parameters()}  # type: ignore[attr-defined]


def _assert_same(run: RunState, model: nn.Module, opt: torch.optim.Optimizer, what: str) -> None:
    for n, p in model.named_parameters():
        assert bitwise_equal(p, run.params()[n]), f"{what}: parameter {n!r} differs"
    assert_tree_bitwise(opt.state_dict()["state"], run.optimizer.state_dict()["state"], what)
    mine = engine_hessian.state_tree(run)
    assert mine is not None
    assert_tree_bitwise(_hess_of(opt, model), mine["hess"], f"{what}: p.hess")
    base = getattr(opt, "_base_optimizer", opt)
    assert torch.equal(base.generator.get_state(), mine["generator"]["state"]), f"{what}: generator"


CASES = [
    ("adahessian", {"avg_conv_kernel": True}),
    ("adahessian", {"avg_conv_kernel": True, "update_each": 2}),
    ("adahessian", {"avg_conv_kernel": True, "n_samples": 2}),
    ("adahessian", {"avg_conv_kernel": False, "update_each": 2, "n_samples": 2, "hessian_power": 0.5}),
    ("lookahead_adahessian", {"avg_conv_kernel": True, "update_each": 2, "lookahead_k": 2}),
]


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES])
def test_adahessian_by_worker_estimates_is_bitwise_timm(name: str, kw: dict[str, Any]) -> None:
    ref_model, ref_opt = _reference(name, kw, STEPS)
    model = Cnn()
    run = RunState({"params": manifest(model), "optimizer": _options(name, **kw)}, initial_params(model))
    worker = Worker()
    for t, batch in enumerate(_batches(STEPS)):
        worker.step(run, t, batch)
    _assert_same(run, ref_model, ref_opt, name)


@pytest.mark.parametrize("at", [2, 3])
def test_resume_from_a_snapshot_draws_the_same_probes(at: int) -> None:
    kw = {"avg_conv_kernel": True, "update_each": 2, "n_samples": 2}
    ref_model, ref_opt = _reference("adahessian", kw, STEPS)
    model = Cnn()
    first = RunState({"params": manifest(model), "optimizer": _options("adahessian", **kw)}, initial_params(model))
    batches = _batches(STEPS)
    for t in range(at):
        Worker().step(first, t, batches[t])
    resumed = RunState.from_bytes(first.to_bytes())
    assert resumed.digest() == first.digest()
    assert resumed.hessian_request() == first.hessian_request()
    worker = Worker()  # a restarted worker: it knows nothing but what the run tells it
    for t in range(at, STEPS):
        worker.step(resumed, t, batches[t])
    _assert_same(resumed, ref_model, ref_opt, f"resumed at t={at}")


def test_the_request_says_what_timm_will_estimate() -> None:
    model = Cnn()
    run = RunState({"params": manifest(model), "optimizer": _options("adahessian", update_each=2)}, initial_params(model))
    first = run.hessian_request()
    assert first.t == 0 and first.n_samples == 1 and first.z_dtype == "float32"
    order = [names for g in run.groups() for names in g["params"]]  # timm's order: by param group
    assert list(first.params) == order and first.generator_device == "cpu"
    assert HessianRequest.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    batches = _batches(3)
    Worker().step(run, 0, batches[0])
    assert run.hessian_request().params == ()  # update_each=2: step 1 keeps the estimates of step 0
    assert run.hessian_request().generator_state != first.generator_state  # the draws advanced the run's generator


def _fresh(**kw: Any) -> tuple[RunState, Worker, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A run and the gradients and estimates its first step asks for."""
    model = Cnn()
    run = RunState({"params": manifest(model), "optimizer": _options("adahessian", **kw)}, initial_params(model))
    worker = Worker()
    _backward(worker.model, _batches(1)[0], False)
    hessians = hutchinson(run.hessian_request().to_dict(), worker.model.named_parameters())
    grads = {n: p.grad.detach() for n, p in worker.model.named_parameters() if p.grad is not None}
    return run, worker, grads, hessians


def test_bad_estimates_are_refused_and_change_nothing() -> None:
    run, _, grads, hessians = _fresh(avg_conv_kernel=True)
    before = run.digest()
    conv = hessians["conv.weight"]
    missing = {n: h for n, h in hessians.items() if n != "conv.weight"}
    bad = [
        (None, ProtocolRequired, "adahessian needs Hessian-diagonal estimates.*hessian_request"),
        (missing, GradientError, r"Hessian estimate\(s\) for \['conv.weight'\] are missing"),
        (
            {**hessians, "conv.weight": conv[:, :, :2]},
            GradientError,
            r"'conv.weight' is float32 \[3, 2, 2, 3\]; it must be float32 \[3, 2, 3, 3\]",
        ),
        ({**hessians, "conv.weight": conv.double()}, GradientError, "it must be float32"),
        ({**hessians, "conv.weight": conv.to_sparse()}, GradientError, "not a dense tensor"),
        ({**hessians, "nope": conv}, GradientError, r"for \['nope'\] were not asked for"),
        ({**hessians, "conv.weight": torch.full_like(conv, float("nan"))}, NonFiniteGradient, r"conv.weight#hessian"),
    ]
    for given, error, words in bad:
        with pytest.raises(error, match=words):
            run.apply(grads, 0, hessians=given)
        assert run.digest() == before
    # and no estimate for a parameter without a gradient
    without = {n: g for n, g in grads.items() if n != "head.bias"}
    with pytest.raises(GradientError, match=r"\['head.bias'\] were not asked for"):
        run.apply(without, 0, hessians=hessians)
    assert run.digest() == before
    run.apply(grads, 0, hessians=hessians)  # the good ones still go through
    assert run.t == 1


def test_estimates_for_an_optimizer_that_takes_none_are_refused() -> None:
    model = Cnn()
    run = RunState({"params": manifest(model), "optimizer": "adamw"}, initial_params(model))
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ProtocolRequired, match="'adamw' takes no Hessian estimates"):
        run.apply(grads, 0, hessians={"conv.weight": torch.zeros(3, 2, 3, 3)})
    with pytest.raises(ProtocolRequired, match="'adamw' takes no Hessian estimates"):
        run.hessian_request()


def test_a_skipped_step_draws_nothing() -> None:
    """Under ``nonfinite: "skip"`` a step with a NaN is not taken (as GradScaler skips ``step``): neither the
    counters nor the generator move, so the run stays timm's with that step left out."""
    kw = {"update_each": 2}
    model = Cnn()
    spec = {"params": manifest(model), "optimizer": _options("adahessian", **kw), "nonfinite": "skip"}
    run = RunState(spec, initial_params(model))
    batches = _batches(4)
    worker = Worker()
    worker.step(run, 0, batches[0], drop=False)
    request = run.hessian_request()
    nan = {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    assert run.apply(nan, 1, hessians={n: engine_hessian.zeros_for(run, n) for n in request.params}).skipped
    assert run.hessian_request().generator_state == request.generator_state
    worker.step(run, 2, batches[1], drop=False)
    worker.step(run, 3, batches[2], drop=False)
    ref_model, ref = _reference("adahessian", kw, 3, drop=False)
    _assert_same(run, ref_model, ref, "after a skipped step")


def test_the_worker_function_needs_the_graph() -> None:
    model = Cnn()
    run = RunState({"params": manifest(model), "optimizer": _options("adahessian")}, initial_params(model))
    _backward(model, _batches(1)[0], False, create_graph=False)
    with pytest.raises(ValueError, match="create_graph=True"):
        hutchinson(run.hessian_request().to_dict(), model.named_parameters())


def test_an_exported_adahessian_state_loads_back() -> None:
    run, _, grads, hessians = _fresh(update_each=2)
    run.apply(grads, 0, hessians=hessians)
    loaded = run.load_export(run.export())  # its trial step sends estimates for what the request names
    assert loaded.digest() == run.digest()
