"""The per-step history of a run (``GET /runs/{run}/history``): downsampled series by name."""

from __future__ import annotations

from pydantic import BaseModel, Field

# a series' name: the service's own (loss, lr/<group>, grad_norm, update_norm, param_norm, step_ms, time) or a scalar
# a worker sent (Optim-Scalars)
SERIES_NAME_PATTERN = r"^[A-Za-z0-9_./\-]{1,64}$"


class Series(BaseModel):
    """One name's values over the buckets that have any, in order; a bucket holding a value that was not finite
    (NaN, Inf) answers null for min, mean and max."""

    t: list[int] = Field(description="The first step of each bucket (within the range asked for).")
    min: list[float | None]
    mean: list[float | None]
    max: list[float | None]
    count: list[int] = Field(description="Values in each bucket (steps that recorded this name).")


class History(BaseModel):
    """A run's history over steps [start, stop), in buckets of ``bucket`` steps (1: one value per step)."""

    run: str
    t: int = Field(description="The run's t now.")
    start: int
    stop: int
    bucket: int = Field(description="Steps per bucket; buckets start at multiples of it (1 when not downsampled).")
    series: dict[str, Series]
