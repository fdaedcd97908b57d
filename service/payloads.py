"""Tensors on the wire: safetensors bodies in and out, small JSON bodies for curl."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import xxhash
from safetensors.torch import load as st_load

from optim_client import wire

from .errors import Invalid, InvalidPayload


def digest(payload: bytes | memoryview) -> str:
    """The gradient's identity for exactly-once: a fast 128-bit hash of the bytes as received."""
    return xxhash.xxh3_128_hexdigest(payload)


def decode(payload: bytes | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors body: its tensors and metadata. The library checks offsets and sizes against the header."""
    data = payload if isinstance(payload, bytes) else bytes(payload)
    if len(data) < 8:
        raise InvalidPayload(f"the body is {len(data)} bytes: not a safetensors file (an 8-byte header length comes first)")
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except Exception as exc:  # whatever the parser says of a client's bytes is a 400 (unknown dtypes: KeyError)
        raise InvalidPayload(f"the body is not a valid safetensors file: {type(exc).__name__}: {str(exc)[:200]}") from None
    metadata = header.get("__metadata__") or {}
    return tensors, metadata


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
