"""Request bodies: read as they stream in, refused as soon as they are known to be too large."""

from __future__ import annotations

import torch
from fastapi import Request

from .errors import Invalid, PayloadTooLarge
from .payloads import Hasher


async def read_body(request: Request, limit: int, hasher: Hasher | None = None) -> bytes | memoryview:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (before it is all read).

    A binary body of declared length is copied, chunk by chunk as it arrives, into memory torch allocated
    (aligned, not zeroed): its one copy happens while the rest is still on its way, and tensors viewing
    it are as aligned as torch's own. ``hasher`` is updated with each chunk (the step's digest, also
    computed while the body arrives).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} (OPTIM_MAX_BODY_BYTES)")
    if declared is not None and declared.isdigit() and content_kind(request) != "json":
        size = int(declared)
        out = torch.empty(size, dtype=torch.uint8).numpy().data if size else memoryview(bytearray())
        pos = 0
        async for chunk in request.stream():
            if pos + len(chunk) > size:  # the HTTP parser frames the body by its length; this cannot happen
                raise Invalid(f"the body is longer than its Content-Length of {size} bytes")
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
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
