"""A step's answer sent from the live parameters: views of the tensors, then a copied tail, and only through the
run registry's hold (``RunRegistry.answer``)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from optim_format import framing
from service import payloads


@pytest.mark.parametrize("tail", [0, 1, 8, 23, 40, 1000])
def test_a_live_answer_is_its_views_then_a_copied_tail(tail: int) -> None:
    """``LiveTensorsResponse`` sends views of the tensors, but its last ``tail`` bytes as a copy: what the
    server's transport may still hold when the run's lock is released must not change with the next step."""
    tensors = {"a": torch.arange(4, dtype=torch.float32), "empty": torch.zeros(0), "b": torch.arange(3, dtype=torch.float64)}
    pieces = framing.parts(tensors, {"t": "1"})
    before = b"".join(bytes(p) for p in pieces)
    views, copied = payloads._split_tail(pieces, tail)
    assert b"".join(bytes(v) for v in views) + copied == before
    assert len(copied) == min(tail, len(before)) and all(v.nbytes for v in views)
    for t in tensors.values():
        t.add_(100)  # the next step, in place
    assert copied == before[len(before) - len(copied) :]
    if tail == 0:
        assert b"".join(bytes(v) for v in views) != before  # views, not copies: the next step shows through them


def test_a_live_answer_is_refused_outside_the_run_s_lock() -> None:
    response = payloads.LiveTensorsResponse({"a": torch.ones(2)}, {}, {})
    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match=r"RunRegistry\.answer"):
        asyncio.run(response({"type": "http"}, None, send))  # type: ignore[arg-type]
    assert sent == []
