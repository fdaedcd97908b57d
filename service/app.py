"""The FastAPI application: settings, engine and the run manager are created in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import optim_core

from .auth import LOCAL_TENANT, is_loopback
from .blobs import BlobStore, DatabaseBlobStore, DirectoryBlobStore
from .db import make_engine, make_sessionmaker, schema_status
from .deps import RunLocks
from .errors import ServiceError, from_engine
from .routes import checkpoints, health, runs
from .runtime import RunManager
from .settings import Settings

log = logging.getLogger("optim_service")


class SchemaNotAtHead(RuntimeError):
    pass


def make_blob_store(settings: Settings) -> BlobStore:
    if settings.blob_store == "directory":
        return DirectoryBlobStore(settings.blob_dir, spare_bytes=settings.blob_spare_bytes)
    return DatabaseBlobStore(settings.blob_chunk_bytes)


def create_app(settings: Settings | None = None, *, host: str = "127.0.0.1") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = settings or Settings()
        engine = make_engine(cfg)
        current, head = schema_status(engine, cfg.database_url)
        if current != head:
            engine.dispose()
            raise SchemaNotAtHead(
                f"the database schema is at {current or 'nothing'}, this code needs {head}: run `optim-service migrate` first"
            )
        manager = RunManager(cfg, make_sessionmaker(engine), make_blob_store(cfg))
        removed = manager.collect_garbage()
        if removed:
            log.info("removed %d unreferenced blobs", removed)
        app.state.settings, app.state.engine, app.state.manager, app.state.locks = cfg, engine, manager, RunLocks()
        app.state.auth_required = cfg.auth == "required" or not is_loopback(host)
        if app.state.auth_required:
            log.info("authentication on: requests need Authorization: Bearer <key> (optim-service keys create --tenant T)")
        else:
            log.warning(
                "authentication off: listening on loopback %s, every request acts as the single tenant %r "
                "(OPTIM_AUTH=required to require API keys)",
                host,
                LOCAL_TENANT,
            )
        log.info(
            "optim-service ready: device=%s database=%s blobs=%s", manager.device, cfg.database_url.split("@")[-1], cfg.blob_store
        )
        try:
            yield
        finally:
            manager.flush_all()
            manager.close()
            engine.dispose()

    app = FastAPI(
        title="optim-service",
        version="0.1.0",
        summary="The optimizer of a training run, hosted: every torch.optim and timm optimizer, durable and exactly resumable.",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(optim_core.EngineError)
    async def engine_error(request: Request, exc: optim_core.EngineError) -> JSONResponse:
        return await service_error(request, from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "Invalid", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPError", "detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.include_router(health.router)
    app.include_router(runs.router)
    app.include_router(checkpoints.router)
    return app
