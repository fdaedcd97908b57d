"""What a worker's parameters and gradients look like to the service: names and groups as torch takes them, the
options of the service's groups as torch holds them, a step's body, the worker's rank, the service's timings."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from optim_format import framing


def _escape(name: str) -> str:
    """A parameter name as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: decode;dur=7.1, step;dur=30.2`` -> ``{"decode": 7.1, "step": 30.2}`` (ms)."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        try:
            out[name] = float(rest)
        except ValueError:
            continue
    return out


def as_torch(value: Any) -> Any:
    """A param-group option from the service's JSON as torch holds it: JSON has no tuples, and torch's options that
    are sequences (``betas``, Rprop's ``etas`` and ``step_sizes``) are tuples."""
    if isinstance(value, list):
        return tuple(as_torch(v) for v in value)
    return value


def names_and_groups(params: Iterable[Any]) -> tuple[list[tuple[str, torch.Tensor]], list[dict[str, Any]] | None]:
    """(name, tensor) pairs in order, and the explicit groups if param-group dicts were given."""
    items = list(params)
    if not items:
        raise ValueError("RemoteOptimizer got an empty parameter list")
    if isinstance(items[0], dict):
        named: list[tuple[str, torch.Tensor]] = []
        groups = []
        for g in items:
            members = names_and_groups(g["params"])[0] if not isinstance(g["params"], torch.Tensor) else [("", g["params"])]
            start = len(named)
            members = [(n if n and not n.isdigit() else str(start + i), p) for i, (n, p) in enumerate(members)]
            named += members
            groups.append({"params": [_escape(n) for n, _ in members], **{k: v for k, v in g.items() if k != "params"}})
        return named, groups
    if isinstance(items[0], tuple):
        return [(str(n), p) for n, p in items], None
    return [(str(i), p) for i, p in enumerate(items)], None


def gradient_body(
    params: Mapping[str, torch.Tensor],
    wire_dtype: torch.dtype | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
) -> list[memoryview]:
    """A step's body: each parameter's ``.grad`` (none for those without), in ``wire_dtype`` if given, and the
    Hessian estimates of an Adahessian step (``{name}#hessian``).

    The header, then each gradient's own memory (sent without a copy), those of whole multiples of 64 bytes
    first: the service can then step on them where they land in its buffer instead of copying them. A sparse
    gradient (``nn.Embedding(sparse=True)``) goes as its indices and values (``framing.flatten``), as torch holds them.
    """
    grads = {}
    for name, p in params.items():
        if p.grad is not None:
            g = p.grad.detach()
            if wire_dtype is not None:
                g = g.to(wire_dtype)
            grads[name] = g
    return framing.parts(framing.aligned_first(framing.flatten(grads, hessians)))


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int | None]:
    """This worker's rank and world size: as given, else from torchrun's RANK and WORLD_SIZE."""
    if rank is None:
        if "RANK" not in os.environ:
            raise ValueError("a run with several workers needs this worker's rank: pass rank= or set RANK (torchrun does)")
        rank = int(os.environ["RANK"])
    if world_size is None and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
    return rank, world_size
