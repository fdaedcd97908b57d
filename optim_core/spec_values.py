"""JSON values: the checks of those a run spec is made of, each raising a :class:`SpecError` that names the field
and the bad value (``optim_core.spec`` builds the spec's dataclasses with them), and any value torch or timm holds
written in JSON's types (:func:`jsonable`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .errors import SpecError


def require_keys(where: str, data: Mapping[str, Any], allowed: set[str], required: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    if not isinstance(data, Mapping):
        raise SpecError(f"{where} must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        raise SpecError(f"{where}: missing field(s) {missing}")


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite; ints too large for a float are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def number(where: str, value: Any, *, minimum: float | None = None, below: float | None = None) -> float:
    if not is_finite_number(value):
        raise SpecError(f"{where} must be a finite number, got {str(value)[:40]}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where} must be >= {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise SpecError(f"{where} must be < {below}, got {value!r}")
    return value


def integer(where: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def to_tuples(value: Any) -> Any:
    """JSON has no tuples; torch and timm defaults (betas, ...) are tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(to_tuples(v) for v in value)
    return value


def to_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [to_lists(v) for v in value]
    return value


def check_hyperparameter(key: str, value: Any) -> None:
    """The checks that hold for every optimizer; each constructor then checks its own."""
    where = f"optimizer.{key}"
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where} must be finite, got {value!r}")
    if key in ("foreach", "fused") and value is not None and not isinstance(value, bool):
        # these choose a kernel, and the engine checks the choice against the run's device (as for "implementation")
        raise SpecError(f"{where} must be true, false or null, got {value!r}")
    if key in ("eps", "momentum", "dampening", "alpha", "lr_decay"):
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            number(where, value, minimum=0.0)
    if key == "betas":
        if not isinstance(value, tuple) or not value:
            raise SpecError(
                f"{where} must be a list of numbers in [0, 1), got {list(value) if isinstance(value, tuple) else value!r}"
            )
        for i, b in enumerate(value):
            if b is not None:
                number(f"{where}[{i}]", b, minimum=0.0, below=1.0)


def strings(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where} must be a list of name patterns, got {value!r}")
    return tuple(value)


def layer_rule(rule: Any) -> dict[str, Any]:
    """A name -> layer rule as timm's ``group_matcher``: {group: regex | [[regex, [ordinal] | null], ...]}."""
    if not isinstance(rule, Mapping) or not rule:
        raise SpecError(f"param_groups.layer_rule must be an object of group -> regex, got {rule!r}")
    out: dict[str, Any] = {}
    for group, spec in rule.items():
        where = f"param_groups.layer_rule.{group}"
        entries = [(spec, None)] if isinstance(spec, str) else spec
        if not isinstance(entries, (list, tuple)):
            raise SpecError(f"{where} must be a regex or a list of [regex, ordinal], got {spec!r}")
        checked = []
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
                raise SpecError(f"{where}: each entry must be [regex, [ordinal] or null], got {entry!r}")
            pattern, ordinal = entry
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"{where}: invalid regex {pattern!r}: {exc}") from None
            if ordinal is not None and not (
                isinstance(ordinal, (list, tuple)) and all(isinstance(o, (int, float)) for o in ordinal)
            ):
                raise SpecError(f"{where}: ordinal must be a list of numbers or null, got {ordinal!r}")
            checked.append((pattern, tuple(ordinal) if ordinal is not None else None))
        out[group] = spec if isinstance(spec, str) else tuple(checked)
    return out


def jsonable(value: Any) -> Any:
    """``value`` in JSON's types: tuples as lists, dtypes by name, non-finite floats and other objects as their repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # torch accepts tensor LRs and betas
        return jsonable(value.item())
    return repr(value)
