"""optim_core: the engine of optim-service (torch, timm and safetensors only)."""

from .catalogue import OptimizerEntry, get_optimizer, list_optimizers
from .devices import pick_device
from .errors import (
    EngineError,
    GradientError,
    NonFiniteGradient,
    SnapshotError,
    SpecError,
    StepFailed,
    StepMismatch,
    Unavailable,
    UnknownName,
)
from .run_state import RunState, StepResult
from .schedulers import ExpressionError, MetricRequired, SafeExpression, describe_schedulers
from .spec import RunSpec

__all__ = [
    "EngineError",
    "ExpressionError",
    "GradientError",
    "MetricRequired",
    "NonFiniteGradient",
    "OptimizerEntry",
    "RunSpec",
    "RunState",
    "SafeExpression",
    "SnapshotError",
    "SpecError",
    "StepFailed",
    "StepMismatch",
    "StepResult",
    "Unavailable",
    "UnknownName",
    "describe_schedulers",
    "get_optimizer",
    "list_optimizers",
    "pick_device",
]
