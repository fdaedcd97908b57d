"""Liveness, readiness and the catalogue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

import optim_core

from ..storage.database import schema_status

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers and its schema is at head")
async def readyz(request: Request) -> JSONResponse:
    def check() -> tuple[bool, str]:
        engine = request.app.state.registry.ctx.db.engine
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            current, head = schema_status(engine, request.app.state.settings.database_url)
        except SQLAlchemyError as exc:
            return False, f"database unreachable: {exc.__class__.__name__}"
        if current != head:
            return False, f"database schema at {current}, code at {head}: run `optim-service migrate`"
        return True, "ready"

    ok, detail = await run_in_threadpool(check)
    return JSONResponse({"status": "ready" if ok else "unavailable", "detail": detail}, status_code=200 if ok else 503)


@router.get("/optimizers", tags=["catalogue"], summary="Every optimizer: defaults, needs, availability on this server's device")
async def optimizers(request: Request) -> dict[str, Any]:
    device = request.app.state.registry.ctx.device
    return {"device": device.type, "optimizers": [e.describe(device=device) for e in optim_core.list_optimizers()]}


@router.get("/schedulers", tags=["catalogue"], summary="Every LR scheduler")
async def schedulers() -> dict[str, Any]:
    return {"schedulers": optim_core.describe_schedulers()}
