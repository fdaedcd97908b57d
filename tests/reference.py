"""Shared pieces of the engine tests: a small model, gradients, bitwise comparison, and specs.

The reference for every algorithm is torch's or timm's own implementation, run in this process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

# Where tests that step run: the CPU, and CUDA where this machine has it (marked, so `-m "not cuda"` leaves it out).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


class Net(nn.Module):
    """Small, with the parameter kinds that matter for grouping: weights, biases, a norm."""

    def __init__(self, *, only_2d: bool = False) -> None:
        super().__init__()
        bias = not only_2d
        self.embed = nn.Linear(6, 8, bias=bias)
        self.norm = nn.LayerNorm(8) if not only_2d else nn.Identity()
        self.blocks = nn.Sequential(nn.Linear(8, 8, bias=bias), nn.Linear(8, 8, bias=bias))
        self.head = nn.Linear(8, 3, bias=bias)


def make_model(seed: int = 0, *, only_2d: bool = False, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net(only_2d=only_2d).to(dtype)


def manifest(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")} for n, p in model.named_parameters()
    ]


def initial_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def make_grads(
    model: nn.Module, steps: int, seed: int = 1, *, drop: tuple[int, str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Deterministic gradients; ``drop=(k, name)`` leaves ``name`` without a gradient at step k."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        grads = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
        if drop is not None and drop[0] == k:
            del grads[drop[1]]
        out.append(grads)
    return out


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n].to(p.device, copy=True) if n in grads else None


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits; sparse COO tensors: the same indices and values in the same order, coalesced alike."""
    if a.layout == torch.sparse_coo or b.layout == torch.sparse_coo:
        return (
            a.layout == b.layout
            and a.shape == b.shape
            and a.is_coalesced() == b.is_coalesced()
            and bitwise_equal(a._indices(), b._indices())
            and bitwise_equal(a._values(), b._values())
        )
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_tree_bitwise(a: Any, b: Any, path: str = "") -> None:
    """Two state trees are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert bitwise_equal(a, b), f"{path}: tensors differ ({a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        )
        for k in a:
            assert_tree_bitwise(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_tree_bitwise(x, y, f"{path}/{i}")
    elif isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        pass  # both NaN
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_params_bitwise(model: nn.Module, params: dict[str, torch.Tensor], what: str = "") -> None:
    for n, p in model.named_parameters():
        assert bitwise_equal(p, params[n]), f"{what}: parameter {n!r} differs"
