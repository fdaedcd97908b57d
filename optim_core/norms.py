"""The norms a step's history records: of the gradients, of the update, of the parameters (issue 20).

Each is one global L2 norm over many tensors, computed the way ``torch.nn.utils.get_total_norm`` does (one
``torch._foreach_norm`` per device, then the norm of the per-tensor norms), in float32 at least, so a gradient
sent in bf16 is not summed in bf16. The update norm needs the parameters before the step: a copy of them
(``before``), which is what makes it the expensive one (``mode="cheap"`` skips it; README: its cost).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, TypeVar

import torch

NormsMode = Literal["all", "cheap", "off"]
R = TypeVar("R")


def total_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all the tensors' elements together (a sparse tensor: of its values once coalesced); NaN or
    Inf when an element is."""
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel():
            wide = torch.float64 if t.dtype == torch.float64 else torch.float32
            by_device[(t.device, wide)].append(t.detach())
    if not by_device:
        return 0.0
    norms = [
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, 2, dtype=wide))).to("cpu", torch.float64)
        for (_, wide), group in by_device.items()
    ]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def measured(
    step: Callable[[], R], grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], mode: NormsMode
) -> tuple[R, dict[str, float]]:
    """Run ``step`` (which changes ``params`` in place) and measure it: ``grad_norm`` (of ``grads``, taken before the
    step: an optimizer may reuse their memory), ``update_norm`` (``mode="all"``: the distance the parameters
    moved) and ``param_norm`` (after the step). ``mode="off"`` measures nothing."""
    if mode == "off":
        return step(), {}
    norms = {"grad_norm": total_norm(grads)}
    before = [p.detach().clone() for p in params] if mode == "all" else None
    result = step()
    if before is not None:
        torch._foreach_sub_(before, [p.detach() for p in params])
        norms["update_norm"] = total_norm(before)
        del before
    norms["param_norm"] = total_norm(params)
    return result, norms
