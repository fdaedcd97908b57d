"""Parameters by name, parameter groups, and building the optimizer through timm / torch.

The parameters of a run live in a :class:`ParamModule`: an ``nn.Module`` whose ``named_parameters()``
yields the manifest's names in the manifest's order. Handing it to ``timm.optim.create_optimizer_v2``
makes timm itself build the groups (``filter_bias_and_bn``, ``no_weight_decay``, layer-wise LR decay
through a ``group_matcher``) exactly as it does for the user's own model with the same names and shapes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import timm.optim
import torch
from timm.optim import Lookahead, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from .catalogue import OptimizerEntry
from .errors import SpecError
from .spec import GroupsSpec, OptimizerSpec


class ParamModule(nn.Module):
    """A model made only of named parameters, in manifest order."""

    def __init__(
        self,
        named: Sequence[tuple[str, torch.Tensor]],
        *,
        no_weight_decay: Sequence[str] = (),
        group_matcher: dict[str, Any] | None = None,
        classifier: str | None = None,
    ) -> None:
        super().__init__()
        self.names = [n for n, _ in named]
        self.params = nn.ParameterList([nn.Parameter(t) for _, t in named])
        self._no_weight_decay = set(no_weight_decay)
        if group_matcher is not None:
            # read by timm's param_groups_layer_decay, as on a timm model
            self.group_matcher = lambda coarse=False: group_matcher
        if classifier is not None:
            self.pretrained_cfg = {"classifier": classifier}

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in zip(self.names, self.params, strict=False):
            yield prefix + name, p

    def no_weight_decay(self) -> set[str]:
        return self._no_weight_decay

    def by_name(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.params, strict=False))


class _Subset(nn.Module):
    """Some of a ParamModule's parameters (the same objects), for timm's group helpers."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self._named = named

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self._named


def _explicit_groups(module: ParamModule, groups: GroupsSpec, weight_decay: float) -> list[dict[str, Any]]:
    """Explicit groups (name patterns -> options) in spec order, then the unmatched parameters.

    Within each, ``filter_bias_and_bn`` splits off the 1-D / ``*.bias`` / ``no_weight_decay``
    parameters with timm's own helper, as ``create_optimizer_v2`` does for a whole model.
    """
    buckets: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(groups.groups) + 1)]
    for name, p in module.named_parameters():
        index = next(
            (i for i, g in enumerate(groups.groups) if any(fnmatch.fnmatchcase(name, pat) for pat in g.patterns)),
            len(groups.groups),
        )
        buckets[index].append((name, p))
    options = [dict(g.options) for g in groups.groups] + [{}]
    result: list[dict[str, Any]] = []
    for named, opts in zip(buckets, options, strict=False):
        if not named:
            continue
        wd = opts.get("weight_decay", weight_decay)
        if wd and groups.filter_bias_and_bn:
            for g in param_groups_weight_decay(_Subset(named), weight_decay=wd, no_weight_decay_list=module.no_weight_decay()):
                result.append({**opts, **g})
        else:
            result.append({**opts, "params": [p for _, p in named]})
    return result


def _torch_groups(module: ParamModule, groups: GroupsSpec, weight_decay: float) -> list[dict[str, Any]]:
    """Groups for a torch.* class, by timm's conventions when they apply, else one plain group."""
    if groups.groups:
        return _explicit_groups(module, groups, weight_decay)
    if groups.layer_decay is not None:
        return param_groups_layer_decay(
            module,
            weight_decay=weight_decay,
            layer_decay=groups.layer_decay,
            no_weight_decay_list=module.no_weight_decay(),
            fallback_list=groups.fallback,
            weight_decay_exclude_1d=bool(groups.filter_bias_and_bn),
            min_scale=groups.layer_decay_min_scale,
        )
    if weight_decay and groups.filter_bias_and_bn:
        return param_groups_weight_decay(
            module,
            weight_decay=weight_decay,
            no_weight_decay_list=module.no_weight_decay(),
            fallback_list=groups.fallback,
        )
    # what `torch.optim.X(model.parameters(), ...)` builds
    return [{"params": list(module.parameters())}]


def _requested_implementations(opt: OptimizerSpec, groups: GroupsSpec) -> list[str]:
    """Every implementation the spec asks for: ``implementation``, and ``foreach``/``fused`` given as options."""
    requested = [opt.implementation] if opt.implementation != "default" else []
    for options in (opt.kwargs, *(g.options for g in groups.groups)):
        requested += [k for k in ("foreach", "fused") if options.get(k) is True and k not in requested]
    return requested


