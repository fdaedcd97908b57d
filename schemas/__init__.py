"""The API's JSON models (pydantic only)."""

from .runs import (
    AppliedStep,
    AppliedSteps,
    CheckpointCreate,
    CheckpointList,
    CheckpointPublic,
    ErrorBody,
    Fork,
    Rollback,
    RunCreate,
    RunList,
    RunPublic,
    SchedulePreview,
    SchedulePublic,
    ScheduleStep,
)
from .spec import RunSpecBody

__all__ = [
    "AppliedStep",
    "AppliedSteps",
    "CheckpointCreate",
    "CheckpointList",
    "CheckpointPublic",
    "ErrorBody",
    "Fork",
    "Rollback",
    "RunCreate",
    "RunList",
    "RunPublic",
    "RunSpecBody",
    "SchedulePreview",
    "SchedulePublic",
    "ScheduleStep",
]
