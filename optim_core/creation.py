"""Creating a run from a user's spec: build it, try it, describe it, all before anything is stored (issue 22).

torch and timm check some options when the optimizer is built and others only when it first steps (a string
where a number goes, ``capturable=True`` on a CPU, ``differentiable=True``, a Muon ``ns_steps`` of 2**53): a
run stored with such options would fail at its first step, after the service had acknowledged it. So creation
takes one step and one epoch step on a *miniature* of the run (the same spec, names and ranks, each dimension
cut by :func:`miniature_shape`, initial values sliced from the real ones, random gradients), which costs
little whatever the model's size, then describes the real state the way a service answers (``describe()``,
the LR preview). What the libraries raise there is a :class:`SpecError` that names the optimizer and the
options and passes the library's words on; the engine's own errors are not converted.

A miniature steps through the code paths its shapes select: an option that fails only on large tensors (a
preconditioner that Kron keeps diagonal above ``max_size_triangular``) is not caught here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import hessian
from .errors import EngineError, SnapshotError, SpecError, StepFailed
from .params import show_options
from .spec import RunSpec

if TYPE_CHECKING:
    from .run_state import RunState

# The miniature keeps the last two dimensions up to this size (Adafactor-style factoring needs >= 16, timm's
# default min_dim_size_to_factor) and leading ones (convolution kernels, stacked experts) up to LEADING_DIM.
MINIATURE_DIM = 32
LEADING_DIM = 4
TRIAL_SEED = 0


def miniature_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` cut to at most LEADING_DIM in leading dimensions and MINIATURE_DIM in the last two; rank kept."""
    cut = [min(d, LEADING_DIM) for d in shape[:-2]] + [min(d, MINIATURE_DIM) for d in shape[-2:]]
    return tuple(cut)


def create(
    cls: type[RunState],
    spec: RunSpec | Mapping[str, Any],
    params: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device | None = None,
) -> tuple[RunState, dict[str, Any]]:
    """The new state and its ``describe()``; a :class:`SpecError` for whatever the libraries refuse."""
    state = cls(spec, params, device=device)  # the optimizer, scheduler and averagers convert their own errors
    workers = state.spec.workers
    protocols = sorted({"closure", "hessian"} & set(state.entry.needs))
    if workers is not None and workers.world_size > 1 and protocols:
        raise SpecError(
            f"optimizer {state.entry.name!r} takes {' and '.join(protocols)} input beside its gradients, which one "
            f"worker sends: it cannot step with workers.world_size={workers.world_size}"
        )
    _trial(cls, state)
    shown = _shown(state.spec)
    try:
        facts = state.describe()
        state.preview_lrs(2)
    except SnapshotError as exc:  # a value the libraries put in the state that the snapshot format cannot carry
        raise SpecError(f"the run {shown} keeps state that cannot be stored: {exc}") from None
    except EngineError:
        raise
    except Exception as exc:  # the scheduler library refusing to preview this spec's schedule
        raise SpecError(f"the run {shown} cannot preview its LR schedule: {type(exc).__name__}: {exc}") from None
    return state, facts


def _shown(spec: RunSpec) -> str:
    parts = [f"optimizer {spec.optimizer.name!r} with options {show_options(spec.optimizer)}"]
    if spec.scheduler is not None:
        parts.append(f"scheduler {spec.scheduler.get('name')!r}")
    for name, avg in (("ema", spec.ema), ("swa", spec.swa)):
        if avg is not None:
            parts.append(f"{name} {avg.to_dict()}")
    return ", ".join(parts)


def _trial(cls: type[RunState], state: RunState) -> None:
    """One step and one epoch step of ``state``'s spec on a miniature of it, on the same device; ``state`` is untouched."""
    spec = state.spec
    shapes = {p.name: miniature_shape(p.shape) for p in spec.params}
    mini_spec = dataclasses.replace(spec, params=tuple(dataclasses.replace(p, shape=shapes[p.name]) for p in spec.params))
    real = state.params()
    initial = {n: real[n][tuple(slice(0, d) for d in shape)].clone() for n, shape in shapes.items()}
    mini = cls(mini_spec, initial, device=state.device)
    generator = torch.Generator().manual_seed(TRIAL_SEED)
    grads = {
        n: torch.randn(p.shape, generator=generator).to(device=state.device, dtype=p.dtype) for n, p in mini.params().items()
    }
    try:
        # a loss and a metric, for schedulers that decide on one
        mini.trial_step(grads, loss=1.0)  # the way this optimizer steps: its closure, Hessian estimates, sparse
        mini.step_epoch(metric=1.0)
        mini.groups()
        mini.export()
    except EngineError:
        raise
    except Exception as exc:  # StepFailed, or the library refusing an option while a protocol reads it (n_samples)
        what = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
        raise SpecError(
            f"the run {_shown(spec)} fails at its first step (tried on a miniature of the run before creating it): {what}"
        ) from None


def trial_step(state: RunState, grads: Mapping[str, torch.Tensor] | None = None, *, loss: float | None = None) -> None:
    """One step of ``state`` with ``grads`` (zeros by default), the way its optimizer steps: through its closure
    protocol (every evaluation given the same loss and gradients), with Hessian estimates of zero, with sparse
    gradients where it takes only those."""
    given = dict(grads) if grads is not None else {n: torch.zeros_like(p) for n, p in state.params().items()}
    if "sparse_grad" in state.entry.needs:
        given = {n: g.to_sparse(1) for n, g in given.items()}
    if "closure" in state.entry.needs:
        step = state.begin_closure_step(state.t)
        while step.waiting_for is not None:
            step.provide(step.waiting_for, 0.0 if loss is None else loss, given)
        return
    if "hessian" in state.entry.needs:
        request = state.hessian_request()
        state.apply(given, state.t, loss=loss, hessians={n: hessian.zeros_for(state, n) for n in request.params})
        return
    state.apply(given, state.t, loss=loss)
