"""The optimizer catalogue: every name in timm's registry (and its ``lookahead_`` form) and every
``torch.optim`` optimizer class as ``torch.<ClassName>``.

An entry is data: a frozen :class:`OptimizerEntry` that says what the optimizer is, which
hyper-parameters it takes and their defaults, what it needs beyond a gradient and whether it can run
here. Optimizers are always built by timm's ``create_optimizer_v2`` or torch's own class, never
re-implemented (see ``optim_core.params.build_optimizer``).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import timm.optim
import torch
from torch.optim.optimizer import required as _REQUIRED

from .devices import DEVICE_TYPES, IMPLEMENTATIONS, default_device_type, implementations_by_device
from .errors import Unavailable, UnknownName
from .spec_values import jsonable

TORCH_PREFIX = "torch."
LOOKAHEAD_PREFIX = "lookahead_"

# What an optimizer needs beyond a first-order gradient, and the protocol that provides it: an entry that
# needs one is available, and its ``needs`` tell a client which protocol to speak.
PROTOCOLS = {
    "closure": "steps by closure evaluations, one round trip each (optim_core.closure)",
    "hessian": "takes a Hessian-diagonal estimate beside each gradient (optim_core.hessian)",
    "sparse_grad": "takes sparse COO gradients only (optim_core.sparse)",
}
# Needs without a protocol yet: such an entry is unavailable and says why (none today).
NEEDS_PROTOCOL: dict[str, str] = {}

# timm's Kron draws its preconditioner probes from torch's *global* generator (``torch.randn`` without
# ``generator=`` unless ``deterministic=True``), so a run must carry that generator's state with it.
_GLOBAL_RNG_CLASSES = ("timm.optim.kron.Kron",)


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    family: str  # "timm" or "torch"
    class_path: str
    description: str
    defaults: Mapping[str, Any]
    hyperparameters: tuple[str, ...]
    needs: tuple[str, ...] = ()
    available: bool = True
    reason: str | None = None
    # every implementation the class accepts on some device; which of them run where: implementations_on(device)
    implementations: tuple[str, ...] = ("default",)
    uses_global_rng: bool = False
    lookahead: bool = False
    timm_defaults: Mapping[str, Any] = field(default_factory=dict)
    by_device: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # hyper-parameters without a default (timm's SGDP: lr), which create_optimizer_v2 itself refuses to guess
    required: tuple[str, ...] = ()

    def require_available(self) -> None:
        if not self.available:
            raise Unavailable(f"optimizer {self.name!r} is not available here: {self.reason}")

    def implementations_on(self, device: str | torch.device) -> tuple[str, ...]:
        """The implementations that run on ``device`` (a type such as ``"cuda"``, or a device), by torch's rules
        (``optim_core.devices``); on device types the catalogue does not describe, only ``"default"``."""
        device_type = torch.device(device).type
        return tuple(self.by_device.get(device_type, ("default",)))

    def describe(self, device: str | torch.device | None = None) -> dict[str, Any]:
        """A JSON-able description, for ``GET /optimizers``; ``implementations`` are those that run on ``device``
        (by default the device this process steps on), ``implementations_by_device`` those of every device type."""
        device_type = torch.device(device).type if device is not None else default_device_type()
        return {
            "name": self.name,
            "family": self.family,
            "class": self.class_path,
            "description": self.description,
            "defaults": dict(self.defaults),
            "required": list(self.required),
            "hyperparameters": list(self.hyperparameters),
            "needs": list(self.needs),
            "available": self.available,
            "reason": self.reason,
            "device": device_type,
            "implementations": list(self.implementations_on(device_type)),
            "implementations_by_device": {d: list(self.implementations_on(d)) for d in DEVICE_TYPES},
            "lookahead": self.lookahead,
        }


def _signature(cls: type) -> tuple[tuple[str, ...], dict[str, Any], tuple[str, ...]]:
    """The constructor's hyper-parameters, their defaults, and those that must be given (no default, or torch's
    ``required`` sentinel)."""
    names, defaults, required = [], {}, []
    for p in inspect.signature(cls).parameters.values():
        if p.name == "params" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        names.append(p.name)
        if p.default is p.empty or p.default is _REQUIRED:
            required.append(p.name)
        else:
            defaults[p.name] = jsonable(p.default)
    return tuple(names), defaults, tuple(required)


def _implementations(by_device: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    found = {i for impls in by_device.values() for i in impls}
    return tuple(i for i in IMPLEMENTATIONS if i in found)


def _first_line(doc: str | None) -> str:
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _optional_package(class_path: str) -> tuple[tuple[str, ...], str | None]:
    """For timm's apex / bitsandbytes entries: what is missing here, if anything."""
    for prefix, package in (("apex.", "apex"), ("bitsandbytes.", "bitsandbytes")):
        if class_path.startswith(prefix):
            missing = []
            if not torch.cuda.is_available():
                missing.append("CUDA")
            if importlib.util.find_spec(package) is None:
                missing.append(f"the {package} package")
            needs = ("cuda", f"package:{package}")
            return needs, (f"needs {' and '.join(missing)}, which this server lacks" if missing else None)
    return (), None


