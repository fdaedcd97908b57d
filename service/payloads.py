"""Tensors on the wire: safetensors bodies in and out, small JSON bodies for curl."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xxhash
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from optim_format import FormatError, framing

from .errors import Invalid, InvalidPayload

Hasher = xxhash.xxh3_128


def digest(payload: bytes | memoryview) -> str:
    """The gradient's identity for exactly-once: a fast 128-bit hash of the bytes as received (the same as a
    ``Hasher`` updated with them piece by piece)."""
    return xxhash.xxh3_128_hexdigest(payload)


def decode(payload: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors body: its tensors (views of the body, to be copied, never written) and metadata.

    safetensors' own ``load`` copies every tensor out of the body, and the step copies them again onto
    the run's device in the parameter's dtype; ``framing.views`` checks the header as strictly as safetensors
    does (tested against it on the same malformed bodies) and leaves the one copy to the step.
    """
    try:
        return framing.views(payload)
    except ValueError as exc:
        raise InvalidPayload(f"the body is not a valid safetensors file: {str(exc)[:300]}") from None


def decode_gradients(
    payload: bytes | bytearray | memoryview, shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A step's body: its gradients (dense, or sparse COO from ``#indices``/``#values``) and Hessian estimates
    (``#hessian``), given the run's parameter shapes (``framing.unflatten``)."""
    entries, _ = decode(payload)
    try:
        return framing.unflatten(entries, shapes)
    except FormatError as exc:
        raise InvalidPayload(f"the body's tensors do not form gradients: {str(exc)[:300]}") from None


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> memoryview:
    """A safetensors file, each tensor copied once into a new buffer (see ``optim_format.framing``)."""
    return framing.encode(tensors, metadata)


SAFETENSORS = "application/octet-stream"  # the media type of tensor bodies, in and out
TAIL_BYTES = 1 << 20


class LiveTensorsResponse(Response):
    """A safetensors answer (``framing.parts``) sent from the tensors' own memory, under the run's lock: only
    ``RunRegistry.answer`` may send it (it sets ``lock_held``; anything else is a ``RuntimeError``).

    The server's transport keeps a reference to what it could not send at once and sends it later, and
    the next step changes the parameters in place: every viewed byte must be with the kernel before the lock
    is released. The last ``TAIL_BYTES`` of the body are therefore sent as a copy, and the call returns after
    the final (empty) message, which the server sends only once its transport has drained below its
    low-water mark (uvicorn waits for ``resume_writing``, which uvloop and asyncio call at 16 KiB by default):
    what may still be queued then is part of the copied tail, never a view of the tensors.
    """

    media_type = SAFETENSORS

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], headers: Mapping[str, str]) -> None:
        self.pieces = framing.parts(tensors, metadata)
        self.lock_held = False
        size = sum(p.nbytes for p in self.pieces)
        super().__init__(None, headers={**headers, "content-length": str(size)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.lock_held:  # sent after the lock was released, it could carry half of the next step
            raise RuntimeError("a LiveTensorsResponse must be sent through RunRegistry.answer")
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        views, tail = _split_tail(self.pieces, TAIL_BYTES)
        for view in views:
            await send({"type": "http.response.body", "body": view, "more_body": True})
        await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _split_tail(pieces: list[memoryview], tail: int) -> tuple[list[memoryview], bytes]:
    """The pieces up to the last ``tail`` bytes (views, empty ones left out), and those bytes copied."""
    cut = max(0, sum(p.nbytes for p in pieces) - tail)
    views: list[memoryview] = []
    rest: list[memoryview] = []
    pos = 0
    for piece in pieces:
        head = min(piece.nbytes, max(0, cut - pos))
        if head:
            views.append(piece[:head])
        if head < piece.nbytes:
            rest.append(piece[head:])
        pos += piece.nbytes
    return views, b"".join(rest)


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
