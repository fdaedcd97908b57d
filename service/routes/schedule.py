"""The LR schedule: where it stands, the curve ahead, epoch steps."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from optim_format import tree
from schemas import SchedulePreview, SchedulePublic, ScheduleStep

from ..deps import RegistryDep, RunName, TenantDep
from ..runs import Live, stepping

router = APIRouter(tags=["schedule"])


def _schedule(live: Live) -> SchedulePublic:
    state = live.state
    tensors: dict[str, Any] = {}
    sched = tree.encode_tree(state.schedule.state_dict(), "", tensors) if state.schedule else None
    return SchedulePublic(
        t=state.t, epoch=state.epoch, lr=state.lrs, interval=state.schedule.interval if state.schedule else None, scheduler=sched
    )


@router.get("/runs/{run}/schedule", response_model=SchedulePublic, summary="Position, LR per group, scheduler state")
async def get_schedule(run: RunName, registry: RegistryDep, tenant: TenantDep) -> SchedulePublic:
    return await registry.call(tenant, run, _schedule)


@router.get("/runs/{run}/schedule/preview", response_model=SchedulePreview, summary="The LR curve ahead, computed on a copy")
async def preview(
    run: RunName, registry: RegistryDep, tenant: TenantDep, steps: Annotated[int, Query(ge=1, le=100_000)] = 100
) -> SchedulePreview:
    def work(live: Live) -> SchedulePreview:
        state = live.state
        interval = state.schedule.interval if state.schedule else None
        return SchedulePreview(
            interval=interval, start=state.epoch if interval == "epoch" else state.t, lr=state.preview_lrs(steps)
        )

    return await registry.call(tenant, run, work)


@router.post("/runs/{run}/schedule/step", response_model=SchedulePublic, summary="An epoch step, with an optional metric")
async def schedule_step(
    run: RunName, registry: RegistryDep, tenant: TenantDep, body: ScheduleStep | None = None
) -> SchedulePublic:
    def work(live: Live) -> SchedulePublic:
        stepping.step_epoch(registry.ctx, live, metric=body.metric if body else None)
        return _schedule(live)

    return await registry.call(tenant, run, work, write=True)
