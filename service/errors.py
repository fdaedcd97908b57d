"""One error family: every error the service answers is a ``ServiceError`` with its HTTP status,
rendered by one handler as ``{"error": <class name>, "detail": <message>, ...}``."""

from __future__ import annotations

from typing import Any

import optim_core


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str, *, status_code: int | None = None, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}
        self.extra = extra

    @property
    def name(self) -> str:
        return type(self).__name__

    def body(self) -> dict[str, Any]:
        return {"error": self.name, "detail": self.message, **self.extra}


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InvalidPayload(BadRequest):
    """A body that cannot be read: truncated or garbage safetensors, malformed JSON."""


class RunNotFound(ServiceError):
    status_code = 404


class CheckpointNotFound(ServiceError):
    status_code = 404


class RunConflict(ServiceError):
    """The name is taken by a run with another spec."""

    status_code = 409


class CheckpointConflict(ServiceError):
    status_code = 409


class StepConflict(ServiceError):
    """A step for another ``t`` than the run's, or a different gradient for an applied step."""

    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class Invalid(ServiceError):
    """A well-formed request whose content is wrong (spec, gradient names/shapes, values)."""

    status_code = 422


class NotAcceptable(ServiceError):
    status_code = 406


class StorageUnavailable(ServiceError):
    """The database or the blob store failed; nothing was acknowledged. Retry."""

    status_code = 503

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, headers={"Retry-After": "1"}, **extra)


class WaitingForWorkers(ServiceError):
    """A sync step still waits for ranks; the same gradient sent again joins it (exactly once). Retry."""

    status_code = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RecoveryFailed(ServiceError):
    """A run's stored state does not reproduce its logged history: never resumed silently."""

    status_code = 500


def from_engine(exc: optim_core.EngineError) -> ServiceError:
    """Map the engine's plain errors to HTTP at the boundary."""
    if isinstance(exc, optim_core.StepMismatch):
        return StepConflict(str(exc), current_t=exc.current_t)
    if isinstance(exc, optim_core.EvaluationMismatch):
        return StepConflict(str(exc), current_t=exc.t, expected_k=exc.expected_k, reason="evaluation")
    if isinstance(exc, optim_core.StepInProgress):
        return StepConflict(str(exc), reason="step_in_progress")
    return Invalid(str(exc))
