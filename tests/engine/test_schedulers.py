"""Every scheduler: each group's LR at every step equals torch's / timm's own scheduler stepped the
same way, and a snapshot taken mid-schedule resumes to the same LRs and the same digest."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import timm.optim
import torch
from timm.scheduler import create_scheduler_v2
from torch.optim import lr_scheduler as L

from optim_core import RunState
from optim_core.schedulers import TIMM_SCHEDULERS, TORCH_SCHEDULERS

from ..reference import assert_params_bitwise, initial_params, make_grads, make_model, manifest, set_grads

STEPS, EPOCH_LEN = 30, 5
# a loss that improves, then stalls: plateau schedulers have something to decide
LOSSES = [2.0 - 0.1 * min(k, 8) for k in range(STEPS)]


def _torch(name: str, **kw: Any) -> tuple[dict[str, Any], Callable[[torch.optim.Optimizer], Any]]:
    spec = {"name": name, **kw}
    ctor_kw = {k: v for k, v in kw.items() if k != "interval"}
    return spec, lambda opt: getattr(L, name)(opt, **ctor_kw)


CASES: dict[str, tuple[dict[str, Any], Callable[[torch.optim.Optimizer], Any]]] = {
    "LambdaLR": (
        {"name": "LambdaLR", "lr_lambda": "min(1, (step + 1) / 5)"},
        lambda opt: L.LambdaLR(opt, lambda s: min(1, (s + 1) / 5)),
    ),
    "LambdaLR-per-group": (
        {"name": "LambdaLR", "lr_lambda": ["0.5 ** step", "1 / (1 + step)"]},
        lambda opt: L.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1 / (1 + s)]),
    ),
    "MultiplicativeLR": (
        {"name": "MultiplicativeLR", "lr_lambda": "0.95 if step < 10 else 1"},
        lambda opt: L.MultiplicativeLR(opt, lambda s: 0.95 if s < 10 else 1),
    ),
    "StepLR": _torch("StepLR", step_size=7, gamma=0.5),
    "StepLR-epoch": _torch("StepLR", interval="epoch", step_size=2, gamma=0.5),
    "MultiStepLR": _torch("MultiStepLR", milestones=[5, 12], gamma=0.3),
    "ConstantLR": _torch("ConstantLR", factor=0.5, total_iters=6),
    "LinearLR": _torch("LinearLR", start_factor=0.1, total_iters=8),
    "ExponentialLR": _torch("ExponentialLR", gamma=0.9),
    "PolynomialLR": _torch("PolynomialLR", total_iters=20, power=2.0),
    "CosineAnnealingLR": _torch("CosineAnnealingLR", T_max=10, eta_min=0.001),
    "CyclicLR": _torch("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=4),
    "CosineAnnealingWarmRestarts": _torch("CosineAnnealingWarmRestarts", T_0=5, T_mult=2),
    "OneCycleLR": _torch("OneCycleLR", max_lr=0.2, total_steps=40),
    "ReduceLROnPlateau": _torch("ReduceLROnPlateau", interval="epoch", patience=0, factor=0.5),
    "ReduceLROnPlateau-step": _torch("ReduceLROnPlateau", patience=2, factor=0.5),
    "SequentialLR": (
        {
            "name": "SequentialLR",
            "milestones": [5],
            "schedulers": [
                {"name": "LinearLR", "start_factor": 0.1, "total_iters": 5},
                {"name": "CosineAnnealingLR", "T_max": 20},
            ],
        },
        lambda opt: L.SequentialLR(
            opt, [L.LinearLR(opt, start_factor=0.1, total_iters=5), L.CosineAnnealingLR(opt, T_max=20)], milestones=[5]
        ),
    ),
    "SequentialLR-lambda": (
        {
            "name": "SequentialLR",
            "milestones": [4],
            "schedulers": [{"name": "LambdaLR", "lr_lambda": "(step + 1) / 4"}, {"name": "ExponentialLR", "gamma": 0.9}],
        },
        lambda opt: L.SequentialLR(
            opt, [L.LambdaLR(opt, lambda s: (s + 1) / 4), L.ExponentialLR(opt, gamma=0.9)], milestones=[4]
        ),
    ),
    "ChainedScheduler": (
        {
            "name": "ChainedScheduler",
            "schedulers": [{"name": "ConstantLR", "factor": 0.5, "total_iters": 4}, {"name": "ExponentialLR", "gamma": 0.95}],
        },
        lambda opt: L.ChainedScheduler(
            [L.ConstantLR(opt, factor=0.5, total_iters=4), L.ExponentialLR(opt, gamma=0.95)], optimizer=opt
        ),
    ),
}


def _timm(name: str, interval: str = "step", **kw: Any) -> tuple[dict[str, Any], Callable[[torch.optim.Optimizer], Any]]:
    spec = {"name": name, "interval": interval, **kw}
    ctor_kw = {"updates_per_epoch": 1, **kw} if interval == "step" else kw
    return spec, lambda opt: create_scheduler_v2(opt, sched=name, step_on_epochs=interval == "epoch", **ctor_kw)[0]


CASES.update(
    {
        "cosine": _timm("cosine", num_epochs=20, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-3),
        "cosine-epoch": _timm("cosine", "epoch", num_epochs=4, warmup_epochs=1, warmup_lr=1e-4),
        "cosine-noise": _timm("cosine", num_epochs=20, noise=[0.3, 0.9], noise_std=0.5),
        "cosine-cycles": _timm("cosine", num_epochs=8, cycle_limit=3, cycle_decay=0.5),
        "tanh": _timm("tanh", num_epochs=20, warmup_epochs=2),
        "step": _timm("step", decay_epochs=5, decay_rate=0.5, warmup_epochs=2),
        "constant": _timm("constant", warmup_epochs=3),
        "multistep": _timm("multistep", decay_milestones=[5, 12], decay_rate=0.3),
        "plateau": _timm("plateau", "epoch", patience_epochs=0, decay_rate=0.5, plateau_mode="min", warmup_epochs=1),
        "poly": _timm("poly", num_epochs=20, decay_rate=2.0, warmup_epochs=2),
        "wsd": _timm("wsd", num_epochs=20, warmup_epochs=3, decay_epochs=0.3),
        "rsqrt": _timm("rsqrt", num_epochs=20, warmup_epochs=3),
        "timm-updates-per-epoch": _timm("cosine", num_epochs=6, warmup_epochs=1, updates_per_epoch=EPOCH_LEN),
    }
)


def test_cases_cover_every_scheduler() -> None:
    covered = {spec["name"] for spec, _ in CASES.values()}
    covered |= {c["name"] for spec, _ in CASES.values() for c in spec.get("schedulers", [])}
    assert set(TORCH_SCHEDULERS) | set(TIMM_SCHEDULERS) <= covered


def _run(spec: dict[str, Any]) -> tuple[RunState, torch.nn.Module]:
    model = make_model()
    run = RunState(
        {"params": manifest(model), "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4}, "scheduler": spec},
        initial_params(model),
    )
    return run, model


def _metric(epoch: int) -> float:
    return LOSSES[min(epoch * EPOCH_LEN, STEPS - 1)]


def _drive_engine(run: RunState, grads: list[dict[str, torch.Tensor]], start: int, stop: int, lrs: list[list[float]]) -> RunState:
    for k in range(start, stop):
        run.apply(grads[k], k, loss=LOSSES[k])
        if (k + 1) % EPOCH_LEN == 0:
            run.step_epoch(metric=_metric(run.epoch))
        lrs.append(run.lrs)
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_lr_every_step_equals_library(case: str) -> None:
    spec, make_ref = CASES[case]
    run, model = _run(spec)
    grads = make_grads(model, STEPS)
    ref_opt = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=1e-4)
    ref = make_ref(ref_opt)
    is_timm = spec["name"] in TIMM_SCHEDULERS
    plateau = spec["name"] in ("ReduceLROnPlateau", "plateau")
    interval = spec.get("interval", "step")
    expected, got = [], []
    epoch = 0
    for k in range(STEPS):
        set_grads(model, grads[k])
        ref_opt.step()
        if is_timm:  # timm's own train loop: step_update after every update, step(epoch + 1) per epoch
            ref.step_update(num_updates=k + 1, metric=LOSSES[k])
        elif interval == "step":
            ref.step(LOSSES[k]) if plateau else ref.step()
        if (k + 1) % EPOCH_LEN == 0:
            metric = _metric(epoch)
            epoch += 1
            if is_timm:
                ref.step(epoch, metric)
            elif interval == "epoch":
                ref.step(metric) if plateau else ref.step()
        expected.append([g["lr"] for g in ref_opt.param_groups])
    _drive_engine(run, grads, 0, STEPS, got)
    assert got == expected
    assert len({tuple(x) for x in expected}) > 1, "the case must move the LR"
    assert_params_bitwise(model, run.params(), case)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_mid_schedule_is_exact(case: str) -> None:
    spec, _ = CASES[case]
    run, model = _run(spec)
    grads = make_grads(model, STEPS)
    straight: list[list[float]] = []
    _drive_engine(run, grads, 0, STEPS, straight)

    half, _ = _run(spec)
    resumed: list[list[float]] = []
    _drive_engine(half, grads, 0, 13, resumed)
    restored = RunState.from_bytes(half.to_bytes())
    assert restored.digest() == half.digest()
    _drive_engine(restored, grads, 13, STEPS, resumed)
    assert resumed == straight
    assert restored.digest() == run.digest()
    assert all(math.isfinite(x) for lrs in straight for x in lrs)
