"""Tensors on the wire, in the safetensors format, with as few copies as the format allows.

``safetensors.torch.save`` builds its output in Rust and hands it to Python as a new ``bytes``
(a 40 MB body costs ~14–40 ms, most of it first-touch page faults on fresh memory), and ``load``
copies every tensor out of the buffer. A training loop sends the same shapes every step, so:

- ``encode`` writes the header and each tensor's bytes once, into a buffer that can be reused
  from one step to the next (``Encoder``);
- ``views`` gives tensors that *are* slices of a received buffer (``torch.frombuffer``), for a
  caller that copies them into place at once (the client writing the parameters).

The files are ordinary safetensors files (``safetensors.torch.load`` reads them; tested). The
service decodes what clients send with the safetensors library itself, which validates the header.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
BY_NAME = {v: k for k, v in DTYPES.items()}


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which the wire format does not carry")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return header, offset


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Encoder:
    """Encodes into one buffer, kept and reused while the encoded size stays the same."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def encode(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> memoryview:
        """The safetensors file of ``tensors``; valid until the next call (it lives in this encoder's buffer)."""
        header, data_size = _header(tensors, metadata)
        size = 8 + len(header) + data_size
        if len(self._buffer) != size:
            self._buffer = bytearray(size)
        out = memoryview(self._buffer)
        struct.pack_into("<Q", out, 0, len(header))
        out[8 : 8 + len(header)] = header
        pos = 8 + len(header)
        for t in tensors.values():
            data = _bytes_of(t)
            out[pos : pos + len(data)] = data
            pos += len(data)
        return out


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> memoryview:
    """The safetensors file of ``tensors`` in a new buffer (one copy of each tensor)."""
    return Encoder().encode(tensors, metadata)


def views(buffer: bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share memory with ``buffer`` (a safetensors file), and its metadata.

    For a buffer the caller owns and will not change while the tensors are in use; offsets and
    sizes are checked against the buffer.
    """
    view = memoryview(buffer)
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes is not a safetensors file")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > len(view) - 8:
        raise ValueError("the safetensors header runs past the end of the body")
    header = json.loads(bytes(view[8 : 8 + header_len]))
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = BY_NAME[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = [int(s) for s in info["shape"]]
        numel = 1
        for s in shape:
            numel *= s
        item = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * item or start + end > len(view) or begin < 0:
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not fit its shape {shape} or the body")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(view, dtype=dtype, count=numel, offset=start + begin).view(shape)
    return out, metadata
