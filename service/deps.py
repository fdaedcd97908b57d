"""Typed dependencies of the routes: the run registry, the settings, the caller's tenant, a run's name."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from schemas.runs import RUN_NAME_PATTERN

from .auth import LOCAL_TENANT, tenant_for
from .errors import Unauthorized
from .logs import note
from .runs import RunRegistry
from .settings import Settings


def get_registry(request: Request) -> RunRegistry:
    return request.app.state.registry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_tenant(request: Request) -> str:
    """The caller's tenant: from its API key when authentication is on, else the local tenant (in the request's log
    line either way; the key never is)."""
    tenant = await _tenant(request)
    note(request.scope, tenant=tenant)
    return tenant


async def _tenant(request: Request) -> str:
    if not request.app.state.auth_required:
        return LOCAL_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("this server requires an API key: send Authorization: Bearer <key>")
    registry: RunRegistry = request.app.state.registry

    def lookup() -> str | None:
        with registry.ctx.db.read("checking the API key") as repo:
            return tenant_for(repo, key.strip())

    tenant = await run_in_threadpool(lookup)
    if tenant is None:
        raise Unauthorized("unknown or revoked API key")
    return tenant


RegistryDep = Annotated[RunRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
RunName = Annotated[str, Path(pattern=RUN_NAME_PATTERN, description="The run's name.")]
