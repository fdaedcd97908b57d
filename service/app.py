"""The FastAPI application: settings, the database, the blob store and the run registry are made in its lifespan;
one handler renders every error."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import optim_core
from schemas import RunCreate

from .auth import LOCAL_TENANT, is_loopback
from .errors import ServiceError, from_engine
from .logs import RequestLog, note
from .metrics import Metrics
from .routes import checkpoints, health, history, runs, schedule, steps, ui
from .routes import metrics as metrics_route
from .runs import RunContext, RunRegistry, Snapshots
from .settings import Settings
from .stepper import Stepper
from .storage import Database, make_blob_store, make_engine, require_schema

log = logging.getLogger("optim_service")


def create_app(settings: Settings | None = None, *, host: str = "127.0.0.1", live_answers: bool = False) -> FastAPI:
    """``live_answers``: a step's answer is sent from the live parameters (``payloads.LiveTensorsResponse``),
    which is safe only under the server ``service.cli serve`` runs (uvicorn's flow control, ``BodyProtocol``);
    otherwise answers are copies."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = settings or Settings()
        engine = make_engine(cfg)
        try:
            require_schema(engine, cfg)
        except BaseException:
            engine.dispose()
            raise
        metrics = Metrics(per_run=cfg.metrics_per_run)
        db = Database(engine, on_error=metrics.storage_errors.inc)
        with db.read("choosing the blob store") as repo:
            blobs = make_blob_store(cfg, repo)
        ctx = RunContext(
            settings=cfg,
            db=db,
            blobs=blobs,
            stepper=Stepper(cfg.steppers, cfg.step_threads),
            device=optim_core.pick_device(cfg.device),
            metrics=metrics,
        )
        snapshots = Snapshots(ctx)
        registry = RunRegistry(ctx, snapshots)
        metrics.watch(registry)
        with db.write("collecting unreferenced blobs") as repo:
            removed = ctx.blobs.collect(repo)
        if removed:
            log.info("removed %d unreferenced blobs", removed, extra={"event": "gc", "blobs": removed})
        app.state.settings, app.state.registry, app.state.live_answers = cfg, registry, live_answers
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
            "optim-service ready: device=%s database=%s blobs=%s live memory budget=%d bytes",
            ctx.device,
            cfg.database_url.split("@")[-1],
            type(blobs).__name__,
            registry.budget,
        )
        try:
            yield
        finally:
            await registry.drop_all()
            snapshots.close()
            ctx.close()
            db.close()

    app = FastAPI(
        title="optim-service",
        version="0.1.0",
        summary="The optimizer of a training run, hosted: every torch.optim and timm optimizer, durable and exactly resumable.",
        lifespan=lifespan,
    )

    def rejected(request: Request, status: int, error: str) -> None:
        registry: RunRegistry | None = getattr(request.app.state, "registry", None)
        if registry is not None:
            registry.ctx.metrics.rejected.labels(str(status), error).inc()

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        body = exc.body()
        rejected(request, exc.status_code, body["error"])
        note(request.scope, error=body["error"])
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(optim_core.EngineError)
    async def engine_error(request: Request, exc: optim_core.EngineError) -> JSONResponse:
        return await service_error(request, from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        rejected(request, 422, "Invalid")
        return JSONResponse({"error": "Invalid", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        rejected(request, exc.status_code, "HTTPError")
        return JSONResponse({"error": "HTTPError", "detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    for module in (health, runs, steps, schedule, checkpoints, history, metrics_route, ui):
        app.include_router(module.router)
    app.add_middleware(RequestLog)  # one log line per request (service/logs.py)

    def openapi() -> dict[str, Any]:
        """The generated document, with the run spec's models (``POST /runs`` reads its body itself: JSON or
        safetensors) and the catalogue's optimizer names."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            schema = RunCreate.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components["RunCreate"] = schema
            names = sorted(e.name for e in optim_core.list_optimizers())
            components["OptimizerSpec"]["properties"]["name"]["enum"] = names
            for form in components["RunSpecBody"]["properties"]["optimizer"]["anyOf"]:
                if form.get("type") == "string":  # the optimizer given by its name alone
                    form["enum"] = names
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
