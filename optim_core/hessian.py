"""timm's Adahessian (and ``lookahead_adahessian``) through a protocol: the worker estimates the Hessian
diagonal, the run keeps everything else.

timm's ``Adahessian.step`` calls ``zero_hessian()``, then ``set_hessian()``, which draws Rademacher probes
``z`` from the optimizer's own generator and accumulates Hutchinson's ``z * (H z)`` into ``p.hess`` by a
second backward pass through the gradients' graph: on the worker, where the graph is. So a step goes:

1. ``request(state)`` (``RunState.hessian_request()``): which parameters get a fresh estimate if they have
   a gradient (timm's order; none in the steps that ``update_each`` skips), the generator state to draw from,
   ``n_samples`` and the probes' dtype: an ``optim_format.hessian.HessianRequest``, sent to the worker as JSON;
2. the worker runs ``loss.backward(create_graph=True)`` and ``optim_client.hessian.hutchinson(request, params)``,
   which computes the estimates exactly as ``set_hessian`` would, and sends them beside the gradients;
3. ``RunState.apply(grads, t, hessians=...)``: ``prepare`` checks them; timm's own ``step`` runs with
   ``set_hessian`` replaced, for that call, by ``_set_hessian``: timm's bookkeeping (the parameters it
   selects, its "hessian step" counters, its generator, advanced by the same draws) with the worker's
   estimates in place of the second backward pass. Everything else (``zero_hessian``, ``avg_conv_kernel``,
   the update) is timm's code.

``p.hess`` and the generator live outside ``state_dict``: ``state_tree`` / ``load_state_tree`` carry them in
the run's snapshot, so a recovered run and a restarted worker draw the same probes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import timm.optim
import torch

from optim_format import dtypes
from optim_format.hessian import HessianRequest

from .errors import GradientError, ProtocolRequired
from .sparse import base_optimizer

if TYPE_CHECKING:
    from .run_state import RunState


def _adahessian(optimizer: torch.optim.Optimizer) -> timm.optim.Adahessian | None:
    base = base_optimizer(optimizer)
    return base if isinstance(base, timm.optim.Adahessian) else None


def _selected_if_grad(opt: timm.optim.Adahessian) -> list[torch.Tensor]:
    """The parameters ``set_hessian`` estimates afresh if they have a gradient, in its order."""
    return [p for p in opt.get_params() if opt.state[p]["hessian step"] % opt.update_each == 0 or isinstance(p.hess, float)]


def _generator_for(opt: timm.optim.Adahessian, device: torch.device) -> torch.Generator:
    """The generator ``set_hessian`` draws from on ``device``: timm replaces its CPU generator by a fresh one,
    seeded alike, the first time its parameters are elsewhere."""
    if opt.generator.device != device:
        return torch.Generator(device).manual_seed(opt.seed)
    return opt.generator


def z_dtype() -> torch.dtype:
    """timm's probes are ``randint(...) * 2.0 - 1.0``: torch's default dtype."""
    return torch.get_default_dtype()


def estimate_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``p.hess``: ``h_z * z`` promotes the parameter's dtype with the probes'."""
    return torch.promote_types(param_dtype, z_dtype())


def request(state: RunState) -> HessianRequest:
    """What the worker must compute for step ``state.t``."""
    opt = _adahessian(state.optimizer)
    if opt is None:
        raise ProtocolRequired(f"{state.entry.name!r} takes no Hessian estimates: only adahessian and lookahead_adahessian do")
    names = state._name_of_param()
    generator = _generator_for(opt, next(iter(state._params.values())).device)
    return HessianRequest(
        t=state.t,
        params=tuple(names[id(p)] for p in _selected_if_grad(opt)),
        n_samples=int(opt.n_samples),
        z_dtype=dtypes.name_of(z_dtype()),
        generator_device=generator.device.type,
        generator_state=bytes(generator.get_state().numpy().tobytes()),
    )


@dataclass(frozen=True)
class Feed:
    """Checked estimates for one step, by parameter name, on the run's device."""

    estimates: dict[str, torch.Tensor]
    by_param: dict[int, torch.Tensor]


