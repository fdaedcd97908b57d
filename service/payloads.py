"""Tensors on the wire: safetensors bodies in and out, small JSON bodies for curl."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import xxhash

from optim_client import wire

from .errors import Invalid, InvalidPayload

Hasher = xxhash.xxh3_128


def digest(payload: bytes | memoryview) -> str:
    """The gradient's identity for exactly-once: a fast 128-bit hash of the bytes as received (the same as a
    ``Hasher`` updated with them piece by piece)."""
    return xxhash.xxh3_128_hexdigest(payload)


def decode(payload: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors body: its tensors (views of the body, to be copied, never written) and metadata.

    safetensors' own ``load`` copies every tensor out of the body, and the step copies them again onto
    the run's device in the parameter's dtype; ``wire.views`` checks the header as strictly as safetensors
    does (tested against it on the same malformed bodies) and leaves the one copy to the step.
    """
    try:
        return wire.views(payload)
    except ValueError as exc:
        raise InvalidPayload(f"the body is not a valid safetensors file: {str(exc)[:300]}") from None


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> memoryview:
    """A safetensors file, each tensor copied once into a new buffer (see ``optim_client.wire``)."""
    return wire.encode(tensors, metadata)


def from_json_lists(values: Any, like: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``{name: nested lists}`` -> tensors in the dtype of ``like[name]`` (unknown names are left to the engine)."""
    if not isinstance(values, dict):
        raise Invalid(f"{what} must be an object of name -> nested lists of numbers")
    out = {}
    for name, value in values.items():
        ref = like.get(name)
        try:
            out[name] = torch.tensor(value, dtype=ref.dtype if ref is not None else torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError) as exc:
            raise Invalid(f"{what}[{name!r}] is not a nested list of numbers: {exc}") from None
    return out
