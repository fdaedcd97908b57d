"""The wire format: what ``optim_format.framing`` writes is a safetensors file (the library reads it back
equal), and its zero-copy reader gives what the library gives, as views of the buffer."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optim_format import FormatError, framing, snapshot

from ..reference import bitwise_equal


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "w": base,
        "w_t": base.t(),  # not contiguous
        "half": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double()[:2],
        "i64": torch.arange(7),
        "u8": torch.arange(5, dtype=torch.uint8),
        "mask": base > 0,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def test_what_the_encoder_writes_is_read_equal_by_safetensors() -> None:
    tensors = _tensors()
    data = bytes(framing.encode(tensors, {"t": "3", "lr": "[0.1]"}))
    loaded = st_load(data)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert bitwise_equal(loaded[name], t.contiguous()), name


@pytest.mark.parametrize("writer", ["ours", "safetensors"])
def test_views_equal_what_safetensors_loads_and_share_the_buffer(writer: str) -> None:
    tensors = _tensors()
    data = (
        bytes(framing.encode(tensors, {"k": "v"}))
        if writer == "ours"
        else st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"k": "v"})
    )
    buffer = bytearray(data)
    views, metadata = framing.views(buffer)
    assert metadata == {"k": "v"}
    expected = st_load(data)
    for name, t in expected.items():
        assert views[name].dtype == t.dtype and views[name].shape == t.shape and bitwise_equal(views[name], t), name
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    w = views["w"]
    assert start <= w.data_ptr() < start + len(buffer)  # a view, not a copy
    before = w.clone()
    buffer[w.data_ptr() - start] ^= 0xFF  # a byte of the buffer changes: the view sees it
    assert not bitwise_equal(w, before)


@pytest.mark.parametrize("cut", [0, 7, 12, -1])
def test_truncated_buffers_are_refused(cut: int) -> None:
    data = bytes(framing.encode({"w": torch.ones(10)}))
    with pytest.raises(ValueError):
        framing.views(bytearray(data[:cut]))


def test_parts_are_the_file_and_share_the_tensors_memory() -> None:
    tensors = _tensors()
    pieces = framing.parts(tensors, {"k": "v"})
    assert b"".join(bytes(p) for p in pieces) == bytes(framing.encode(tensors, {"k": "v"}))
    w = tensors["w"]
    assert torch.frombuffer(pieces[1], dtype=torch.uint8).data_ptr() == w.data_ptr()  # not a copy


def test_unsupported_dtypes_are_named() -> None:
    with pytest.raises(TypeError, match="complex64"):
        framing.encode({"z": torch.zeros(2, dtype=torch.complex64)})


def _file(header: object, data: bytes, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


_W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_B = {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}
MALFORMED = {
    "gap between tensors": _file({"w": _W, "b": {**_B, "data_offsets": [9, 13]}}, bytes(13)),
    "overlapping tensors": _file({"w": _W, "b": {**_B, "data_offsets": [4, 8]}}, bytes(8)),
    "offsets past the data": _file({"w": {**_W, "data_offsets": [0, 16]}}, bytes(8)),
    "size does not fit the shape": _file({"w": {**_W, "shape": [3]}}, bytes(8)),
    "trailing bytes": _file({"w": _W}, bytes(12)),
    "unknown dtype": _file({"w": {**_W, "dtype": "F8_E8M0"}}, bytes(8)),
    "negative dimension": _file({"w": {**_W, "shape": [-2]}}, bytes(8)),
    "float dimension": _file({"w": {**_W, "shape": [2.0]}}, bytes(8)),
    "missing offsets": _file({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "header not an object": _file([1, 2], b""),
    "header not JSON": _file(b"{nope", b""),
    "header length past the end": _file({"w": _W}, bytes(8), header_len=10**9),
    "metadata not strings": _file({"__metadata__": {"k": 1}, "w": _W}, bytes(8)),
    "too short": b"\x01\x02",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_the_reader_refuses_what_safetensors_refuses(name: str) -> None:
    """The service decodes gradients with ``framing.views`` (no copy); it must refuse every file the library does."""
    data = MALFORMED[name]
    with pytest.raises(Exception):  # noqa: B017  (safetensors raises several types)
        st_load(data)
    with pytest.raises(ValueError):
        framing.views(data)


def test_the_reader_accepts_what_safetensors_accepts_in_any_header_order() -> None:
    data = _file({"b": _B, "__metadata__": {"k": "v"}, "w": _W}, struct.pack("<3f", 1.0, 2.0, 3.0))
    ours, meta = framing.views(data)
    theirs = st_load(data)
    assert meta == {"k": "v"} and set(ours) == set(theirs) == {"w", "b"}
    assert all(bitwise_equal(ours[k], theirs[k]) for k in theirs)


def _reader(data: bytes) -> Callable[[memoryview], None]:
    pos = 0

    def readinto(out: memoryview) -> None:
        nonlocal pos
        if pos + len(out) > len(data):
            raise ValueError("read past the end")
        out[:] = data[pos : pos + len(out)]
        pos += len(out)

    return readinto


@pytest.mark.parametrize("name", list(MALFORMED))
def test_the_snapshot_reader_refuses_what_safetensors_refuses(name: str) -> None:
    data = MALFORMED[name]
    with pytest.raises(FormatError):
        snapshot.read(len(data), _reader(data))


def test_the_snapshot_reader_gives_what_unpack_gives_in_memory_aligned_as_torch_allocates() -> None:
    """Recovery reads snapshots with ``snapshot.read``: views at a file's offsets may be less aligned than torch's own
    memory, and some kernels (timm's kron on AVX-512) then give other bits: every tensor gets memory of its own."""
    tensors = {**_tensors(), "odd": torch.arange(3, dtype=torch.int8), "c": torch.ones(2, dtype=torch.complex64)}
    data = bytes(snapshot.pack({"k": [1, 2]}, tensors))
    meta, got = snapshot.read(len(data), _reader(data))
    want_meta, want = snapshot.unpack(data)
    assert meta == want_meta == {"k": [1, 2]} and set(got) == set(want) == set(tensors)
    assert all(bitwise_equal(got[k], want[k]) for k in want)
    assert all(t.data_ptr() % 64 == 0 for t in got.values() if t.numel())
