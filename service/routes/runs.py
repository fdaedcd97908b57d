"""Runs, the step, parameters, averages and the schedule."""

from __future__ import annotations

import io
import json
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

import optim_core
from optim_format import tree
from schemas import RunCreate, RunList, RunPublic, SchedulePreview, SchedulePublic, ScheduleStep

from .. import payloads
from ..deps import ManagerDep, RunName, SentUnderLock, SettingsDep, TenantDep, content_kind, on_run, read_body
from ..errors import Invalid, InvalidPayload, RunNotFound
from ..payloads import SAFETENSORS, LiveTensorsResponse
from ..runtime import Clock, Live, RunManager, StepOutcome

router = APIRouter(tags=["runs"])
BINARY_BODY = {"content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}}


def run_public(live: Live) -> RunPublic:
    state = live.state
    return RunPublic(
        name=live.name,
        t=state.t,
        epoch=state.epoch,
        lr=state.lrs,
        durability=live.durability,  # type: ignore[arg-type]
        snapshot_every=live.snapshot_every,
        last_snapshot_t=live.last_snapshot_t,
        skipped_steps=state.skipped_steps,
        groups=state.groups(),
        spec=state.spec.to_dict(),
        created_at=live.created_at,
    )


def tensors_response(tensors: dict[str, Any] | None, what: str, headers: dict[str, str] | None = None) -> Response:
    if tensors is None:
        raise RunNotFound(f"this run keeps no {what} average (set it in the spec)")
    return Response(payloads.encode(tensors, headers), media_type=SAFETENSORS, headers=headers)


async def _create_body(request: Request, limit: int) -> tuple[RunCreate, dict[str, Any] | None, bytes | memoryview | None]:
    body = await read_body(request, limit)
    try:
        if content_kind(request) == "json":
            create = RunCreate.model_validate_json(bytes(body))  # a JSON body is read as bytes: no copy
            return create, create.params, None
        _, metadata = payloads.decode(body)
        if "run" not in metadata:
            raise InvalidPayload('a safetensors body for POST /runs needs __metadata__["run"]: the RunCreate JSON')
        return RunCreate.model_validate_json(metadata["run"]), None, body
    except ValidationError as exc:
        raise Invalid(f"invalid run: {_pydantic_message(exc)}") from None


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch(data: bytes | memoryview) -> Any:
    """A client's .pt: weights_only, so nothing in it is unpickled as code."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise InvalidPayload(f"the body is not a torch.save file readable with weights_only=True: {exc}") from None


def _pydantic_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


@router.post(
    "/runs",
    status_code=201,
    response_model=RunPublic,
    summary="Create a run (or answer the existing one with the same spec)",
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": RunCreate.model_json_schema()}, **BINARY_BODY["content"]}}
    },
)
async def create_run(request: Request, manager: ManagerDep, settings: SettingsDep, tenant: TenantDep) -> JSONResponse:
    create, json_params, binary = await _create_body(request, settings.max_body_bytes)

    def work() -> tuple[Live, bool]:
        if binary is not None:
            params, _ = payloads.decode(binary)
        else:
            spec = optim_core.RunSpec.from_dict(create.spec)  # engine errors become 422 in the handler
            like = {p.name: torch.empty(0, dtype=p.torch_dtype) for p in spec.params}
            params = payloads.from_json_lists(json_params or {}, like, "params")
        return manager.create(tenant, create, params)

    async with request.app.state.locks(tenant, create.name):
        live, created = await run_in_threadpool(work)
    return JSONResponse(run_public(live).model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/runs", response_model=RunList, summary="The tenant's runs")
async def list_runs(request: Request, manager: ManagerDep, tenant: TenantDep) -> RunList:
    rows = await run_in_threadpool(manager.list_runs, tenant)
    runs = []
    for row in rows:
        runs.append(await on_run(request, tenant, row.name, run_public))
    return RunList(runs=runs)


@router.get("/runs/{run}", response_model=RunPublic, summary="One run: t, epoch, LRs, last snapshot, durability")
async def get_run(request: Request, run: RunName, tenant: TenantDep) -> RunPublic:
    return await on_run(request, tenant, run, run_public)


@router.delete("/runs/{run}", status_code=204, summary="Delete a run, its log, snapshots and checkpoints")
async def delete_run(request: Request, run: RunName, manager: ManagerDep, tenant: TenantDep) -> Response:
    async with request.app.state.locks(tenant, run):
        await run_in_threadpool(manager.delete, tenant, run)
    return Response(status_code=204)


def _step_headers(outcome: StepOutcome) -> dict[str, str]:
    headers = {"Optim-T": str(outcome.result.t), "Optim-LR": json.dumps(outcome.result.lrs)}
    if outcome.replayed:
        headers["Optim-Replayed"] = "true"
    if outcome.result.skipped:
        headers["Optim-Skipped"] = "true"
    return headers


@router.post(
    "/runs/{run}/step",
    summary="Apply the gradients computed at step t (exactly once)",
    openapi_extra={"requestBody": {"content": {**BINARY_BODY["content"], "application/json": {"schema": {"type": "object"}}}}},
    responses={200: {"content": {SAFETENSORS: {}}, "description": "The updated parameters as safetensors"}},
)
async def step(
    request: Request,
    run: RunName,
    settings: SettingsDep,
    tenant: TenantDep,
    t: Annotated[int, Query(ge=0, le=2**62, description="The step count the gradient was computed at.")],
    loss: Annotated[float | None, Query(description="The step's loss (plateau schedulers use it).")] = None,
    returns: Annotated[Literal["params", "none", "json"], Query(alias="return")] = "params",
) -> Response:
    clock = Clock()
    hasher = payloads.Hasher()  # the gradient's digest, computed while it arrives
    body = await read_body(request, settings.max_body_bytes, hasher)
    clock.lap("receive")
    manager: RunManager = request.app.state.manager

    # the answer is built and sent under the run's lock: it is sent from the live parameters, which the next step changes
    def work(live: Live) -> Response:
        clock.lap("wait")  # for the run's lock (another request on the run) and a worker thread
        outcome = manager.step(
            live, t=t, payload=body, digest=hasher.hexdigest(), content_type=content_kind(request), loss=loss, clock=clock
        )
        headers = _step_headers(outcome)
        if returns == "none":
            response = Response(status_code=200, headers=headers)
        elif returns == "json":
            params = {n: v.tolist() for n, v in outcome.params.items()}
            response = JSONResponse(
                {"t": outcome.result.t, "lr": outcome.result.lrs, "replayed": outcome.replayed, "params": params}, headers=headers
            )
        else:
            response = LiveTensorsResponse(outcome.params, _params_meta(headers), headers)
        clock.lap("encode")
        response.headers["Server-Timing"] = clock.header()
        return response

    async def snapshot() -> None:
        """A due snapshot's capture, once the answer of the step that made it due is sent (``RunManager.maybe_snapshot``)."""
        if manager.snapshot_due(tenant, run):
            async with request.app.state.locks(tenant, run):
                await run_in_threadpool(manager.maybe_snapshot, tenant, run)

    return SentUnderLock(request, tenant, run, work, after=snapshot)


def _params_meta(headers: dict[str, str]) -> dict[str, str]:
    """The answer's ``t`` and ``lr``, in its safetensors metadata as in its headers."""
    return {"t": headers["Optim-T"], "lr": headers["Optim-LR"]}


@router.get(
    "/runs/{run}/params",
    summary="The current parameters (safetensors, t and lr in the metadata)",
    responses={200: {"content": {SAFETENSORS: {}}}},
)
async def get_params(request: Request, run: RunName, tenant: TenantDep) -> Response:
    def work(live: Live) -> Response:
        headers = {"Optim-T": str(live.state.t), "Optim-LR": json.dumps(live.state.lrs)}
        return Response(payloads.encode(live.state.params(), _params_meta(headers)), media_type=SAFETENSORS, headers=headers)

    # a copy, sent after the lock is released: a slow reader of the parameters must not hold up the run's steps
    return await on_run(request, tenant, run, work)


@router.get(
    "/runs/{run}/state",
    summary="The current state as a .pt for plain torch/timm (as a checkpoint export)",
    responses={200: {"content": {SAFETENSORS: {}}}},
)
async def get_state(request: Request, run: RunName, tenant: TenantDep) -> Response:
    data = await on_run(request, tenant, run, lambda live: torch_bytes(live.state.export()))
    return Response(data, media_type=SAFETENSORS)


@router.put(
    "/runs/{run}/state",
    response_model=RunPublic,
    openapi_extra={"requestBody": BINARY_BODY},
    summary="Load a torch-format state (.pt: optimizer, and optionally model, lr_scheduler, ema, swa, step)",
)
async def put_state(request: Request, run: RunName, settings: SettingsDep, tenant: TenantDep) -> RunPublic:
    body = await read_body(request, settings.max_body_bytes)
    manager: RunManager = request.app.state.manager

    def work(live: Live) -> RunPublic:
        return run_public(manager.load_state(live, load_torch(body)))

    return await on_run(request, tenant, run, work)


@router.get("/runs/{run}/digest", summary="A hash of the run's whole state (parameters, optimizer, schedule, averages)")
async def get_digest(request: Request, run: RunName, tenant: TenantDep) -> dict[str, Any]:
    return await on_run(request, tenant, run, lambda live: {"t": live.state.t, "digest": live.state.digest()})


@router.get(
    "/runs/{run}/averages/{kind}", summary="The EMA or SWA weights (safetensors)", responses={200: {"content": {SAFETENSORS: {}}}}
)
async def get_average(request: Request, run: RunName, kind: Literal["ema", "swa"], tenant: TenantDep) -> Response:
    def work(live: Live) -> Response:
        meta = {"t": str(live.state.t)}
        return tensors_response(live.state.averages(kind), kind, meta)

    return await on_run(request, tenant, run, work)


def _schedule(live: Live) -> SchedulePublic:
    state = live.state
    tensors: dict[str, Any] = {}
    sched = tree.encode_tree(state.schedule.state_dict(), "", tensors) if state.schedule else None
    return SchedulePublic(
        t=state.t, epoch=state.epoch, lr=state.lrs, interval=state.schedule.interval if state.schedule else None, scheduler=sched
    )


@router.get("/runs/{run}/schedule", response_model=SchedulePublic, summary="Position, LR per group, scheduler state")
async def get_schedule(request: Request, run: RunName, tenant: TenantDep) -> SchedulePublic:
    return await on_run(request, tenant, run, _schedule)


@router.get("/runs/{run}/schedule/preview", response_model=SchedulePreview, summary="The LR curve ahead, computed on a copy")
async def preview(
    request: Request, run: RunName, tenant: TenantDep, steps: Annotated[int, Query(ge=1, le=100_000)] = 100
) -> SchedulePreview:
    def work(live: Live) -> SchedulePreview:
        state = live.state
        interval = state.schedule.interval if state.schedule else None
        return SchedulePreview(
            interval=interval, start=state.epoch if interval == "epoch" else state.t, lr=state.preview_lrs(steps)
        )

    return await on_run(request, tenant, run, work)


@router.post("/runs/{run}/schedule/step", response_model=SchedulePublic, summary="An epoch step, with an optional metric")
async def schedule_step(request: Request, run: RunName, tenant: TenantDep, body: ScheduleStep | None = None) -> SchedulePublic:
    manager: RunManager = request.app.state.manager

    def work(live: Live) -> SchedulePublic:
        manager.step_epoch(live, metric=body.metric if body else None)
        return _schedule(live)

    return await on_run(request, tenant, run, work)
