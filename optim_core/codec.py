"""State trees <-> (JSON, named tensors), and the snapshot container.

Optimizer and scheduler ``state_dict``s are trees of dicts, lists, tuples, numbers, strings and tensors.
``encode_tree`` turns one into plain JSON in which every tensor is replaced by a reference to a named
tensor, so a snapshot is a safetensors file (the tensors) whose metadata holds the JSON (everything
else). Nothing is pickled; ``decode_tree`` accepts only the types it wrote.

Dicts are written as sorted ``[key, value]`` pairs so that the same state always gives the same
bytes: the digest of a resumed run must equal that of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optim_client import wire

from .errors import SnapshotError

_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise SnapshotError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


def _key_order(key: Any) -> tuple[str, str]:
    return (type(key).__name__, str(key))


def encode_tree(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Return a JSON-able copy of ``obj``; tensors go to ``tensors`` under a key derived from ``path``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise SnapshotError(f"two tensors would be stored under {path!r}")
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": dtype_name(obj)}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: _key_order(kv[0]))
        pairs = []
        for k, v in items:
            if not isinstance(k, (str, int)):
                raise SnapshotError(f"cannot store a key of type {type(k).__name__} at {path!r}")
            pairs.append([k, encode_tree(v, f"{path}/{k}", tensors)])
        return {"__dict__": pairs}
    raise SnapshotError(f"cannot store a value of type {type(obj).__name__} at {path!r}")


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            try:
                return tensors[value]
            except KeyError:
                raise SnapshotError(f"snapshot refers to a missing tensor {value!r}") from None
        if tag == "__float__":
            return float(value)
        if tag == "__dtype__":
            return parse_dtype(value)
        if tag == "__device__":
            return torch.device(value)
        if tag == "__tuple__":
            return tuple(decode_tree(v, tensors) for v in value)
        if tag == "__dict__":
            return {k: decode_tree(v, tensors) for k, v in value}
    raise SnapshotError(f"unexpected value in snapshot: {str(obj)[:80]}")


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def pack_parts(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """A safetensors file of ``tensors``, with ``meta`` as JSON in the header's metadata, as a list of buffers:
    the header, then each tensor's own memory (``optim_client.wire.parts``: nothing on the CPU is copied), to be written
    one after the other while the tensors stay unchanged. A snapshot of a 10M AdamW state (120 MB) is thus
    written to its blob with no serialized copy of it in memory: a copy would double the state's footprint
    while it is written, and cost the steps beside it a core (``safetensors.torch.save`` copies every tensor
    three times: 46-50 ms for 40 MB here). The library writes what the wire does not know (complex dtypes)."""
    metadata = {"optim": json.dumps(meta, sort_keys=True, allow_nan=False)}
    if all(t.dtype in wire.DTYPES for t in tensors.values()):
        return wire.parts(tensors, metadata)
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
_SNAPSHOT_DTYPES = {**wire.BY_NAME, "C64": torch.complex64}
_MAX_HEADER = 100_000_000  # as safetensors


def unpack(data: bytes | memoryview) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    data = data if isinstance(data, bytes) else bytes(data)  # safetensors reads bytes only
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["optim"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"not a snapshot: {exc}") from None
    return meta, tensors


def read(size: int, readinto: Callable[[memoryview], None]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``unpack`` of a snapshot of ``size`` bytes that ``readinto`` reads in order (each call fills the
    buffer it is given, or raises): every tensor is read straight into memory of its own, allocated as
    torch allocates (so aligned as in the run that wrote it: some kernels' results depend on alignment),
    with no copy of the whole file in between. The header is checked as strictly as safetensors checks
    it (``optim_client.wire.parse_header``).
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
        entries, metadata = wire.parse_header(raw, size - 8 - header_len, _SNAPSHOT_DTYPES)
        meta = json.loads(metadata["optim"])
        tensors: dict[str, torch.Tensor] = {}
        for begin, end, name, dtype, shape in entries:
            t = torch.empty(shape, dtype=dtype)
            if end > begin:
                readinto(t.reshape(-1).view(torch.uint8).numpy().data)
            tensors[name] = t
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SnapshotError(f"not a snapshot: {exc}") from None
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
        h.update(f"\0{key}\0{dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(wire.tensor_bytes(t))
    return f"xxh3:{h.hexdigest()}" if algorithm == "xxh3" else str(h.hexdigest())


def digest_matches(recorded: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bool:
    return digest(meta, tensors, "xxh3" if recorded.startswith("xxh3:") else "blake2b") == recorded
