"""Typed dependencies for the routes, and the helpers that run a service call under the run's lock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import torch
from fastapi import Depends, Path, Request, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from schemas.runs import RUN_NAME_PATTERN

from .auth import LOCAL_TENANT, tenant_for
from .errors import Invalid, PayloadTooLarge, StorageUnavailable, Unauthorized
from .payloads import Hasher, LiveTensorsResponse
from .runtime import Live, RunManager
from .settings import Settings

T = TypeVar("T")


def get_manager(request: Request) -> RunManager:
    return request.app.state.manager


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_tenant(request: Request) -> str:
    """The caller's tenant: from its API key when authentication is on, else the local tenant."""
    if not request.app.state.auth_required:
        return LOCAL_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("this server requires an API key: send Authorization: Bearer <key>")
    try:
        with request.app.state.manager.sessions() as session:
            tenant = tenant_for(session, key.strip())
    except SQLAlchemyError as exc:
        raise StorageUnavailable(f"the database is unavailable while checking the API key: {exc.__class__.__name__}") from exc
    if tenant is None:
        raise Unauthorized("unknown or revoked API key")
    return tenant


ManagerDep = Annotated[RunManager, Depends(get_manager)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
RunName = Annotated[str, Path(pattern=RUN_NAME_PATTERN, description="The run's name.")]


class RunLocks:
    """One asyncio lock per run: requests on a run are serialized, runs proceed in parallel."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def __call__(self, tenant: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((tenant, name), asyncio.Lock())


async def on_run(request: Request, tenant: str, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Resolve the live run (recovering it if needed) and call ``fn(live, ...)`` in a thread, under the run's lock."""
    manager: RunManager = request.app.state.manager
    async with request.app.state.locks(tenant, name):
        live: Live = await run_in_threadpool(manager.get, tenant, name)
        return await run_in_threadpool(fn, live, *args, **kwargs)


class SentUnderLock(Response):
    """The answer of ``fn(live, ...)``, called under the run's lock and *sent* under it too.

    ``on_run`` releases the lock before Starlette sends the answer, so an answer built there must own its
    bytes (a 40 MB copy of the parameters, ~4-7 ms per step here). This one holds the lock until its
    answer's last byte is with the server's transport: a ``LiveTensorsResponse`` is then sent from the live
    tensors' own memory. A step's worker waits for this answer before it sends the next step, so holding the
    lock costs it nothing; other requests on the run wait for the send. Errors before the answer starts go
    to the app's exception handlers as any route's do. ``after`` runs once the lock is released (a due
    snapshot).
    """

    def __init__(
        self,
        request: Request,
        tenant: str,
        name: str,
        fn: Callable[..., Response],
        *args: Any,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.request, self.tenant, self.name, self.fn, self.args, self.after = request, tenant, name, fn, args, after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager: RunManager = self.request.app.state.manager
        async with self.request.app.state.locks(self.tenant, self.name):
            live: Live = await run_in_threadpool(manager.get, self.tenant, self.name)
            response = await run_in_threadpool(self.fn, live, *self.args)
            if isinstance(response, LiveTensorsResponse):
                response.lock_held = True
            await response(scope, receive, send)
        if self.after is not None:
            await self.after()


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
