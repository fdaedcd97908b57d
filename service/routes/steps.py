"""The step (the hot path), and what a worker reads back: parameters, averages, the whole state, its digest."""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from schemas import RunPublic

from .. import payloads
from ..bodies import binary_length, content_kind, read_body
from ..deps import RegistryDep, RunName, SettingsDep, TenantDep
from ..errors import InvalidPayload, RunNotFound
from ..logs import note
from ..payloads import SAFETENSORS, LiveTensorsResponse
from ..runs import Later, Live, history, journal, lifecycle, series, stepping, workers
from ..runs.gather import Pending
from ..runs.stepping import Clock, StepOutcome, StepRequest

router = APIRouter(tags=["steps"])
BINARY_BODY = {"content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}}


def _headers(position: dict[str, str]) -> dict[str, str]:
    """The position in headers: ``Optim-T``, ``Optim-LR``, and ``Optim-Evaluate`` for a closure step under way (the
    Hessian request of an Adahessian run is in the safetensors metadata only: it is kilobytes)."""
    headers = {"Optim-T": position["t"], "Optim-LR": position["lr"]}
    if "evaluate" in position:
        headers["Optim-Evaluate"] = position["evaluate"]
    return headers


def _step_response(outcome: StepOutcome, returns: str, live_answers: bool) -> Response:
    headers = _headers(outcome.position)
    if outcome.replayed:
        headers["Optim-Replayed"] = "true"
    if outcome.result.skipped:
        headers["Optim-Skipped"] = "true"
    if returns == "none":
        return Response(status_code=200, headers=headers)
    if returns == "json":
        params = {n: v.tolist() for n, v in outcome.params.items()}
        body = {"t": outcome.result.t, "lr": outcome.result.lrs, "replayed": outcome.replayed, "params": params}
        if "evaluate" in outcome.position:
            body["evaluate"] = int(outcome.position["evaluate"])
        return JSONResponse(body, headers=headers)
    if live_answers:  # sent from the live parameters, under the run's hold (RunRegistry.answer)
        return LiveTensorsResponse(outcome.params, outcome.position, headers)
    return Response(payloads.encode(outcome.params, outcome.position), media_type=SAFETENSORS, headers=headers)


@router.post(
    "/runs/{run}/step",
    summary="Apply the gradients computed at step t (exactly once)",
    openapi_extra={"requestBody": {"content": {**BINARY_BODY["content"], "application/json": {"schema": {"type": "object"}}}}},
    responses={200: {"content": {SAFETENSORS: {}}, "description": "The updated parameters as safetensors"}},
)
async def step(
    request: Request,
    run: RunName,
    registry: RegistryDep,
    settings: SettingsDep,
    tenant: TenantDep,
    t: Annotated[int, Query(ge=0, le=2**62, description="The step count the gradient was computed at.")],
    loss: Annotated[float | None, Query(description="The step's loss (plateau schedulers use it).")] = None,
    returns: Annotated[Literal["params", "none", "json"], Query(alias="return")] = "params",
    k: Annotated[
        int | None, Query(ge=0, le=2**31 - 1, description="Closure optimizers (torch.LBFGS): which evaluation of step t.")
    ] = None,
    rank: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Several workers: the sender's rank.")] = None,
    world_size: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Several workers: the world size the sender runs in.")
    ] = None,
    scalars: Annotated[
        str | None,
        Header(
            alias="Optim-Scalars",
            description='The step\'s scalars for its history: a JSON object of at most 32 names to finite numbers, {"acc": 0.9}',
        ),
    ] = None,
) -> Response:
    clock = Clock()
    sent_scalars = series.parse_scalars(scalars)  # a bad header is a 422 before anything is read
    hasher = payloads.Hasher()  # the gradient's digest, computed while it arrives
    # a run that logs its steps writes a large body to its log as it arrives (the step takes it, or it is dropped)
    size = binary_length(request)
    inflow = None
    if size is not None and size <= settings.max_body_bytes:
        inflow = journal.stream(registry.ctx, registry.live(tenant, run), size)
    try:
        body = await read_body(request, settings.max_body_bytes, hasher, inflow.stream.feed if inflow else None)
    except BaseException:
        if inflow is not None:
            inflow.release()
        raise
    if inflow is not None:
        inflow.stream.close()
    clock.lap("receive")
    step_request = StepRequest(
        t=t,
        payload=body,
        content_type=content_kind(request),
        loss=loss,
        digest=hasher.hexdigest(),
        k=k,
        rank=rank,
        world_size=world_size,
        scalars=sent_scalars,
        log=inflow,
    )
    live_answers: bool = request.app.state.live_answers

    def work(live: Live) -> Response | Later:
        clock.lap("wait")  # for the run's lock (another request on the run) and a worker thread
        outcome = stepping.step(registry.ctx, registry.snapshots, live, step_request, clock)
        if isinstance(outcome, Pending):  # a sync step of several workers: answered once it is applied
            return Later(lambda: _gathered(outcome))
        response = _step_response(outcome, returns, live_answers)
        clock.lap("encode")
        response.headers["Server-Timing"] = clock.header()
        answered(applied=not outcome.replayed, t=outcome.result.t)
        return response

    def answered(*, applied: bool, t: int) -> None:
        """The step in /metrics and in its request's log line."""
        registry.ctx.metrics.step_answered(clock.laps, tenant=tenant, run=run, body_bytes=len(body), applied=applied)
        note(request.scope, t=t, applied=applied, phases={k: round(v, 2) for k, v in clock.laps.items()})

    async def _gathered(pending: Pending) -> Response:
        async def apply_later(t: int) -> None:
            await registry.call(tenant, run, lambda live: workers.apply_if_ready(registry.ctx, live, t), write=True)

        answer = await workers.wait(pending, apply_later)
        clock.lap("gather")  # waiting for the other ranks
        headers = {**_headers(answer.position), "Server-Timing": clock.header()}
        answered(applied=True, t=answer.result.t)
        if returns == "none":
            return Response(status_code=200, headers=headers)
        return Response(answer.body, media_type=SAFETENSORS, headers=headers)

    async def snapshot() -> None:
        """A due snapshot's capture, once the answer of the step that made it due is sent (``Snapshots.start``)."""
        live = registry.live(tenant, run)
        if live is not None and registry.snapshots.due(live):
            await registry.call(tenant, run, registry.snapshots.start)

    return registry.answer(tenant, run, work, write=True, after=snapshot, finally_=inflow.release if inflow else None)


