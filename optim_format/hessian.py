"""The Hessian request: what a worker needs to compute, for one step of timm's ``Adahessian``, the Hutchinson
estimate of the Hessian diagonal exactly as timm's ``set_hessian`` would on the service.

timm draws its probes ``z`` from a generator of its own (``Adahessian.generator``, not in ``state_dict``) and
re-estimates a parameter only every ``update_each`` steps. The run owns that generator and those counters;
before a step the engine says which parameters get a fresh estimate if they have a gradient (in timm's
order), the generator's state to draw from, how many probes, and their dtype. The worker answers with one
tensor per such parameter, sent beside its gradient as ``{name}#hessian`` (``framing.flatten``).

As JSON (``to_dict``)::

    {"t": 12, "params": ["conv.weight", "conv.bias", ...], "n_samples": 1, "z_dtype": "float32",
     "generator": {"device": "cpu", "state": "<base64 of torch.Generator.get_state()>"}}
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import dtypes
from .errors import FormatError


@dataclass(frozen=True)
class HessianRequest:
    t: int
    params: tuple[str, ...]  # timm's order; an empty tuple: no estimate this step (update_each)
    n_samples: int
    z_dtype: str  # the dtype timm's probes have: torch's default dtype on the service
    generator_device: str  # "cpu" or "cuda": the device type of the run's generator
    generator_state: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "params": list(self.params),
            "n_samples": self.n_samples,
            "z_dtype": self.z_dtype,
            "generator": {"device": self.generator_device, "state": base64.b64encode(self.generator_state).decode()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HessianRequest:
        try:
            generator = data["generator"]
            request = cls(
                t=data["t"],
                params=tuple(data["params"]),
                n_samples=data["n_samples"],
                z_dtype=data["z_dtype"],
                generator_device=generator["device"],
                generator_state=base64.b64decode(generator["state"], validate=True),
            )
        except (KeyError, TypeError, binascii.Error) as exc:
            raise FormatError(f"not a Hessian request: {type(exc).__name__}: {exc}") from None
        if isinstance(request.t, bool) or not isinstance(request.t, int) or request.t < 0:
            raise FormatError(f"Hessian request: t must be a non-negative integer, got {request.t!r}")
        if isinstance(request.n_samples, bool) or not isinstance(request.n_samples, int) or request.n_samples < 1:
            raise FormatError(f"Hessian request: n_samples must be a positive integer, got {request.n_samples!r}")
        if not all(isinstance(n, str) for n in request.params):
            raise FormatError(f"Hessian request: params must be parameter names, got {list(request.params)[:5]}")
        if request.z_dtype not in dtypes.FLOAT_NAMES:
            raise FormatError(f"Hessian request: z_dtype must be one of {list(dtypes.FLOAT_NAMES)}, got {request.z_dtype!r}")
        if request.generator_device not in ("cpu", "cuda"):
            raise FormatError(f"Hessian request: generator.device must be 'cpu' or 'cuda', got {request.generator_device!r}")
        return request

    def generator(self, device: str | torch.device | None = None) -> torch.Generator:
        """A generator in the request's state, on ``device`` (default: the request's device type; a CUDA state
        needs a CUDA device: the probes are drawn where the run's generator lives)."""
        where = torch.device(device if device is not None else self.generator_device)
        if where.type != self.generator_device:
            raise FormatError(
                f"the run's generator is a {self.generator_device} generator; its probes cannot be drawn on {where}"
            )
        g = torch.Generator(where)
        try:
            g.set_state(torch.frombuffer(bytearray(self.generator_state), dtype=torch.uint8))
        except RuntimeError as exc:
            raise FormatError(f"Hessian request: not a {self.generator_device} generator state: {exc}") from None
        return g
