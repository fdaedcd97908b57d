"""optim_core: the engine of optim-service (torch, timm and safetensors only)."""

from .catalogue import OptimizerEntry, get_optimizer, list_optimizers
from .devices import pick_device
from .errors import (
    EngineError,
    EvaluationMismatch,
    GradientError,
    NonFiniteGradient,
    ProtocolRequired,
    SnapshotError,
    SpecError,
    StepFailed,
    StepInProgress,
    StepMismatch,
    Unavailable,
    UnknownName,
)
from .run_state import RunState, StepResult
from .schedulers import ExpressionError, MetricRequired, SafeExpression, describe_schedulers
from .spec import RunSpec

__all__ = [
    "EngineError",
    "EvaluationMismatch",
    "ExpressionError",
    "GradientError",
    "MetricRequired",
    "NonFiniteGradient",
    "OptimizerEntry",
    "ProtocolRequired",
    "RunSpec",
    "RunState",
    "SafeExpression",
    "SnapshotError",
    "SpecError",
    "StepFailed",
    "StepInProgress",
    "StepMismatch",
    "StepResult",
    "Unavailable",
    "UnknownName",
    "describe_schedulers",
    "get_optimizer",
    "list_optimizers",
    "pick_device",
]
