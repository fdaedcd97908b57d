"""Request bodies: read as they stream in, refused as soon as they are known to be too large."""

from __future__ import annotations

from collections.abc import Callable

import torch
from fastapi import Request

from .errors import Invalid, PayloadTooLarge
from .payloads import Hasher

# a binary body is handed to its ``sink`` (the step log) in pieces of about this many bytes as it arrives
FEED_BYTES = 4 * 1024 * 1024


def binary_length(request: Request) -> int | None:
    """The declared length of a binary body (None for JSON or a chunked body): read into one aligned buffer."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit() or content_kind(request) == "json":
        return None
    return int(declared)


async def read_body(
    request: Request, limit: int, hasher: Hasher | None = None, sink: Callable[[memoryview], None] | None = None
) -> bytes | memoryview:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (before it is all read).

    A binary body of declared length is copied, chunk by chunk as it arrives, into memory torch allocated
    (aligned, not zeroed): its one copy happens while the rest is still on its way, and tensors viewing
    it are as aligned as torch's own. ``hasher`` is updated with each chunk (the step's digest, also
    computed while the body arrives), and ``sink`` is handed each ``FEED_BYTES`` of it as they arrive: views
    of the buffer, which is never written again here.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} (OPTIM_MAX_BODY_BYTES)")
    size = binary_length(request)
    if size is not None:
        out = torch.empty(size, dtype=torch.uint8).numpy().data if size else memoryview(bytearray())
        pos = fed = 0
        async for chunk in request.stream():
            if pos + len(chunk) > size:  # the HTTP parser frames the body by its length; this cannot happen
                raise Invalid(f"the body is longer than its Content-Length of {size} bytes")
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
            if sink is not None and pos - fed >= FEED_BYTES:
                sink(out[fed:pos])
                fed = pos
        if sink is not None and pos > fed:
            sink(out[fed:pos])
        return out[:pos]
    # chunked: the chunks are kept and joined once (a growing bytearray copies it again and again)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (OPTIM_MAX_BODY_BYTES)")
        if hasher is not None:
            hasher.update(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def content_kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    return "json" if ctype == "application/json" else "binary"
