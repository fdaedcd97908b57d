"""Parameter groups built from names and shapes equal what timm builds from the model itself."""

from __future__ import annotations

from typing import Any

import pytest
import timm.optim
import torch

from optim_core import RunState, SpecError

from ..reference import initial_params, make_model, manifest

LAYER_RULE = {"stem": "^embed|^norm", "blocks": [[r"^blocks\.(\d+)", None]], "head": [["^head", [99999]]]}


def _timm_style(model: torch.nn.Module, groups: dict[str, Any]) -> torch.nn.Module:
    """Give the model the methods a timm model has, answering what the spec says."""
    if "no_weight_decay" in groups:
        model.no_weight_decay = lambda: set(groups["no_weight_decay"])  # type: ignore[assignment]
    if "layer_rule" in groups:
        matcher = {
            k: v if isinstance(v, str) else [(p, tuple(o) if o else None) for p, o in v] for k, v in groups["layer_rule"].items()
        }
        model.group_matcher = lambda coarse=False: matcher  # type: ignore[assignment]
    return model


def _structure(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[list[str], dict[str, Any]]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [([name_of[id(p)] for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]


CASES = [
    ("adamw", {"weight_decay": 0.05}, {}),
    ("adamw", {"weight_decay": 0.05}, {"filter_bias_and_bn": False}),
    ("adamw", {"weight_decay": 0.0}, {}),
    ("sgd", {"weight_decay": 1e-4}, {"no_weight_decay": ["blocks.0.*"]}),
    ("lamb", {"weight_decay": 0.05}, {"layer_decay": 0.7, "layer_rule": LAYER_RULE, "no_weight_decay": ["blocks.0.*"]}),
    ("adamw", {"weight_decay": 0.05}, {"layer_decay": 0.5, "layer_decay_min_scale": 0.3, "layer_rule": LAYER_RULE}),
    ("lookahead_adamw", {"weight_decay": 0.05}, {"layer_decay": 0.8, "layer_rule": LAYER_RULE}),
    ("muon", {"weight_decay": 0.05}, {"fallback": ["head.*"]}),
]


@pytest.mark.parametrize(("opt", "options", "groups"), CASES)
def test_groups_equal_create_optimizer_v2(opt: str, options: dict[str, Any], groups: dict[str, Any]) -> None:
    model = _timm_style(make_model(), groups)
    run = RunState(
        {"params": manifest(model), "optimizer": {"name": opt, "lr": 0.1, **options}, "param_groups": groups},
        initial_params(model),
    )
    ref = timm.optim.create_optimizer_v2(
        model,
        opt=opt,
        lr=0.1,
        **options,
        filter_bias_and_bn=groups.get("filter_bias_and_bn", True),
        layer_decay=groups.get("layer_decay"),
        layer_decay_min_scale=groups.get("layer_decay_min_scale", 0.0),
        fallback_list=groups.get("fallback", ()),
    )
    mine, theirs = _structure(run.optimizer, run.module), _structure(ref, model)
    assert mine == theirs
    if options["weight_decay"] and groups.get("filter_bias_and_bn", True):
        assert len(theirs) > 1  # the case exercises a split, not one group


def test_explicit_groups_by_name_pattern() -> None:
    model = make_model()
    run = RunState(
        {
            "params": manifest(model),
            "optimizer": {"name": "adamw", "lr": 0.1, "weight_decay": 0.05},
            "param_groups": {"groups": [{"params": ["head.*"], "lr": 0.01}, {"params": "blocks.1.*", "weight_decay": 0.0}]},
        },
        initial_params(model),
    )
    got = _structure(run.optimizer, run.module)
    picked = [(names, {k: opts[k] for k in ("lr", "weight_decay")}) for names, opts in got]
    assert picked == [
        (["head.bias"], {"lr": 0.01, "weight_decay": 0.0}),
        (["head.weight"], {"lr": 0.01, "weight_decay": 0.05}),
        (["blocks.1.weight", "blocks.1.bias"], {"lr": 0.1, "weight_decay": 0.0}),
        (["embed.bias", "norm.weight", "norm.bias", "blocks.0.bias"], {"lr": 0.1, "weight_decay": 0.0}),
        (["embed.weight", "blocks.0.weight"], {"lr": 0.1, "weight_decay": 0.05}),
    ]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"groups": [{"params": ["head.*"]}], "layer_decay": 0.7}, "cannot be combined"),
        ({"layer_rule": {"blocks": [["^blocks\\.(\\d+", None]]}, "layer_decay": 0.7}, "invalid regex"),
        ({"filter_bias_and_bn": "yes"}, "filter_bias_and_bn"),
        ({"groups": [{"params": ["head.*"], "lr": -1}]}, "lr"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_group_specs_are_named(groups: dict[str, Any], message: str) -> None:
    model = make_model()
    with pytest.raises(SpecError, match=message):
        RunState({"params": manifest(model), "optimizer": "adamw", "param_groups": groups}, initial_params(model))
