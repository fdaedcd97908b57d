"""What a run takes in, checked before anything changes: the initial parameters against the manifest, gradient
payloads against the parameters, and the finiteness of gradients, losses and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optim_format import dtypes, framing

from . import sparse
from .errors import GradientError, SpecError
from .export import describe_tensor
from .spec import RunSpec, is_finite_number


def check_finite(what: str, value: Any) -> None:
    if value is not None and not is_finite_number(value):
        raise GradientError(f"{what} must be a finite number, got {str(value)[:40]}")


def check_initial_params(spec: RunSpec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The initial values, checked against the manifest (names, shapes, dtypes)."""
    if not isinstance(params, Mapping):
        raise SpecError(f"initial parameters must map names to tensors, got {type(params).__name__}")
    expected = {p.name for p in spec.params}
    missing = sorted(expected - set(params))
    unknown = sorted(set(params) - expected)
    if missing or unknown:
        raise SpecError(f"initial parameters do not match the manifest: missing {missing[:10]}, unknown {unknown[:10]}")
    out = {}
    for info in spec.params:
        t = params[info.name]
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"initial value of {info.name!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != info.shape or t.dtype != info.torch_dtype:
            raise SpecError(
                f"initial value of {info.name!r} is {describe_tensor(t)}; the manifest says {info.dtype} {list(info.shape)}"
            )
        out[info.name] = t
    return out


def check_gradients(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    entry_name: str,
    donate: bool = False,
) -> dict[str, torch.Tensor]:
    """Validate a gradient payload; return it on the run's device in each parameter's dtype.

    A missing name means "no gradient" (``p.grad is None``), as in torch. A sparse COO gradient stays sparse.
    Lower-precision float
    gradients (bf16/fp16 on the wire) are applied in the parameter's dtype. Each gradient is copied (the
    optimizer may change ``.grad`` in place), except with ``donate``: the caller gives its tensors to the
    step and will not read them again, so one already on the device, in the parameter's dtype, contiguous
    and as aligned as torch's own allocations (``framing.ALIGN``) is used as it is; one at another offset is
    copied (some kernels, MKL's among them, may take another path, and round differently, on less aligned memory).
    """
    if not isinstance(grads, Mapping):
        raise GradientError(f"gradients must map parameter names to tensors, got {type(grads).__name__}")
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise GradientError(
            f"unknown parameter name(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''}; "
            f"the run has {len(params)} parameters, e.g. {list(params)[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        p = params[name]
        if not isinstance(g, torch.Tensor):
            raise GradientError(f"gradient {name!r} is a {type(g).__name__}, not a tensor")
        if g.layout not in (torch.strided, torch.sparse_coo):
            raise GradientError(f"gradient {name!r} is {g.layout}; gradients are dense (strided) or sparse COO")
        if not g.is_floating_point():
            raise GradientError(f"gradient {name!r} has dtype {dtypes.name_of(g.dtype)}; gradients must be floating point")
        if tuple(g.shape) != tuple(p.shape):
            raise GradientError(f"gradient {name!r} has shape {list(g.shape)}; the parameter has shape {list(p.shape)}")
        if g.dtype != p.dtype and torch.finfo(g.dtype).bits >= torch.finfo(p.dtype).bits:
            raise GradientError(
                f"gradient {name!r} has dtype {dtypes.name_of(g.dtype)}, the parameter {dtypes.name_of(p.dtype)}; "
                "a gradient must have the parameter's dtype or a narrower float (float16, bfloat16)"
            )
        if g.layout == torch.sparse_coo:  # its indices checked; always copied (optim_core.sparse)
            out[name] = sparse.checked(name, g, p.dtype, device)
        elif donate and g.device == device and g.dtype == p.dtype and g.is_contiguous() and g.data_ptr() % framing.ALIGN == 0:
            out[name] = g.detach()
        else:  # a fresh copy: the optimizer may change .grad in place, and must not change the caller's tensors
            out[name] = g.detach().to(device=device, dtype=p.dtype, copy=True)
    return out


def nonfinite(grads: Mapping[str, torch.Tensor], suffix: str = "") -> list[str]:
    """The names (+ ``suffix``) of the gradients holding NaN or Inf. A tensor's 2-norm is finite when all of it is
    (NaN and Inf carry through the sum of squares), and costs one vectorized pass, where
    ``isfinite(g).all()`` costs ~10x more on CPU; only a non-finite norm (which a very large but finite
    gradient can give, by overflow) is checked element by element. A sparse gradient is checked by its values."""
    if not grads:
        return []
    names = list(grads)
    dense = {n: sparse.nonfinite_view(grads[n]) for n in names}
    finite = torch.isfinite(torch.stack([torch.linalg.vector_norm(dense[n]).float() for n in names])).tolist()
    return sorted(n + suffix for n, ok in zip(names, finite, strict=True) if not ok and not bool(torch.isfinite(dense[n]).all()))
