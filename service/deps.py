"""Typed dependencies for the routes, and the helpers that run a service call under the run's lock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from schemas.runs import RUN_NAME_PATTERN

from .errors import PayloadTooLarge
from .runtime import Live, RunManager
from .settings import Settings

T = TypeVar("T")
LOCAL_TENANT = "local"


def get_manager(request: Request) -> RunManager:
    return request.app.state.manager


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_tenant() -> str:
    # a single local tenant until authentication arrives (issue 5)
    return LOCAL_TENANT


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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} (OPTIM_MAX_BODY_BYTES)")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (OPTIM_MAX_BODY_BYTES)")
    return bytes(buf)


def content_kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    return "json" if ctype == "application/json" else "binary"