@router.get(
    "/runs/{run}/params",
    summary="The current parameters (safetensors; t, lr and what the next step needs in the metadata)",
    responses={200: {"content": {SAFETENSORS: {}}}},
)
async def get_params(run: RunName, registry: RegistryDep, tenant: TenantDep) -> Response:
    def work(live: Live) -> Response:
        position = stepping.position(live)  # a closure step under way: the parameters its next evaluation is at
        return Response(payloads.encode(live.state.params(), position), media_type=SAFETENSORS, headers=_headers(position))

    # a copy, sent after the hold is released: a slow reader of the parameters must not hold up the run's steps
    return await registry.call(tenant, run, work)


@router.get(
    "/runs/{run}/averages/{kind}", summary="The EMA or SWA weights (safetensors)", responses={200: {"content": {SAFETENSORS: {}}}}
)
async def get_average(run: RunName, kind: Literal["ema", "swa"], registry: RegistryDep, tenant: TenantDep) -> Response:
    def work(live: Live) -> Response:
        tensors = live.state.averages(kind)
        if tensors is None:
            raise RunNotFound(f"this run keeps no {kind} average (set it in the spec)")
        meta = {"t": str(live.state.t)}
        return Response(payloads.encode(tensors, meta), media_type=SAFETENSORS, headers=meta)

    return await registry.call(tenant, run, work)


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


@router.get(
    "/runs/{run}/state",
    summary="The current state as a .pt for plain torch/timm (as a checkpoint export)",
    responses={200: {"content": {SAFETENSORS: {}}}},
)
async def get_state(run: RunName, registry: RegistryDep, tenant: TenantDep) -> Response:
    data = await registry.call(tenant, run, lambda live: torch_bytes(live.state.export()))
    return Response(data, media_type=SAFETENSORS)


@router.put(
    "/runs/{run}/state",
    response_model=RunPublic,
    openapi_extra={"requestBody": BINARY_BODY},
    summary="Load a torch-format state (.pt: optimizer, and optionally model, lr_scheduler, ema, swa, step)",
)
async def put_state(request: Request, run: RunName, registry: RegistryDep, settings: SettingsDep, tenant: TenantDep) -> RunPublic:
    body = await read_body(request, settings.max_body_bytes)

    def work(live: Live) -> Live:
        return history.load_state(registry.ctx, registry.snapshots, live, load_torch(body))

    await registry.call(tenant, run, work, write=True)
    return await lifecycle.describe(registry, tenant, run)


@router.get("/runs/{run}/digest", summary="A hash of the run's whole state (parameters, optimizer, schedule, averages)")
async def get_digest(run: RunName, registry: RegistryDep, tenant: TenantDep) -> dict[str, Any]:
    return await registry.call(tenant, run, lambda live: {"t": live.state.t, "digest": live.state.digest()})
