"""The engine's errors: plain ``ValueError``/``KeyError`` subclasses that the service maps to HTTP.

Every message names the bad value, so a client can fix its request without reading server logs.
"""

from __future__ import annotations


class EngineError(ValueError):
    """Base class of everything the engine rejects."""


class SpecError(EngineError):
    """The run spec is invalid: unknown name, bad hyper-parameter, unsafe expression..."""


class UnknownName(SpecError, KeyError):
    """An optimizer or scheduler name that is not in the catalogue."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Unavailable(SpecError):
    """A catalogue entry that exists but cannot run here (missing package, CUDA, protocol)."""


class GradientError(EngineError):
    """A gradient payload that does not fit the run: names, shapes, dtypes, values."""


class NonFiniteGradient(GradientError):
    """A gradient with NaN or Inf values under the ``nonfinite: "error"`` policy."""


class StepMismatch(EngineError):
    """``apply`` was called for another step than the current one."""

    def __init__(self, message: str, *, current_t: int) -> None:
        super().__init__(message)
        self.current_t = current_t


class ProtocolRequired(EngineError):
    """A step sent the way an optimizer cannot take it: LBFGS steps by closure evaluations
    (``optim_core.closure``), Adahessian needs Hessian estimates beside the gradients (``optim_core.hessian``)."""


class StepInProgress(EngineError):
    """A closure step is under way: the state cannot be stepped otherwise, snapshotted or digested until it ends."""


class EvaluationMismatch(EngineError):
    """A closure evaluation other than the one the step waits for (``expected_k``; None once the step has ended)."""

    def __init__(self, message: str, *, t: int, expected_k: int | None) -> None:
        super().__init__(message)
        self.t = t
        self.expected_k = expected_k


class SnapshotError(EngineError):
    """A snapshot that cannot be loaded into this process (corrupt, other torch, other device)."""


class StepFailed(RuntimeError):
    """The optimizer raised in the middle of a step: the in-memory state is no longer trustworthy."""
