"""Sparse COO gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``).

A sparse gradient is checked (shape, dtype, indices in range), copied to the run's device in the parameter's
dtype and stays sparse: the optimizer gets it as it left the worker's ``backward``, uncoalesced, duplicates
and their order included, so torch coalesces where (and as) it would in-process. On the wire it is two
entries, ``{name}#indices`` and ``{name}#values`` (``optim_format.framing.flatten`` / ``unflatten``).

Whether a step can take sparse gradients is decided here, before anything changes: torch's and timm's
optimizers that cannot take them raise part way through their step, after updating the state (and even
the parameters) of those before (Adan, SGDP, SparseAdam given a dense gradient...). The classes that take
sparse gradients by design are listed in ``SPARSE_CLASSES``; for those, ``refusal`` names the options and
state under which their own code raises (each one proven against torch in tests/engine/test_sparse.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import timm.optim
import torch

from .errors import GradientError

# The classes whose step handles sparse gradients on purpose (a ``has_sparse_grad`` path, ``to_dense``,
# or sparse-only). Others (timm's Lars among them) may run on a sparse gradient by accident with some options
# and fail with others: they are refused.
SPARSE_CLASSES: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adagrad,
    torch.optim.SparseAdam,
    torch.optim.LBFGS,
    timm.optim.SGDW,
)


def checked(name: str, g: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A sparse COO gradient whose shape and dtype the caller has checked, with its indices checked against the
    shape, as a new uncoalesced tensor on ``device`` in ``dtype`` (indices and values copied: a sparse gradient
    costs memory in proportion to its rows)."""
    indices, values = g._indices(), g._values()
    if g._nnz():
        low, high = indices.amin(dim=1).tolist(), indices.amax(dim=1).tolist()
        for d, (lo, hi) in enumerate(zip(low, high, strict=True)):
            if lo < 0 or hi >= g.shape[d]:
                bad = lo if lo < 0 else hi
                raise GradientError(
                    f"sparse gradient {name!r}: index {bad} in dim {d} is out of range for the parameter's shape {list(g.shape)}"
                )
    return torch.sparse_coo_tensor(
        indices.to(device=device, copy=True),
        values.to(device=device, dtype=dtype, copy=True),
        g.shape,
        is_coalesced=False,
        check_invariants=False,  # checked above
    )


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that does the update: timm's ``Lookahead`` steps the one it wraps first."""
    return getattr(optimizer, "_base_optimizer", optimizer)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@cache
def sparse_entries() -> tuple[str, ...]:
    """The catalogue names whose optimizer takes sparse gradients."""
    from .catalogue import LOOKAHEAD_PREFIX, TORCH_PREFIX, list_optimizers

    names = []
    for e in list_optimizers():
        if e.family == "torch":
            cls = getattr(torch.optim, e.name.removeprefix(TORCH_PREFIX))
        else:
            cls = timm.optim.get_optimizer_info(e.name.removeprefix(LOOKAHEAD_PREFIX) if e.lookahead else e.name).opt_class
        if isinstance(cls, type) and issubclass(cls, SPARSE_CLASSES):
            names.append(e.name)
    return tuple(names)


def refusal(optimizer: torch.optim.Optimizer, names: Mapping[int, str], grads: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``optimizer`` would fail on ``grads`` part way through its step because some are sparse (or, for
    SparseAdam, dense), or None when it takes them. ``names``: parameter name by ``id`` of the parameter."""
    base = base_optimizer(optimizer)
    cls = type(base)
    sparse = [n for n, g in grads.items() if g.layout == torch.sparse_coo]
    if isinstance(base, torch.optim.SparseAdam):
        dense = [n for n, g in grads.items() if g.layout != torch.sparse_coo]
        if dense:
            return (
                f"gradient(s) {dense[:10]} are dense; torch.optim.SparseAdam takes sparse gradients only "
                "(torch: 'SparseAdam does not support dense gradients'; send p.grad.to_sparse() for dense layers)"
            )
        return None
    if not sparse:
        return _dense_after_sparse(base, names, grads)
    if not isinstance(base, SPARSE_CLASSES):
        some = ", ".join(sparse_entries()[:12])
        return (
            f"gradient(s) {sparse[:10]} are sparse; {_class_name(cls)} does not take sparse gradients "
            f"(its step would fail part way through). Optimizers that do: {some}, ..."
        )
    for group in base.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            g = grads.get(name)
            if g is None or g.layout != torch.sparse_coo:
                continue
            why = _group_refusal(base, group, base.state.get(p, {}))
            if why is not None:
                return f"gradient {name!r} is sparse, and {why}"
    return _dense_after_sparse(base, names, grads)


def _group_refusal(base: torch.optim.Optimizer, group: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """Why ``base``'s own code raises on a sparse gradient in ``group`` (with the parameter's ``state``)."""
    cls = _class_name(type(base))
    if group.get("fused"):
        return f"{cls}'s fused implementation does not take sparse gradients"
    weight_decay = group.get("weight_decay", 0)
    if isinstance(base, (torch.optim.SGD, torch.optim.Adagrad)) and weight_decay != 0:
        # SGD: grad.add(param) is add(sparse, dense); Adagrad refuses the option outright
        return f"its group has weight_decay={weight_decay!r}: {cls} applies weight decay to dense gradients only"
    momentum = group.get("momentum", 0)
    if isinstance(base, timm.optim.SGDW) and momentum != 0 and group.get("caution"):
        return f"its group has caution=True: {cls}'s cautious mask (buf * grad > 0) is not defined for sparse tensors"
    buffer = state.get("momentum_buffer")
    if (
        isinstance(base, (torch.optim.SGD, timm.optim.SGDW))
        and momentum != 0
        and group.get("nesterov")
        and buffer is not None
        and buffer.layout != torch.sparse_coo
    ):
        return (
            f"its momentum buffer is dense (from dense gradients before): {cls}'s Nesterov step adds it to the sparse "
            "gradient (add(sparse, dense))"
        )
    return None


def _dense_after_sparse(base: torch.optim.Optimizer, names: Mapping[int, str], grads: Mapping[str, torch.Tensor]) -> str | None:
    """SGD's momentum buffer is the first sparse gradient's clone: a dense gradient cannot be added to it."""
    if not isinstance(base, (torch.optim.SGD, timm.optim.SGDW)):
        return None
    for group in base.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for p in group["params"]:
            name = names[id(p)]
            g = grads.get(name)
            buffer = base.state.get(p, {}).get("momentum_buffer")
            if g is not None and g.layout != torch.sparse_coo and buffer is not None and buffer.layout == torch.sparse_coo:
                return (
                    f"gradient {name!r} is dense, and its momentum buffer is sparse (from sparse gradients before): "
                    f"{_class_name(type(base))} cannot add a dense gradient to it (add_(sparse, dense))"
                )
    return None


def nonfinite_view(g: torch.Tensor) -> torch.Tensor:
    """What to look at for NaN/Inf: a sparse tensor's values."""
    return g._values() if g.layout == torch.sparse_coo else g