def _timm_entry(name: str, *, lookahead: bool) -> OptimizerEntry:
    info = timm.optim.get_optimizer_info(name)
    cls: type | None = None
    if isinstance(info.opt_class, str):
        class_path = info.opt_class
        hyperparameters: tuple[str, ...] = ()
        defaults: dict[str, Any] = {}
        required: tuple[str, ...] = ()
        doc_line = ""
    else:
        cls = info.opt_class
        class_path = f"{cls.__module__}.{cls.__qualname__}"
        hyperparameters, defaults, required = _signature(cls)
        doc_line = _first_line(cls.__doc__)
    timm_defaults = dict(info.defaults or {})
    if info.has_momentum:
        timm_defaults.setdefault("momentum", 0.9)  # create_optimizer_v2's own default
    defaults.update({k: jsonable(v) for k, v in timm_defaults.items()})
    required = tuple(r for r in required if r not in timm_defaults)
    needs, reason = _optional_package(class_path)
    by_device = implementations_by_device(cls)
    if info.second_order:
        needs += ("hessian",)
        reason = reason or NEEDS_PROTOCOL.get("hessian")
    description = info.description or doc_line
    if lookahead:
        hyperparameters += ("lookahead_alpha", "lookahead_k")
        defaults.update(lookahead_alpha=0.5, lookahead_k=6)
        description = f"Lookahead (k steps forward, 1 back) around {name}: {description}"
    return OptimizerEntry(
        name=f"{LOOKAHEAD_PREFIX}{name}" if lookahead else name,
        family="timm",
        class_path=class_path,
        description=description,
        defaults=defaults,
        hyperparameters=hyperparameters,
        needs=needs,
        available=reason is None,
        reason=reason,
        implementations=_implementations(by_device),
        uses_global_rng=class_path in _GLOBAL_RNG_CLASSES,
        lookahead=lookahead,
        timm_defaults=timm_defaults,
        by_device=by_device,
        required=required,
    )


def _register_timm(registry: dict[str, OptimizerEntry]) -> None:
    for name in map(str, timm.optim.list_optimizers()):
        registry[name] = _timm_entry(name, lookahead=False)


def _register_lookahead(registry: dict[str, OptimizerEntry]) -> None:
    # create_optimizer_v2 accepts ``lookahead_<name>`` for every registered name
    for name in map(str, timm.optim.list_optimizers()):
        entry = _timm_entry(name, lookahead=True)
        registry[entry.name] = entry


_TORCH_NEEDS = {
    "LBFGS": ("closure",),
    "SparseAdam": ("sparse_grad",),
    # torch.optim.Muon rejects anything but 2-D parameters (use groups to give the rest another optimizer)
    "Muon": ("2d_params",),
}


def _register_torch(registry: dict[str, OptimizerEntry]) -> None:
    for cls_name in sorted(torch.optim.__all__):
        cls = getattr(torch.optim, cls_name)
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        hyperparameters, defaults, required = _signature(cls)
        by_device = implementations_by_device(cls)
        needs = _TORCH_NEEDS.get(cls_name, ())
        reasons = [NEEDS_PROTOCOL[n] for n in needs if n in NEEDS_PROTOCOL]
        registry[TORCH_PREFIX + cls_name] = OptimizerEntry(
            name=TORCH_PREFIX + cls_name,
            family="torch",
            class_path=f"torch.optim.{cls_name}",
            description=_first_line(cls.__doc__) or f"torch.optim.{cls_name}",
            defaults=defaults,
            hyperparameters=hyperparameters,
            needs=needs,
            available=not reasons,
            reason=reasons[0] if reasons else None,
            implementations=_implementations(by_device),
            by_device=by_device,
            required=required,
        )


@cache
def _registry() -> dict[str, OptimizerEntry]:
    registry: dict[str, OptimizerEntry] = {}
    _register_timm(registry)
    _register_lookahead(registry)
    _register_torch(registry)
    return registry


def list_optimizers() -> list[OptimizerEntry]:
    return list(_registry().values())


def get_optimizer(name: str) -> OptimizerEntry:
    """The entry for ``name`` (timm names are lower-case; torch classes are ``torch.<ClassName>``)."""
    try:
        return _registry()[name]
    except (KeyError, TypeError):
        raise UnknownName(
            f"unknown optimizer {name!r}: use a name of timm.optim.list_optimizers() "
            f"(optionally prefixed {LOOKAHEAD_PREFIX!r}) or torch.<ClassName>, e.g. 'adamw', 'torch.SGD'"
        ) from None
