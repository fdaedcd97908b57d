"""The API's JSON models (pydantic only)."""

from .history import SERIES_NAME_PATTERN, History, Series
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
    "SERIES_NAME_PATTERN",
    "AppliedStep",
    "AppliedSteps",
    "CheckpointCreate",
    "CheckpointList",
    "CheckpointPublic",
    "ErrorBody",
    "Fork",
    "History",
    "Rollback",
    "RunCreate",
    "RunList",
    "RunPublic",
    "RunSpecBody",
    "SchedulePreview",
    "SchedulePublic",
    "ScheduleStep",
    "Series",
]
