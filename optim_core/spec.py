"""The run spec: what a run is made of, as plain frozen dataclasses parsed from JSON-able dicts.

``RunSpec.from_dict`` validates everything that can be checked without building anything and raises
:class:`SpecError` naming the bad field and value; building the optimizer and scheduler (in
``RunState``) then lets torch and timm check their own arguments.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from optim_format import dtypes

from .catalogue import TORCH_PREFIX
from .errors import SpecError
from .spec_values import (
    check_hyperparameter,
    integer,
    is_finite_number,
    layer_rule,
    number,
    require_keys,
    strings,
    to_lists,
    to_tuples,
)
from .workers import WorkersSpec

MAX_NAME_LENGTH = 512
MAX_TENSORS = 100_000
NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]+")
NONFINITE_POLICIES = ("error", "skip")
INTERVALS = ("step", "epoch")
__all__ = ["EmaSpec", "GroupSpec", "GroupsSpec", "OptimizerSpec", "ParamInfo", "RunSpec", "SwaSpec", "is_finite_number"]


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.parse(self.dtype)

    @classmethod
    def from_dict(cls, i: int, data: Mapping[str, Any]) -> ParamInfo:
        where = f"params[{i}]"
        require_keys(where, data, {"name", "shape", "dtype"}, {"name", "shape"})
        name = data["name"]
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
            raise SpecError(f"{where}.name must be 1-{MAX_NAME_LENGTH} characters of letters, digits and '_.:-', got {name!r}")
        shape = data["shape"]
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise SpecError(f"{where}.shape must be a list of non-negative integers, got {shape!r}")
        dtype = data.get("dtype", "float32")
        if dtype not in dtypes.FLOAT_NAMES:
            raise SpecError(f"{where}.dtype must be one of {sorted(dtypes.FLOAT_NAMES)}, got {dtype!r}")
        return cls(name=name, shape=tuple(shape), dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float | None = None
    weight_decay: float | None = None  # None: the library's default
    implementation: str = "default"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> OptimizerSpec:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise SpecError(f"optimizer must be a name or an object with a 'name', got {data!r}")
        kwargs = {k: to_tuples(v) for k, v in data.items() if k not in ("name", "lr", "weight_decay", "implementation")}
        lr = data.get("lr")
        if lr is not None:
            number("optimizer.lr", lr, minimum=0.0)
        weight_decay = data.get("weight_decay")
        if weight_decay is not None:
            number("optimizer.weight_decay", weight_decay, minimum=0.0)
        implementation = data.get("implementation", "default")
        if implementation not in ("default", "foreach", "fused"):
            raise SpecError(f"optimizer.implementation must be 'default', 'foreach' or 'fused', got {implementation!r}")
        for key, value in kwargs.items():
            check_hyperparameter(key, value)
        return cls(name=data["name"], lr=lr, weight_decay=weight_decay, implementation=implementation, kwargs=kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "implementation": self.implementation}
        if self.lr is not None:
            out["lr"] = self.lr
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        out.update({k: to_lists(v) for k, v in self.kwargs.items()})
        return out


@dataclass(frozen=True)
class GroupSpec:
    patterns: tuple[str, ...]
    options: Mapping[str, Any]


@dataclass(frozen=True)
class GroupsSpec:
    # None: the optimizer's library decides, as it does for a user in-process: timm's create_optimizer_v2 filters
    # (its own default), a torch.* class does not (torch.optim.X(model.parameters()) decays every tensor alike).
    # RunSpec.from_dict resolves it, so a stored spec always says which (issue 19).
    filter_bias_and_bn: bool | None = None
    no_weight_decay: tuple[str, ...] = ()
    fallback: tuple[str, ...] = ()
    layer_decay: float | None = None
    layer_decay_min_scale: float = 0.0
    layer_rule: Mapping[str, Any] | None = None
    classifier: str | None = None
    groups: tuple[GroupSpec, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GroupsSpec:
        if data is None:
            return cls()
        allowed = {
            "filter_bias_and_bn",
            "no_weight_decay",
            "fallback",
            "layer_decay",
            "layer_decay_min_scale",
            "layer_rule",
            "classifier",
            "groups",
        }
        require_keys("param_groups", data, allowed)
        filt = data.get("filter_bias_and_bn")
        if filt is not None and not isinstance(filt, bool):
            raise SpecError(f"param_groups.filter_bias_and_bn must be true, false or null (the library's default), got {filt!r}")
        layer_decay = data.get("layer_decay")
        if layer_decay is not None:
            number("param_groups.layer_decay", layer_decay, minimum=0.0)
        rule = data.get("layer_rule")
        if rule is not None:
            rule = layer_rule(rule)
        groups = []
        for i, g in enumerate(data.get("groups") or ()):
            if not isinstance(g, Mapping) or "params" not in g:
                raise SpecError(f"param_groups.groups[{i}] must be an object with 'params' (name patterns)")
            patterns = g["params"]
            if isinstance(patterns, str):
                patterns = [patterns]
            if not patterns or not all(isinstance(p, str) for p in patterns):
                raise SpecError(f"param_groups.groups[{i}].params must be name patterns, got {patterns!r}")
            options = {k: to_tuples(v) for k, v in g.items() if k != "params"}
            for key, value in options.items():
                check_hyperparameter(key, value)
            if "lr" in options:
                number(f"param_groups.groups[{i}].lr", options["lr"], minimum=0.0)
            if "weight_decay" in options:
                number(f"param_groups.groups[{i}].weight_decay", options["weight_decay"], minimum=0.0)
            groups.append(GroupSpec(patterns=tuple(patterns), options=options))
        if groups and layer_decay is not None:
            raise SpecError("param_groups: explicit 'groups' and 'layer_decay' cannot be combined")
        return cls(
            filter_bias_and_bn=filt,
            no_weight_decay=strings("param_groups.no_weight_decay", data.get("no_weight_decay", ())),
            fallback=strings("param_groups.fallback", data.get("fallback", ())),
            layer_decay=layer_decay,
            layer_decay_min_scale=number(
                "param_groups.layer_decay_min_scale", data.get("layer_decay_min_scale", 0.0), minimum=0.0
            ),
            layer_rule=rule,
            classifier=data.get("classifier"),
            groups=tuple(groups),
        )

    def for_optimizer(self, name: str) -> GroupsSpec:
        """These groups with ``filter_bias_and_bn`` decided for optimizer ``name`` where the spec left it to the
        library: off for torch.* classes, on for timm names (``create_optimizer_v2``'s default)."""
        if self.filter_bias_and_bn is not None:
            return self
        return dataclasses.replace(self, filter_bias_and_bn=not name.startswith(TORCH_PREFIX))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.filter_bias_and_bn is not None:
            out["filter_bias_and_bn"] = self.filter_bias_and_bn
        if self.no_weight_decay:
            out["no_weight_decay"] = list(self.no_weight_decay)
        if self.fallback:
            out["fallback"] = list(self.fallback)
        if self.layer_decay is not None:
            out["layer_decay"] = self.layer_decay
            out["layer_decay_min_scale"] = self.layer_decay_min_scale
        if self.layer_rule is not None:
            out["layer_rule"] = to_lists(dict(self.layer_rule))
        if self.classifier is not None:
            out["classifier"] = self.classifier
        if self.groups:
            out["groups"] = [{"params": list(g.patterns), **to_lists(dict(g.options))} for g in self.groups]
        return out

    def timm_group_matcher(self) -> dict[str, Any] | None:
        """The rule in the shape of a timm model's ``group_matcher()``: regex or [(regex, ordinal)]."""
        if self.layer_rule is None:
            return None
        return {
            k: v if isinstance(v, str) else [(p, tuple(o) if o is not None else None) for p, o in v]
            for k, v in self.layer_rule.items()
        }


@dataclass(frozen=True)
class EmaSpec:
    decay: float = 0.9999
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    min_decay: float = 0.0
    update_after_step: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EmaSpec | None:
        if data is None:
            return None
        require_keys("ema", data, {"decay", "warmup", "warmup_gamma", "warmup_power", "min_decay", "update_after_step"})
        warmup = data.get("warmup", False)
        if not isinstance(warmup, bool):
            raise SpecError(f"ema.warmup must be true or false, got {warmup!r}")
        spec = cls(
            decay=number("ema.decay", data.get("decay", cls.decay), minimum=0.0, below=1.0 + 1e-12),
            warmup=warmup,
            warmup_gamma=number("ema.warmup_gamma", data.get("warmup_gamma", cls.warmup_gamma), minimum=1e-12),
            warmup_power=number("ema.warmup_power", data.get("warmup_power", cls.warmup_power), minimum=1e-12),
            min_decay=number("ema.min_decay", data.get("min_decay", cls.min_decay), minimum=0.0),
            update_after_step=integer("ema.update_after_step", data.get("update_after_step", 0)),
        )
        if spec.decay > 1.0:
            raise SpecError(f"ema.decay must be <= 1, got {spec.decay!r}")
        if not spec.warmup and (spec.min_decay or spec.update_after_step or "warmup_gamma" in data or "warmup_power" in data):
            raise SpecError('ema: warmup_gamma, warmup_power, min_decay and update_after_step need "warmup": true')
        return spec

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"decay": self.decay, "warmup": self.warmup}
        if self.warmup:
            out.update(
                warmup_gamma=self.warmup_gamma,
                warmup_power=self.warmup_power,
                min_decay=self.min_decay,
                update_after_step=self.update_after_step,
            )
        return out


