"""The API's JSON shapes (pydantic only). Tensors travel as safetensors, not in these models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
Durability = Literal["log", "snapshot"]


class RunCreate(BaseModel):
    """A run: its name, its engine spec (see optim_core.RunSpec) and its durability policy.

    With ``Content-Type: application/json`` the initial parameters come as ``params`` (nested lists,
    for small demos); with ``application/octet-stream`` the body is a safetensors file of the initial
    parameters whose ``__metadata__["run"]`` holds this object as JSON.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=RUN_NAME_PATTERN, description="Letters, digits, '_.-'; at most 128 characters.")
    spec: dict[str, Any] = Field(description="params (manifest), optimizer, param_groups, scheduler, ema, swa, nonfinite, seed")
    durability: Durability = Field(
        default="log",
        description="log: every step is committed before it is acknowledged. snapshot: only snapshots are "
        "written; a crash loses up to snapshot_every steps.",
    )
    snapshot_every: int | None = Field(default=None, ge=1, le=10_000_000, description="Steps between snapshots.")
    params: dict[str, Any] | None = Field(default=None, description="Initial values as nested lists (JSON bodies only).")


class RunPublic(BaseModel):
    name: str
    t: int
    epoch: int
    lr: list[float]
    durability: Durability
    snapshot_every: int
    last_snapshot_t: int | None
    skipped_steps: int
    groups: list[dict[str, Any]] = Field(description="The optimizer's param groups: parameter names and options.")
    spec: dict[str, Any]
    created_at: datetime | None = None


class RunList(BaseModel):
    runs: list[RunPublic]


class ScheduleStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: float | None = Field(default=None, description="For plateau schedulers: the epoch's metric.")


class SchedulePublic(BaseModel):
    t: int
    epoch: int
    lr: list[float]
    interval: str | None
    scheduler: dict[str, Any] | None = Field(description="The scheduler's state_dict (JSON-encoded).")


class SchedulePreview(BaseModel):
    interval: str | None
    start: int
    lr: list[list[float]] = Field(description="LR of every group, for each of the next intervals.")


class CheckpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=RUN_NAME_PATTERN)


class CheckpointPublic(BaseModel):
    name: str
    t: int
    epoch: int
    size: int
    digest: str
    created_at: datetime | None = None


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointPublic]


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(pattern=RUN_NAME_PATTERN)


class Fork(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(pattern=RUN_NAME_PATTERN)
    name: str = Field(pattern=RUN_NAME_PATTERN, description="The new run's name.")
    durability: Durability | None = None
    snapshot_every: int | None = Field(default=None, ge=1, le=10_000_000)


class ErrorBody(BaseModel):
    error: str
    detail: str
    current_t: int | None = None
