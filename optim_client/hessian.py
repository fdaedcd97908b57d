"""The worker's half of the Hessian protocol (timm's Adahessian run on optim-service).

After ``loss.backward(create_graph=True)``, ``hutchinson(request, model.named_parameters())`` computes, for the
parameters the service's request names, what timm's ``Adahessian.set_hessian`` would accumulate into
``p.hess``: the mean over ``n_samples`` Rademacher probes ``z`` (drawn from the run's generator, in the
request's state) of ``z * (H z)``, bit for bit. Send the result beside the gradients
(``optim_format.framing.flatten(grads, hessians)``). A request that names no parameter (the steps that
``update_each`` skips) needs no estimate, and then no ``create_graph`` either (``needs_graph``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from optim_format import dtypes
from optim_format.hessian import HessianRequest


def _request(request: HessianRequest | Mapping[str, Any]) -> HessianRequest:
    return request if isinstance(request, HessianRequest) else HessianRequest.from_dict(request)


def needs_graph(request: HessianRequest | Mapping[str, Any]) -> bool:
    """Whether this step needs ``loss.backward(create_graph=True)`` (a second backward pass follows)."""
    return bool(_request(request).params)


@torch.no_grad()
def hutchinson(
    request: HessianRequest | Mapping[str, Any],
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The Hessian-diagonal estimates ``request`` asks for, by parameter name, as timm's ``set_hessian`` computes
    them: those of its parameters that have a gradient, whose graph (``create_graph=True``) is still there."""
    req = _request(request)
    named = dict(params)
    unknown = [n for n in req.params if n not in named]
    if unknown:
        raise ValueError(f"the request names parameter(s) {unknown[:5]} that are not among the given ones")
    names = [n for n in req.params if named[n].grad is not None]
    if not names:
        return {}
    chosen = [named[n] for n in names]
    grads: list[torch.Tensor] = [p.grad for p in chosen if p.grad is not None]
    flat = [n for n, g in zip(names, grads, strict=True) if g.grad_fn is None]
    if flat:
        raise ValueError(f"the gradient(s) of {flat[:5]} have no graph: call loss.backward(create_graph=True) first")
    # the probes come from the run's generator: on the worker's device when it is of the generator's type
    # (timm draws on the parameters' device), else where the generator lives, then moved (±1 moves exactly)
    device = chosen[0].device if chosen[0].device.type == req.generator_device else torch.device(req.generator_device)
    generator = req.generator(device)
    z_dtype = dtypes.parse(req.z_dtype)
    n = req.n_samples
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        # timm: torch.randint(0, 2, p.size(), generator=..., device=p.device) * 2.0 - 1.0, in torch's default dtype
        zs = [
            (torch.randint(0, 2, p.size(), generator=generator, device=device) * 2.0 - 1.0).to(device=p.device, dtype=z_dtype)
            for p in chosen
        ]
        h_zs = torch.autograd.grad(grads, chosen, grad_outputs=zs, only_inputs=True, retain_graph=i < n - 1)
        for name, h_z, z in zip(names, h_zs, zs, strict=True):
            term = h_z * z / n
            # timm adds to p.hess from 0.0 (or a zeroed tensor): 0.0 + term, not term, turns -0.0 into +0.0
            out[name] = 0.0 + term if i == 0 else out[name].add_(term)
    return out