@dataclass(frozen=True)
class SwaSpec:
    start: int
    every: int = 1
    swa_lr: float | None = None
    anneal_steps: int = 10
    anneal_strategy: str = "cos"
    interval: str = "step"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SwaSpec | None:
        if data is None:
            return None
        require_keys("swa", data, {"start", "every", "swa_lr", "anneal_steps", "anneal_strategy", "interval"}, {"start"})
        swa_lr = data.get("swa_lr")
        if swa_lr is not None:
            number("swa.swa_lr", swa_lr, minimum=0.0)
        strategy = data.get("anneal_strategy", "cos")
        if strategy not in ("cos", "linear"):
            raise SpecError(f"swa.anneal_strategy must be 'cos' or 'linear', got {strategy!r}")
        interval = data.get("interval", "step")
        if interval not in INTERVALS:
            raise SpecError(f"swa.interval must be 'step' or 'epoch', got {interval!r}")
        return cls(
            start=integer("swa.start", data["start"]),
            every=integer("swa.every", data.get("every", 1), minimum=1),
            swa_lr=swa_lr,
            anneal_steps=integer("swa.anneal_steps", data.get("anneal_steps", 10)),
            anneal_strategy=strategy,
            interval=interval,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "every": self.every,
            "swa_lr": self.swa_lr,
            "anneal_steps": self.anneal_steps,
            "anneal_strategy": self.anneal_strategy,
            "interval": self.interval,
        }