def prepare(state: RunState, grads: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor] | None) -> Feed | None:
    """Check ``hessians`` against what this step of ``state`` needs, given which parameters have a gradient
    (``grads``, checked). None for an optimizer that takes none (and then none may be given)."""
    opt = _adahessian(state.optimizer)
    if opt is None:
        if hessians:
            raise ProtocolRequired(
                f"{state.entry.name!r} takes no Hessian estimates (only adahessian and lookahead_adahessian do); "
                f"got some for {sorted(hessians)[:5]}"
            )
        return None
    if hessians is None:
        raise ProtocolRequired(
            f"{state.entry.name} needs Hessian-diagonal estimates beside the gradients: get hessian_request() for step "
            f"t={state.t}, compute them on the worker (optim_client.hessian.hutchinson after loss.backward(create_graph=True)) "
            "and pass hessians={name: estimate} (empty when the request names no parameter)"
        )
    if not isinstance(hessians, Mapping):
        raise GradientError(f"hessians must map parameter names to tensors, got {type(hessians).__name__}")
    names = state._name_of_param()
    needed = [names[id(p)] for p in _selected_if_grad(opt) if names[id(p)] in grads]
    extra = sorted(set(hessians) - set(needed))
    if extra:
        raise GradientError(
            f"Hessian estimate(s) for {extra[:10]} were not asked for: step t={state.t} estimates {needed[:10]} "
            "(the parameters of the request that have a gradient in this step)"
        )
    missing = [n for n in needed if n not in hessians]
    if missing:
        raise GradientError(
            f"Hessian estimate(s) for {missing[:10]} are missing: step t={state.t} estimates every parameter of the "
            "request that has a gradient"
        )
    params = state._params
    estimates: dict[str, torch.Tensor] = {}
    for name in needed:
        h, p = hessians[name], params[name]
        expected = estimate_dtype(p.dtype)
        if not isinstance(h, torch.Tensor) or h.layout != torch.strided:
            what = h.layout if isinstance(h, torch.Tensor) else type(h).__name__
            raise GradientError(f"Hessian estimate {name!r} is a {what}, not a dense tensor")
        if tuple(h.shape) != tuple(p.shape) or h.dtype != expected:
            raise GradientError(
                f"Hessian estimate {name!r} is {dtypes.name_of(h.dtype)} {list(h.shape)}; "
                f"it must be {dtypes.name_of(expected)} {list(p.shape)} (the parameter's shape, in the dtype of h_z * z)"
            )
        # a copy: it becomes p.hess, which outlives the request's buffer
        estimates[name] = h.detach().to(device=state.device, copy=True)
    return Feed(estimates=estimates, by_param={id(params[n]): e for n, e in estimates.items()})


@torch.no_grad()
def _set_hessian(opt: timm.optim.Adahessian, feed: Feed) -> None:
    """timm's ``Adahessian.set_hessian`` with the worker's estimates in place of its second backward pass: the same
    selection, counters, generator switch and draws (which advance the generator as timm's do)."""
    params = []
    for p in filter(lambda p: p.grad is not None, opt.get_params()):
        if opt.state[p]["hessian step"] % opt.update_each == 0 or isinstance(p.hess, float):
            params.append(p)
        opt.state[p]["hessian step"] += 1
    if set(map(id, params)) != set(feed.by_param):  # prepare() selected from the same state: a bug if not
        raise RuntimeError("the parameters to estimate differ from those prepare() checked")
    if len(params) == 0:
        return
    if opt.generator.device != params[0].device:
        opt.generator = torch.Generator(params[0].device).manual_seed(opt.seed)
    for _ in range(opt.n_samples):
        for p in params:
            torch.randint(0, 2, p.size(), generator=opt.generator, device=p.device)
    for p in params:
        # as timm accumulates from p.hess (0.0, or zeroed by zero_hessian) up: the worker's sum of the samples
        # starts from 0.0 too, so it holds no -0.0 and adding it to +0.0 changes no bit
        p.hess += feed.by_param[id(p)]


@contextmanager
def fed(optimizer: torch.optim.Optimizer, feed: Feed | None) -> Iterator[None]:
    """During the block, the optimizer's ``set_hessian`` feeds ``feed`` (nothing changes for None)."""
    opt = _adahessian(optimizer)
    if feed is None or opt is None:
        yield
        return
    opt.set_hessian = partial(_set_hessian, opt, feed)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del opt.set_hessian


def zeros_for(state: RunState, name: str) -> torch.Tensor:
    p = state._params[name]
    return torch.zeros(p.shape, dtype=estimate_dtype(p.dtype), device=state.device)


def state_tree(state: RunState) -> dict[str, Any] | None:
    """``p.hess`` by name (0.0 until the first estimate) and the generator: Adahessian's state outside ``state_dict``."""
    opt = _adahessian(state.optimizer)
    if opt is None:
        return None
    names = state._name_of_param()
    return {
        "hess": {names[id(p)]: p.hess for p in opt.get_params()},
        "generator": {"device": opt.generator.device.type, "state": opt.generator.get_state()},
    }


def load_state_tree(state: RunState, saved: Mapping[str, Any] | None) -> None:
    from .errors import SnapshotError

    opt = _adahessian(state.optimizer)
    if opt is None or saved is None:
        if opt is not None or saved is not None:
            raise SnapshotError("the snapshot's Hessian state does not fit this run's optimizer")
        return
    params = state._params
    unknown = sorted(set(saved["hess"]) - set(params))
    if unknown:
        raise SnapshotError(f"Hessian state for unknown parameter(s) {unknown[:10]}")
    for name, hess in saved["hess"].items():
        p: Any = params[name]  # timm keeps p.hess on the parameter itself
        p.hess = hess.to(device=state.device, copy=True) if isinstance(hess, torch.Tensor) else float(hess)
    device = torch.device(saved["generator"]["device"])
    generator = torch.Generator(state.device if device.type == state.device.type else device)
    generator.set_state(saved["generator"]["state"])
    opt.generator = generator
