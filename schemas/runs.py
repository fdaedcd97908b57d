"""The API's JSON shapes (pydantic only). Tensors travel as safetensors, not in these models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .spec import RunSpecBody

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
    spec: RunSpecBody
    durability: Durability = Field(
        default="log",
        description="log: every step is committed before it is acknowledged. snapshot: only snapshots are "
        "written; a crash loses up to snapshot_every steps.",
    )
    snapshot_every: int | None = Field(default=None, ge=1, le=10_000_000, description="Steps between snapshots.")
    params: dict[str, Any] | None = Field(default=None, description="Initial values as nested lists (JSON bodies only).")

    def spec_dict(self) -> dict[str, Any]:
        return self.spec.to_engine()


class RunPublic(BaseModel):
    """A run as the database tells it (listing runs loads none of them)."""

    name: str
    t: int
    epoch: int
    lr: list[float | None] | None = Field(
        description="LR per group; null for a group whose optimizer has none (timm's relative-step Adafactor)."
    )
    lr_notes: list[str | None] = Field(default_factory=list, description="Why a group's lr is null.")
    durability: Durability
    snapshot_every: int
    last_snapshot_t: int | None
    last_snapshot_at: datetime | None = None
    skipped_steps: int = Field(description="Steps skipped for NaN/Inf gradients (nonfinite: skip).")
    rejected_steps: int = Field(description="Step requests refused (4xx): stale or bad gradients.")
    groups: list[dict[str, Any]] = Field(description="The optimizer's param groups: parameter names and options.")
    group_sizes: list[int] = Field(description="Elements in each group.")
    state_bytes: int = Field(description="Bytes of the state: parameters, optimizer state, averages.")
    live: bool = Field(description="Whether the run's state is in this server's memory now.")
    steps_per_s: float | None = Field(
        default=None,
        description="Steps applied per second over the last 30 s (null when the run is not in memory: it is not stepping).",
    )
    needs: list[str] = Field(
        default_factory=list,
        description="What its optimizer takes beyond one gradient per step: closure (evaluations, k), hessian "
        "(estimates beside the gradients), sparse_grad (sparse gradients only).",
    )
    spec: dict[str, Any]
    created_at: datetime | None = None
    updated_at: datetime | None = None


class RunList(BaseModel):
    runs: list[RunPublic]


class ScheduleStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: float | None = Field(default=None, description="For plateau schedulers: the epoch's metric.")


class SchedulePublic(BaseModel):
    t: int
    epoch: int
    lr: list[float | None]
    interval: str | None
    scheduler: dict[str, Any] | None = Field(description="The scheduler's state_dict (JSON-encoded).")


class SchedulePreview(BaseModel):
    interval: str | None
    start: int
    lr: list[list[float | None]] = Field(description="LR of every group, for each of the next intervals.")


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


class AppliedStep(BaseModel):
    """An applied step: who contributed its gradient, who was not waited for, when."""

    t: int = Field(description="The step's t (the run's t before it).")
    contributors: list[int] = Field(description="The ranks whose gradients made the step (0 for a one-worker run).")
    dropped: list[int] = Field(description="Sync: the ranks the step did not wait for.")
    base_t: dict[str, int] | None = Field(description="Async: the t each contributor's gradient was computed at.")
    received: dict[str, datetime] = Field(description="When each contributor's gradient arrived.")
    applied_at: datetime


class AppliedSteps(BaseModel):
    steps: list[AppliedStep]
