"""Bad specs and gradients raise an error that names the bad value, and change nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from optim_core import (
    ExpressionError,
    GradientError,
    NonFiniteGradient,
    RunState,
    SpecError,
    StepMismatch,
    UnknownName,
)

from ..reference import bitwise_equal, initial_params, make_grads, make_model, manifest


def _spec(model: torch.nn.Module, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "params": manifest(model),
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "scheduler": {"name": "LambdaLR", "lr_lambda": "min(1, (step + 1) / 3)"},
        "ema": {"decay": 0.9},
    }
    spec.update(changes)
    return spec


def _params_with(model: torch.nn.Module, **changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = initial_params(model)
    params.update(changes)
    return params


BAD_SPECS = [
    ({"optimizer": {"name": "adamz"}}, UnknownName, "adamz"),
    ({"optimizer": {"name": "adamw", "lr": -1}}, SpecError, "optimizer.lr must be >= 0.0, got -1"),
    ({"optimizer": {"name": "adamw", "betas": [0.9, 1.0]}}, SpecError, r"optimizer.betas\[1\] must be < 1.0, got 1.0"),
    ({"optimizer": {"name": "adamw", "eps": -1e-8}}, SpecError, "optimizer.eps"),
    ({"optimizer": {"name": "adamw", "colour": "red"}}, SpecError, "colour"),
    ({"optimizer": {"name": "sgd", "momentum": 0.0, "nesterov": True}}, SpecError, "'sgd' rejected its options"),
    ({"optimizer": {"name": "torch.Rprop", "weight_decay": 0.1}}, SpecError, "has no weight_decay"),
    ({"optimizer": {"name": "lion", "implementation": "fused"}}, SpecError, "no 'fused' implementation"),
    ({"optimizer": {"name": "adamw", "implementation": "turbo"}}, SpecError, "turbo"),
    # only lookahead_ entries take lookahead_*: elsewhere the class refuses it (it was dropped silently)
    ({"optimizer": {"name": "adamw", "lookahead_k": 5}}, SpecError, "'adamw' rejected its options {lookahead_k=5}: TypeError"),
    # timm's Adafactor without lr steps by relative step sizes: there is no LR for a scheduler or SWALR to scale
    ({"optimizer": {"name": "adafactor"}}, SpecError, r"scheduler 'LambdaLR' scale\(s\) the lr .* relative step size"),
    (
        {"optimizer": {"name": "cadafactor"}, "scheduler": None, "swa": {"start": 2, "swa_lr": 0.01}},
        SpecError,
        r"swa.swa_lr \(SWALR\) scale\(s\).*group\(s\) \[0\]",
    ),
    ({"optimizer": 3}, SpecError, "optimizer must be a name"),
    ({"scheduler": {"name": "CosineAnnealingLRR"}}, UnknownName, "CosineAnnealingLRR"),
    ({"scheduler": {"name": "StepLR"}}, SpecError, "StepLR rejected"),
    ({"scheduler": {"name": "StepLR", "step_size": 3, "last_epoch": 7}}, SpecError, "last_epoch"),
    ({"scheduler": {"name": "cosine", "num_epoch": 3}}, SpecError, "num_epoch"),
    ({"scheduler": {"name": "plateau", "interval": "step"}}, SpecError, "plateau"),
    ({"scheduler": {"name": "StepLR", "step_size": 3, "interval": "hourly"}}, SpecError, "hourly"),
    ({"nonfinite": "ignore"}, SpecError, "nonfinite"),
    ({"swa": {"every": 2}}, SpecError, "start"),
    ({"colour": 1}, SpecError, "colour"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_SPECS)
def test_bad_spec_is_named(changes: dict[str, Any], error: type[Exception], message: str) -> None:
    model = make_model()
    with pytest.raises(error, match=message):
        RunState(_spec(model, **changes), initial_params(model))


# Options torch and timm accept when the optimizer is built and refuse only when it steps: RunState.create takes a
# first step on a miniature of the run, so they are refused before anything is stored (issue 22).
FIRST_STEP_REFUSALS = [
    ({"name": "adamw", "capturable": True}, "AssertionError: If capturable=True"),
    ({"name": "muon", "ns_steps": 2**53}, "muon"),
    ({"name": "torch.Adam", "differentiable": True}, "RuntimeError: a leaf Variable that requires grad"),
    ({"name": "lamb", "max_grad_norm": "odd"}, "TypeError"),
    ({"name": "kron", "preconditioner_update_probability": 0}, "ZeroDivisionError"),
]


@pytest.mark.parametrize(("optimizer", "message"), FIRST_STEP_REFUSALS)
def test_options_refused_at_the_first_step_are_refused_at_creation(optimizer: dict[str, Any], message: str) -> None:
    model = make_model()
    spec = {"params": manifest(model), "optimizer": optimizer}
    RunState(spec, initial_params(model), device="cpu")  # the library builds it...
    with pytest.raises(SpecError, match="fails at its first step") as info:  # ...but could not step it
        RunState.create(spec, initial_params(model), device="cpu")
    assert message in str(info.value) and optimizer["name"] in str(info.value)


def test_create_answers_what_a_service_reads() -> None:
    model = make_model()
    spec = _spec(model, optimizer={"name": "adafactor"}, scheduler=None)
    run, facts = RunState.create(spec, initial_params(model))
    assert facts == run.describe() and facts["t"] == 0 and facts["digest"] == run.digest()
    assert facts["lr"] == [None] and "relative step" in facts["lr_notes"][0] and facts["groups"][0]["lr"] is None
    assert run.optimizer.state_dict()["state"] == {}  # the trial stepped a miniature, not the run


UNSAFE = [
    "__import__('os').system('true')",
    "step.__class__",
    "step.real",
    "(lambda: 1)()",
    "[1, 2][0]",
    "'a' * 10",
    "x + 1",
    "1 / 0",
    "9 ** 9 ** 9",
    "step = 1",
    "1; 2",
    "min(1, key=abs)",
    "True + 1",
    "-1",
    "1" + " + 1" * 600,
    "",
]


@pytest.mark.parametrize("expression", UNSAFE)
def test_unsafe_or_failing_expressions_are_refused(expression: str) -> None:
    model = make_model()
    with pytest.raises(ExpressionError) as info:
        RunState(_spec(model, scheduler={"name": "LambdaLR", "lr_lambda": expression}), initial_params(model))
    assert "lr_lambda" in str(info.value)


def test_bad_manifest_and_initial_values() -> None:
    model = make_model()
    bad_manifests = [
        ([{"name": "a/b", "shape": [2]}], "a/b"),
        ([{"name": "w", "shape": [2]}, {"name": "w", "shape": [3]}], "appears twice"),
        ([{"name": "w", "shape": [-2]}], "shape"),
        ([{"name": "w", "shape": [2], "dtype": "int64"}], "int64"),
        ([{"name": "x" * 600, "shape": [2]}], "512"),
        ([], "non-empty"),
    ]
    for params, message in bad_manifests:
        with pytest.raises(SpecError, match=message):
            RunState(_spec(model, params=params), {})
    with pytest.raises(SpecError, match=r"initial value of 'head.bias' is float32 \[4\]"):
        RunState(_spec(model), _params_with(model, **{"head.bias": torch.zeros(4)}))
    with pytest.raises(SpecError, match="missing"):
        params = initial_params(model)
        del params["head.bias"]
        RunState(_spec(model), params)


@pytest.fixture
def run_and_grads() -> tuple[RunState, dict[str, torch.Tensor]]:
    model = make_model()
    run = RunState(_spec(model), initial_params(model))
    grads = make_grads(model, 3)
    run.apply(grads[0], 0)
    return run, grads[1]


def _with(grads: dict[str, torch.Tensor], name: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = dict(grads)
    out[name] = value
    return out


def _nan(grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    g = grads["head.weight"].clone()
    g[0, 0] = float("nan")
    return _with(grads, "head.weight", g)


BAD_GRADS = [
    (lambda g: _with(g, "head.wieght", g["head.weight"]), GradientError, "unknown parameter name.*head.wieght"),
    (lambda g: _with(g, "head.weight", g["head.weight"].t()), GradientError, r"'head.weight' has shape \[8, 3\].*\[3, 8\]"),
    (lambda g: _with(g, "head.weight", g["head.weight"].double()), GradientError, "float64"),
    (lambda g: _with(g, "head.weight", g["head.weight"].to(torch.int32)), GradientError, "int32.*floating point"),
    (lambda g: _with(g, "head.weight", g["head.weight"].to_sparse()), GradientError, "sparse"),
    (lambda g: _with(g, "head.weight", [[1.0]]), GradientError, "not a tensor"),
    (_nan, NonFiniteGradient, r"\['head.weight'\] contain NaN or Inf"),
    (lambda g: _with(g, "norm.bias", torch.full_like(g["norm.bias"], float("inf"))), NonFiniteGradient, "norm.bias"),
    (lambda g: [1, 2], GradientError, "must map parameter names"),
]


@pytest.mark.parametrize(("corrupt", "error", "message"), BAD_GRADS)
def test_bad_gradients_change_nothing(
    run_and_grads: tuple[RunState, dict[str, torch.Tensor]], corrupt: Any, error: type[Exception], message: str
) -> None:
    run, grads = run_and_grads
    before = run.digest()
    with pytest.raises(error, match=message):
        run.apply(corrupt(grads), 1)
    assert run.digest() == before and run.t == 1
    run.apply(grads, 1)  # and the run goes on
    assert run.t == 2


@pytest.mark.parametrize(("t", "loss"), [(0, None), (2, None), (-1, None), (10**30, None), (True, None), (1, float("nan"))])
def test_wrong_step_or_loss_changes_nothing(run_and_grads: tuple[RunState, dict[str, torch.Tensor]], t: Any, loss: Any) -> None:
    run, grads = run_and_grads
    before = run.digest()
    with pytest.raises((StepMismatch, GradientError)) as info:
        run.apply(grads, t, loss=loss)
    if isinstance(info.value, StepMismatch):
        assert info.value.current_t == 1 and "t=1" in str(info.value)
    assert run.digest() == before


def test_expression_failing_later_is_caught_before_the_step() -> None:
    model = make_model()
    run = RunState(_spec(model, scheduler={"name": "LambdaLR", "lr_lambda": "1 / (3 - step)"}), initial_params(model))
    grads = make_grads(model, 3)
    run.apply(grads[0], 0)
    run.apply(grads[1], 1)
    before = run.digest()
    with pytest.raises(ExpressionError, match=r"step=3.*ZeroDivisionError"):
        run.apply(grads[2], 2)
    assert run.digest() == before and run.t == 2


def test_plateau_without_metric_is_refused_before_anything_changes() -> None:
    model = make_model()
    run = RunState(_spec(model, scheduler={"name": "ReduceLROnPlateau", "interval": "epoch"}), initial_params(model))
    run.apply(make_grads(model, 1)[0], 0)
    before = run.digest()
    with pytest.raises(Exception, match="metric"):
        run.step_epoch()
    assert run.digest() == before and run.epoch == 0
    run.step_epoch(metric=0.5)
    assert run.epoch == 1


def test_nonfinite_skip_policy_counts_a_skipped_step() -> None:
    model = make_model()
    run = RunState(_spec(model, nonfinite="skip"), initial_params(model))
    grads = make_grads(model, 2)
    run.apply(grads[0], 0)
    params, lrs = copy.deepcopy(run.params()), run.lrs
    result = run.apply(_nan(grads[1]), 1)
    assert result.skipped and run.t == 2 and run.skipped_steps == 1
    assert all(bitwise_equal(params[n], p) for n, p in run.params().items())
    assert run.lrs != lrs  # the schedule moves on, as it does when GradScaler skips optimizer.step()


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_narrow_wire_gradients_apply_in_the_parameter_dtype(wire: torch.dtype) -> None:
    model = make_model()
    a = RunState(_spec(model), initial_params(model))
    b = RunState(_spec(model), initial_params(model))
    for k, g in enumerate(make_grads(model, 3)):
        narrow = {n: x.to(wire) for n, x in g.items()}
        a.apply(narrow, k)
        b.apply({n: x.float() for n, x in narrow.items()}, k)
    assert a.digest() == b.digest()


def test_caller_gradients_are_not_modified() -> None:
    model = make_model()
    run = RunState(_spec(model, optimizer={"name": "adan", "lr": 0.1}), initial_params(model))
    grads = make_grads(model, 2)
    kept = copy.deepcopy(grads)
    for k, g in enumerate(grads):
        run.apply(g, k)
    assert all(bitwise_equal(kept[k][n], grads[k][n]) for k in range(2) for n in grads[k])


def test_huge_but_finite_gradients_are_not_taken_for_nonfinite() -> None:
    """The finiteness check looks at each tensor's 2-norm first; a norm that overflows (finite values
    near float32's max) must be checked element by element, not refused."""
    model = make_model()
    run = RunState(_spec(model), initial_params(model))
    grads = make_grads(model, 1)[0]
    huge = torch.full_like(grads["head.weight"], 3e38)
    assert not torch.isfinite(torch.linalg.vector_norm(huge))  # the norm does overflow
    result = run.apply(_with(grads, "head.weight", huge), 0)
    assert not result.skipped and run.t == 1
    with pytest.raises(NonFiniteGradient, match=r"head\.weight"):
        run.apply(_with(_nan(grads), "norm.bias", grads["norm.bias"]), 1)
