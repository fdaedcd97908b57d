"""Runs: create (idempotent by name), list, describe, delete."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from optim_core import RunSpec
from schemas import AppliedSteps, RunCreate, RunList, RunPublic

from .. import payloads
from ..bodies import content_kind, read_body
from ..deps import RegistryDep, RunName, SettingsDep, TenantDep
from ..errors import Invalid, InvalidPayload
from ..payloads import SAFETENSORS
from ..runs import lifecycle

router = APIRouter(tags=["runs"])
CREATE_BODY = {
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/RunCreate"}},
        SAFETENSORS: {"schema": {"type": "string", "format": "binary"}},
    }
}


def pydantic_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


async def _create_body(request: Request, limit: int) -> tuple[RunCreate, lifecycle.ParamsReader]:
    """The run to create, and how to read its initial parameters (in the thread that builds it)."""
    body = await read_body(request, limit)
    try:
        if content_kind(request) == "json":
            create = RunCreate.model_validate_json(bytes(body))  # a JSON body is read as bytes: no copy

            def from_json(spec: RunSpec) -> dict[str, torch.Tensor]:
                like = {p.name: torch.empty(0, dtype=p.torch_dtype) for p in spec.params}
                return payloads.from_json_lists(create.params or {}, like, "params")

            return create, from_json
        _, metadata = payloads.decode(body)
        if "run" not in metadata:
            raise InvalidPayload('a safetensors body for POST /runs needs __metadata__["run"]: the RunCreate JSON')
        return RunCreate.model_validate_json(metadata["run"]), lambda spec: payloads.decode(body)[0]
    except ValidationError as exc:
        raise Invalid(f"invalid run: {pydantic_message(exc)}") from None


@router.post(
    "/runs",
    status_code=201,
    response_model=RunPublic,
    summary="Create a run (or answer the existing one with the same spec)",
    openapi_extra={"requestBody": CREATE_BODY},
)
async def create_run(request: Request, registry: RegistryDep, settings: SettingsDep, tenant: TenantDep) -> JSONResponse:
    create, params = await _create_body(request, settings.max_body_bytes)
    public, created = await lifecycle.create(registry, tenant, create, params)
    return JSONResponse(public.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/runs", response_model=RunList, summary="The tenant's runs (from the database: none is loaded)")
async def list_runs(registry: RegistryDep, tenant: TenantDep) -> RunList:
    return RunList(runs=await lifecycle.list_runs(registry, tenant))


@router.get("/runs/{run}", response_model=RunPublic, summary="One run: t, epoch, LRs, last snapshot, durability")
async def get_run(run: RunName, registry: RegistryDep, tenant: TenantDep) -> RunPublic:
    return await lifecycle.describe(registry, tenant, run)


@router.get("/runs/{run}/steps", response_model=AppliedSteps, summary="The applied steps: contributors, dropped ranks, times")
async def applied_steps(
    run: RunName,
    registry: RegistryDep,
    tenant: TenantDep,
    start: Annotated[int, Query(ge=0, le=2**62)] = 0,
    stop: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> AppliedSteps:
    return await lifecycle.applied_steps(registry, tenant, run, start=start, stop=stop, limit=limit)


@router.delete("/runs/{run}", status_code=204, summary="Delete a run, its log, snapshots and checkpoints")
async def delete_run(run: RunName, registry: RegistryDep, tenant: TenantDep) -> Response:
    await lifecycle.delete(registry, tenant, run)
    return Response(status_code=204)
