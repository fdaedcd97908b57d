"""The one dtype table: each tensor dtype the project carries, by torch dtype, by the name a spec or a
snapshot's JSON uses (``"float32"``, as ``str(torch.float32)`` without ``torch.``), and by safetensors'
code (``"F32"``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FormatError


@dataclass(frozen=True)
class DType:
    torch: torch.dtype
    name: str  # as specs and snapshots spell it
    code: str  # as safetensors headers spell it
    framed: bool = True  # written by ``framing`` itself; complex dtypes are left to the safetensors library

    @property
    def floating(self) -> bool:
        return self.torch.is_floating_point


TABLE: tuple[DType, ...] = (
    DType(torch.float64, "float64", "F64"),
    DType(torch.float32, "float32", "F32"),
    DType(torch.float16, "float16", "F16"),
    DType(torch.bfloat16, "bfloat16", "BF16"),
    DType(torch.int64, "int64", "I64"),
    DType(torch.int32, "int32", "I32"),
    DType(torch.int16, "int16", "I16"),
    DType(torch.int8, "int8", "I8"),
    DType(torch.uint8, "uint8", "U8"),
    DType(torch.bool, "bool", "BOOL"),
    DType(torch.complex64, "complex64", "C64", framed=False),
    DType(torch.complex128, "complex128", "C128", framed=False),
)
BY_TORCH = {d.torch: d for d in TABLE}
BY_NAME = {d.name: d for d in TABLE}
BY_CODE = {d.code: d for d in TABLE}
# the dtypes a parameter may have (a spec's manifest)
FLOAT_NAMES = tuple(d.name for d in TABLE if d.floating)


def name_of(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (any dtype, in the table or not)."""
    return str(dtype).removeprefix("torch.")


def parse(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; a name not in the table is a ``FormatError`` listing the known ones."""
    d = BY_NAME.get(name) if isinstance(name, str) else None
    if d is None:
        raise FormatError(f"unknown dtype {name!r}; known: {sorted(BY_NAME)}")
    return d.torch