def check_implementations(entry: OptimizerEntry, opt: OptimizerSpec, groups: GroupsSpec, device_type: str) -> None:
    """Refuse an implementation that the optimizer lacks, or lacks on this device, before torch is asked (torch
    would refuse some only at the first step, after the run was stored: fused Adagrad on CUDA before torch 2.12)."""
    for implementation in _requested_implementations(opt, groups):
        if implementation not in entry.implementations:
            raise SpecError(
                f"optimizer {entry.name!r} has no {implementation!r} implementation; it has: {list(entry.implementations)}"
            )
        here = entry.implementations_on(device_type)
        if implementation not in here:
            raise SpecError(
                f"optimizer {entry.name!r} has no {implementation!r} implementation on {device_type!r} "
                f"(torch {torch.__version__}); on {device_type!r} it has: {list(here)}"
            )


def build_optimizer(
    entry: OptimizerEntry, module: ParamModule, opt: OptimizerSpec, groups: GroupsSpec, *, device_type: str
) -> torch.optim.Optimizer:
    """Build the optimizer with timm's factory or torch's class: never a re-implementation.

    With no options it is exactly ``torch.optim.X(model.parameters())`` for a torch.* entry and
    ``timm.optim.create_optimizer_v2(model, name)`` for a timm name."""
    check_implementations(entry, opt, groups, device_type)
    groups = groups.for_optimizer(entry.name)  # filter_bias_and_bn decided: a bool from here on
    kwargs = dict(opt.kwargs)
    if opt.lr is not None:
        kwargs["lr"] = opt.lr
    if opt.implementation != "default":
        kwargs[opt.implementation] = True
    # only a lookahead_ entry takes these; elsewhere they stay in kwargs, for the class to refuse
    lookahead = {k: kwargs.pop(k) for k in ("lookahead_alpha", "lookahead_k") if k in kwargs and entry.lookahead}
    try:
        if entry.family == "torch":
            cls = getattr(torch.optim, entry.name.removeprefix("torch."))
            # unset, weight decay is the class's own default (AdamW: 0.01), as in torch
            weight_decay = opt.weight_decay if opt.weight_decay is not None else entry.defaults.get("weight_decay", 0.0)
            if opt.weight_decay is not None:
                if "weight_decay" not in entry.hyperparameters:
                    raise SpecError(f"optimizer {entry.name!r} has no weight_decay; got weight_decay={opt.weight_decay!r}")
                kwargs["weight_decay"] = opt.weight_decay
            optimizer = cls(_torch_groups(module, groups, weight_decay), **kwargs)
        else:
            base_name = entry.name.removeprefix("lookahead_") if entry.lookahead else entry.name
            # unset, weight decay is create_optimizer_v2's default: 0
            weight_decay = opt.weight_decay or 0.0
            common = dict(opt=base_name, weight_decay=weight_decay, **kwargs)
            if groups.groups:
                optimizer = timm.optim.create_optimizer_v2(_explicit_groups(module, groups, weight_decay), **common)
            else:
                optimizer = timm.optim.create_optimizer_v2(
                    module,
                    filter_bias_and_bn=bool(groups.filter_bias_and_bn),
                    layer_decay=groups.layer_decay,
                    layer_decay_min_scale=groups.layer_decay_min_scale,
                    fallback_list=groups.fallback,
                    **common,
                )
            if entry.lookahead:
                optimizer = Lookahead(optimizer, **{k.removeprefix("lookahead_"): v for k, v in lookahead.items()})
    except SpecError:
        raise
    except Exception as exc:  # the library's refusal of the user's options, in its own words
        shown = show_options(opt)
        raise SpecError(f"optimizer {entry.name!r} rejected its options {shown}: {type(exc).__name__}: {exc}") from None
    return optimizer


def show_options(opt: OptimizerSpec) -> str:
    """The options the spec gave the optimizer (those left to the library's defaults are not shown)."""
    shown = {"lr": opt.lr, "weight_decay": opt.weight_decay, "implementation": opt.implementation, **opt.kwargs}
    defaults = {"lr": None, "weight_decay": None, "implementation": "default"}
    given = {k: v for k, v in shown.items() if k not in defaults or v != defaults[k]}
    return "{" + ", ".join(f"{k}={v!r}" for k, v in given.items()) + "}"
