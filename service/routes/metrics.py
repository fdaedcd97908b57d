"""Prometheus' scrape (issue 20): ``GET /metrics`` in its text format; an API key is needed where the server
requires them (it names every tenant), unless ``OPTIM_METRICS_REQUIRE_KEY`` says otherwise."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ..auth import tenant_for
from ..deps import RegistryDep, SettingsDep
from ..errors import Unauthorized
from ..metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (README: each one)", response_class=Response)
async def metrics(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    required = settings.metrics_require_key
    if required is None:
        required = bool(request.app.state.auth_required)
    if required:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("this server's metrics need an API key: send Authorization: Bearer <key>")

        def lookup() -> str | None:
            with registry.ctx.db.read("checking the API key") as repo:
                return tenant_for(repo, key.strip())

        if await run_in_threadpool(lookup) is None:
            raise Unauthorized("unknown or revoked API key")
    return Response(registry.ctx.metrics.render(), media_type=CONTENT_TYPE)
