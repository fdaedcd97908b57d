"""A run's whole state as one file: a safetensors file of its tensors whose metadata holds the rest as JSON
(``tree.encode_tree``), written from the tensors' own memory and read straight into tensors of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import dtypes, framing
from .errors import FormatError


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def pack_parts(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """A safetensors file of ``tensors``, with ``meta`` as JSON in the header's metadata, as a list of buffers:
    the header, then each tensor's own memory (``optim_client.framing.parts``: nothing on the CPU is copied), to be written
    one after the other while the tensors stay unchanged. A snapshot of a 10M AdamW state (120 MB) is thus
    written to its blob with no serialized copy of it in memory: a copy would double the state's footprint
    while it is written, and cost the steps beside it a core (``safetensors.torch.save`` copies every tensor
    three times: 46-50 ms for 40 MB here). The library writes what the wire does not know (complex dtypes)."""
    metadata = {"optim": json.dumps(meta, sort_keys=True, allow_nan=False)}
    if all(t.dtype in framing.DTYPES for t in tensors.values()):
        return framing.parts(tensors, metadata)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = _cpu_contiguous(t)
        # safetensors refuses tensors that share memory; a copy keeps each entry independent
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[key] = t
    return [memoryview(st_save(out, metadata=metadata))]


def pack(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    """``pack_parts`` joined into one buffer (one copy of each tensor)."""
    return b"".join(pack_parts(meta, tensors))


# the dtypes a snapshot may hold: the wire's, and complex (which ``pack_parts`` leaves to safetensors itself)
_SNAPSHOT_DTYPES = {**framing.BY_CODE, "C64": torch.complex64}
_MAX_HEADER = 100_000_000  # as safetensors


def unpack(data: bytes | memoryview) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    data = data if isinstance(data, bytes) else bytes(data)  # safetensors reads bytes only
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["optim"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"not a snapshot: {exc}") from None
    return meta, tensors


def read(size: int, readinto: Callable[[memoryview], None]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``unpack`` of a snapshot of ``size`` bytes that ``readinto`` reads in order (each call fills the
    buffer it is given, or raises): every tensor is read straight into memory of its own, allocated as
    torch allocates (so aligned as in the run that wrote it: some kernels' results depend on alignment),
    with no copy of the whole file in between. The header is checked as strictly as safetensors checks
    it (``optim_client.framing.parse_header``).
    """
    try:
        if size < 8:
            raise ValueError(f"{size} bytes is not a safetensors file")
        head = bytearray(8)
        readinto(memoryview(head))
        header_len = int.from_bytes(head, "little")
        if header_len > min(_MAX_HEADER, size - 8):
            raise ValueError(f"the header length {header_len} runs past the end of the {size}-byte file")
        raw = bytearray(header_len)
        readinto(memoryview(raw))
        entries, metadata = framing.parse_header(raw, size - 8 - header_len, _SNAPSHOT_DTYPES)
        meta = json.loads(metadata["optim"])
        tensors: dict[str, torch.Tensor] = {}
        for begin, end, name, dtype, shape in entries:
            t = torch.empty(shape, dtype=dtype)
            if end > begin:
                readinto(t.reshape(-1).view(torch.uint8).numpy().data)
            tensors[name] = t
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise FormatError(f"not a snapshot: {exc}") from None
    return meta, tensors


def digest(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], algorithm: str = "xxh3") -> str:
    """A hash of the whole state: canonical JSON, then every tensor's name, dtype, shape and bytes.

    ``xxh3:<128-bit hex>`` (~20 GB/s: it is computed for every snapshot and checked at every recovery;
    blake2b took 130 ms for a 10M-parameter AdamW state). Digests recorded before carry no prefix and
    were blake2b-256: ``digest_matches`` checks either.
    """
    h: Any = xxhash.xxh3_128() if algorithm == "xxh3" else hashlib.blake2b(digest_size=32)
    h.update(json.dumps(meta, sort_keys=True, allow_nan=False).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\0{key}\0{dtypes.name_of(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(framing.tensor_bytes(t))
    return f"xxh3:{h.hexdigest()}" if algorithm == "xxh3" else str(h.hexdigest())


def digest_matches(recorded: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bool:
    return digest(meta, tensors, "xxh3" if recorded.startswith("xxh3:") else "blake2b") == recorded