@dataclass(frozen=True)
class RunSpec:
    params: tuple[ParamInfo, ...]
    optimizer: OptimizerSpec
    param_groups: GroupsSpec = GroupsSpec()
    scheduler: Mapping[str, Any] | None = None
    ema: EmaSpec | None = None
    swa: SwaSpec | None = None
    nonfinite: str = "error"
    seed: int = 0
    workers: WorkersSpec | None = None  # several workers on the run (optim_core.workers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        require_keys(
            "spec",
            data,
            {"params", "optimizer", "param_groups", "scheduler", "ema", "swa", "nonfinite", "seed", "workers"},
            {"params", "optimizer"},
        )
        raw = data["params"]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise SpecError("spec.params must be a non-empty list of {name, shape, dtype}")
        if len(raw) > MAX_TENSORS:
            raise SpecError(f"spec.params has {len(raw)} tensors; at most {MAX_TENSORS} are allowed")
        params = tuple(ParamInfo.from_dict(i, p) for i, p in enumerate(raw))
        seen: set[str] = set()
        for p in params:
            if p.name in seen:
                raise SpecError(f"spec.params: the name {p.name!r} appears twice")
            seen.add(p.name)
        nonfinite = data.get("nonfinite", "error")
        if nonfinite not in NONFINITE_POLICIES:
            raise SpecError(f"spec.nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        scheduler = data.get("scheduler")
        if scheduler is not None and not isinstance(scheduler, Mapping):
            raise SpecError(f"spec.scheduler must be an object with a 'name', got {scheduler!r}")
        optimizer = OptimizerSpec.from_dict(data["optimizer"])
        return cls(
            params=params,
            optimizer=optimizer,
            param_groups=GroupsSpec.from_dict(data.get("param_groups")).for_optimizer(optimizer.name),
            scheduler=scheduler,
            ema=EmaSpec.from_dict(data.get("ema")),
            swa=SwaSpec.from_dict(data.get("swa")),
            nonfinite=nonfinite,
            seed=integer("spec.seed", data.get("seed", 0)),
            workers=WorkersSpec.from_dict(data.get("workers")),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape, by name."""
        return {p.name: p.shape for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "params": [p.to_dict() for p in self.params],
            "optimizer": self.optimizer.to_dict(),
            "param_groups": self.param_groups.to_dict(),
            "scheduler": self.scheduler,
            "ema": self.ema.to_dict() if self.ema else None,
            "swa": self.swa.to_dict() if self.swa else None,
            "nonfinite": self.nonfinite,
            "seed": self.seed,
        }
        if self.workers is not None:  # only then: the specs (and digests) of one-worker runs stay as they were
            out["workers"] = self.workers.to_dict()
        return out
