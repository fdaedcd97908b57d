"""The wire format: what ``optim_client.wire`` writes is a safetensors file (the library reads it back
equal), and its zero-copy reader gives what the library gives, as views of the buffer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optim_client import wire

from .reference import bitwise_equal


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
    data = bytes(wire.encode(tensors, {"t": "3", "lr": "[0.1]"}))
    loaded = st_load(data)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert bitwise_equal(loaded[name], t.contiguous()), name


@pytest.mark.parametrize("writer", ["ours", "safetensors"])
def test_views_equal_what_safetensors_loads_and_share_the_buffer(writer: str) -> None:
    tensors = _tensors()
    data = (
        bytes(wire.encode(tensors, {"k": "v"}))
        if writer == "ours"
        else st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"k": "v"})
    )
    buffer = bytearray(data)
    views, metadata = wire.views(buffer)
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
    data = bytes(wire.encode({"w": torch.ones(10)}))
    with pytest.raises(ValueError):
        wire.views(bytearray(data[:cut]))


def test_the_encoder_reuses_its_buffer_while_the_size_stays() -> None:
    enc = wire.Encoder()
    a = enc.encode({"w": torch.ones(100)})
    first = torch.frombuffer(a, dtype=torch.uint8).data_ptr()
    b = enc.encode({"w": torch.full((100,), 2.0)})
    assert torch.frombuffer(b, dtype=torch.uint8).data_ptr() == first
    assert bitwise_equal(st_load(bytes(b))["w"], torch.full((100,), 2.0))
    c = enc.encode({"w": torch.ones(101)})
    assert len(c) != len(b) and bitwise_equal(st_load(bytes(c))["w"], torch.ones(101))


def test_unsupported_dtypes_are_named() -> None:
    with pytest.raises(TypeError, match="complex64"):
        wire.encode({"z": torch.zeros(2, dtype=torch.complex64)})
