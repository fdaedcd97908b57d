"""A run as a plain torch checkpoint, and such a checkpoint loaded back into a run.

``export`` gives ``model``, ``optimizer`` (with ``param_names``), ``lr_scheduler``, ``ema`` / ``swa``, ``step``:
only tensors and containers, so ``torch.load(weights_only=True)`` reads it into plain torch / timm objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from optim_format import dtypes

from .errors import SnapshotError

if TYPE_CHECKING:
    from .run_state import RunState

MAX_T = 2**62  # steps and epochs: far beyond any run, and within every database's BIGINT


def describe_tensor(t: torch.Tensor) -> str:
    return f"{dtypes.name_of(t.dtype)} {list(t.shape)}"


def export(state: RunState) -> dict[str, Any]:
    """The state as a checkpoint for plain torch/timm (see the module's docstring)."""
    sd = state.optimizer.state_dict()
    names = state.names_in_optimizer_order
    optimizer = {
        **sd,
        "param_groups": [{**g, "param_names": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }
    return _plain(
        {
            "model": state.params(),
            "optimizer": optimizer,
            "lr_scheduler": state.schedule.state_dict() if state.schedule else None,
            "swa_scheduler": state.swa.scheduler.state_dict() if state.swa and state.swa.scheduler else None,
            "ema": state.averages("ema"),
            "swa": state.averages("swa"),
            "step": state.t,
            "epoch": state.epoch,
            "spec": state.spec.to_dict(),
        }
    )


def load_export(state: RunState, data: Mapping[str, Any]) -> RunState:
    """A new RunState: ``state`` with the parts of an ``export()``-shaped dict loaded into it.

    ``optimizer`` (a torch ``state_dict`` of this run's optimizer; ``param_names`` are checked when
    present), and optionally ``model``, ``lr_scheduler``, ``swa_scheduler``, ``ema``, ``swa``, ``step``,
    ``epoch``. ``state`` is left untouched; what does not fit raises ``SnapshotError`` naming it.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("optimizer"), Mapping):
        raise SnapshotError("a state to load must be a dict with at least 'optimizer' (a torch optimizer state_dict)")
    new = type(state).from_bytes(state.to_bytes(), device=state.device)
    try:
        _load_into(new, data)
        # what loads may still not run (an lr that is a string, moments of the wrong shape): try a step on a copy
        trial = type(state).from_bytes(new.to_bytes(), device=state.device)
        trial.trial_step()  # zero gradients, the way this optimizer steps (closure, Hessian, sparse)
        new.groups()
    except SnapshotError:
        raise
    except Exception as exc:  # a client's state that torch cannot load or step is the client's fault
        raise SnapshotError(f"the state does not fit this run: {type(exc).__name__}: {str(exc)[:300]}") from None
    return new


def _load_into(state: RunState, data: Mapping[str, Any]) -> None:
    for key, tensors in (("model", state.params()), ("ema", state.averages("ema")), ("swa", state.averages("swa"))):
        given = data.get(key)
        if given is None:
            continue
        if tensors is None:
            raise SnapshotError(f"the state has {key!r} but this run keeps no such average")
        for name, value in given.items():
            if name not in tensors:
                raise SnapshotError(f"{key}: unknown parameter {name!r}")
            target = tensors[name]
            if not isinstance(value, torch.Tensor) or value.shape != target.shape or value.dtype != target.dtype:
                what = describe_tensor(value) if isinstance(value, torch.Tensor) else type(value).__name__
                raise SnapshotError(f"{key}: {name!r} is {what}, the run has {describe_tensor(target)}")
            with torch.no_grad():
                target.copy_(value)
    order = state.names_in_optimizer_order
    sd = dict(data["optimizer"])
    groups = []
    for i, g in enumerate(sd.get("param_groups", [])):
        g = dict(g)
        names = g.pop("param_names", None)
        expected = [order[j] for j in g.get("params", []) if j < len(order)]
        if names is not None and list(names) != expected:
            raise SnapshotError(f"optimizer param_groups[{i}] holds {list(names)[:5]}..., this run has {expected[:5]}...")
        groups.append(g)
    sd["param_groups"] = groups
    state.optimizer.load_state_dict(sd)
    if data.get("lr_scheduler") is not None:
        if state.schedule is None:
            raise SnapshotError("the state has an lr_scheduler but this run has none")
        state.schedule.load_state_dict(data["lr_scheduler"])
    if data.get("swa_scheduler") is not None and state.swa is not None and state.swa.scheduler is not None:
        state.swa.scheduler.load_state_dict(data["swa_scheduler"])
    for key in ("step", "epoch"):
        value = data.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_T:
                raise SnapshotError(f"{key} must be an integer in [0, {MAX_T}], got {str(value)[:40]}")
            setattr(state, "t" if key == "step" else "epoch", value)


def _plain(obj: Any) -> Any:
    """Containers and tensors only (weights_only-loadable); tensors cloned to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj
