"""What a run says about itself, as JSON: the LR of each param group, why a group has none, the groups' options,
Every function here answers for any state torch or timm can hold; none raises on odd
values (an answer that cannot be written as JSON is the service's 500, issue 22).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import SpecError
from .spec_values import jsonable

if TYPE_CHECKING:
    from .spec import RunSpec

# Why a group's LR is None, by the optimizer class that leaves it so. timm's Adafactor with lr=None computes a
# relative step size per parameter at every step (and writes the last parameter's into the group), so no one
# number is the group's LR.
_RELATIVE_STEP_NOTES = {
    "timm.optim.adafactor.Adafactor": "relative step size (timm Adafactor, lr=None): computed per parameter at every step",
}


def group_lr(group: Mapping[str, Any]) -> float | None:
    """The LR the optimizer steps this group with, or None where there is no one number (see :func:`lr_note`)."""
    if group.get("relative_step"):
        return None
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        return None
    lr = float(lr)
    return lr if math.isfinite(lr) else None


def lr_note(group: Mapping[str, Any], class_path: str) -> str | None:
    """Why :func:`group_lr` is None for this group (None when it is a number)."""
    if group_lr(group) is not None:
        return None
    lr = group.get("lr")
    if group.get("relative_step"):
        return _RELATIVE_STEP_NOTES.get(class_path, f"relative step size ({class_path}, lr={lr!r}): computed per parameter")
    if lr is None:
        return f"no learning rate ({class_path}, lr=None)"
    return f"lr is {str(lr)[:40]}, not a finite number"


def lrs(groups: Sequence[Mapping[str, Any]]) -> list[float | None]:
    return [group_lr(g) for g in groups]


def lr_notes(groups: Sequence[Mapping[str, Any]], class_path: str) -> list[str | None]:
    return [lr_note(g, class_path) for g in groups]


def named_groups(state_dict_groups: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """An optimizer ``state_dict``'s param groups with parameter names for indices and every option as JSON
    (``betas`` as a list)."""
    out = []
    for g in state_dict_groups:
        options = {str(k): jsonable(v) for k, v in g.items() if k != "params"}
        out.append({"params": [names[i] for i in g["params"]], **options})
    return out


def require_numeric_lrs(spec: RunSpec, groups: Sequence[Mapping[str, Any]], class_path: str) -> None:
    """A SpecError where the spec schedules the LR (a scheduler, SWALR) of an optimizer that has none in some group."""
    users = [f"scheduler {spec.scheduler.get('name')!r}"] if spec.scheduler else []
    if spec.swa is not None and spec.swa.swa_lr is not None:
        users.append("swa.swa_lr (SWALR)")
    notes = lr_notes(groups, class_path)
    missing = [i for i, note in enumerate(notes) if note is not None]
    if users and missing:
        given = {k: v for k, v in spec.optimizer.to_dict().items() if k not in ("name", "implementation")}
        raise SpecError(
            f"{' and '.join(users)} scale(s) the lr of every param group; optimizer {spec.optimizer.name!r} with "
            f"options {given} has none in group(s) {missing}: {notes[missing[0]]}. "
            "Give optimizer.lr, or leave the schedule to the optimizer"
        )
