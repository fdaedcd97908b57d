"""EMA and SWA equal torch's AveragedModel / SWALR and timm's ModelEmaV3 with the same settings."""

from __future__ import annotations

from typing import Any

import pytest
import timm.optim
import torch
from timm.utils.model_ema import ModelEmaV3
from torch.optim import lr_scheduler as L
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from optim_core import RunState, SpecError

from ..reference import assert_params_bitwise, bitwise_equal, initial_params, make_grads, make_model, manifest, set_grads

STEPS = 24


def _assert_average(ref: torch.nn.Module, got: dict[str, torch.Tensor], what: str) -> None:
    ref_params = dict(ref.module.named_parameters())
    assert set(ref_params) == set(got)
    for n, p in ref_params.items():
        assert bitwise_equal(p, got[n]), f"{what}: {n!r} differs"


@pytest.mark.parametrize(
    "swa",
    [
        {"start": 10, "every": 2, "swa_lr": 0.005, "anneal_steps": 3, "anneal_strategy": "cos"},
        {"start": 5, "every": 1, "swa_lr": 0.02, "anneal_steps": 0, "anneal_strategy": "linear"},
        {"start": 12, "every": 3},
    ],
)
@pytest.mark.parametrize("ema", [{"decay": 0.9}, {"decay": 0.99, "warmup": True, "warmup_power": 0.75}, None])
def test_averages_equal_library(ema: dict[str, Any] | None, swa: dict[str, Any]) -> None:
    model = make_model()
    spec = {
        "params": manifest(model),
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
        "scheduler": {"name": "CosineAnnealingLR", "T_max": 20},
        "ema": ema,
        "swa": swa,
    }
    run = RunState(spec, initial_params(model))
    grads = make_grads(model, STEPS)

    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=0.01, weight_decay=0.05)
    sched = L.CosineAnnealingLR(opt, T_max=20)
    swa_model = AveragedModel(model)
    swa_sched = (
        SWALR(opt, swa_lr=swa["swa_lr"], anneal_epochs=swa["anneal_steps"], anneal_strategy=swa["anneal_strategy"])
        if "swa_lr" in swa
        else None
    )
    ema_model: torch.nn.Module | None = None
    if ema is not None and ema.get("warmup"):
        ema_model = ModelEmaV3(model, decay=ema["decay"], use_warmup=True, warmup_power=ema["warmup_power"])
    elif ema is not None:
        ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema["decay"]))

    for k, g in enumerate(grads):
        set_grads(model, g)
        opt.step()
        t = k + 1
        if t >= swa["start"] and swa_sched is not None:
            swa_sched.step()
        else:
            sched.step()
        if t >= swa["start"] and (t - swa["start"]) % swa["every"] == 0:
            swa_model.update_parameters(model)
        if isinstance(ema_model, ModelEmaV3):
            ema_model.update(model, step=t)
        elif ema_model is not None:
            ema_model.update_parameters(model)

        run.apply(g, k)
        assert run.lrs == [grp["lr"] for grp in opt.param_groups], f"step {t}"
        assert_params_bitwise(model, run.params(), f"step {t}")
        _assert_average(swa_model, run.averages("swa"), f"SWA at step {t}")
        if ema_model is not None:
            _assert_average(ema_model, run.averages("ema"), f"EMA at step {t}")
    assert int(swa_model.n_averaged) > 1
    if ema is None:
        assert run.averages("ema") is None


def test_swa_per_epoch() -> None:
    model = make_model()
    run = RunState(
        {
            "params": manifest(model),
            "optimizer": {"name": "sgd", "lr": 0.1},
            "scheduler": {"name": "StepLR", "interval": "epoch", "step_size": 1, "gamma": 0.5},
            "swa": {"start": 2, "swa_lr": 0.01, "anneal_steps": 1, "interval": "epoch"},
        },
        initial_params(model),
    )
    opt = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.1)
    sched = L.StepLR(opt, step_size=1, gamma=0.5)
    swa_model = AveragedModel(model)
    swa_sched = SWALR(opt, swa_lr=0.01, anneal_epochs=1)
    grads = make_grads(model, 20)
    for epoch in range(1, 5):
        for k in range((epoch - 1) * 5, epoch * 5):
            set_grads(model, grads[k])
            opt.step()
            run.apply(grads[k], k)
        if epoch >= 2:
            swa_sched.step()
            swa_model.update_parameters(model)
        else:
            sched.step()
        run.step_epoch()
        assert run.lrs == [g["lr"] for g in opt.param_groups]
        _assert_average(swa_model, run.averages("swa"), f"epoch {epoch}")
    assert int(swa_model.n_averaged) == 3


@pytest.mark.parametrize(
    ("ema", "message"),
    [
        ({"decay": 1.5}, "ema.decay"),
        ({"decay": 0.9, "warmup_power": 0.5}, "warmup"),
        ({"decay": "high"}, "ema.decay"),
    ],
)
def test_bad_ema_specs(ema: dict[str, Any], message: str) -> None:
    model = make_model()
    with pytest.raises(SpecError, match=message):
        RunState({"params": manifest(model), "optimizer": "sgd", "ema": ema}, initial_params(model))
