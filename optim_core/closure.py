"""Closure optimizers (torch's ``LBFGS``) through a protocol: one step driven by closure evaluations that
arrive one at a time.

``LBFGS.step(closure)`` evaluates the closure several times (up to ``max_eval``), each time at parameters
its line search chose; an evaluation needs the model and the data, which are on the worker. So torch's own
step runs here in a thread of its own, whose closure hands out the parameters and blocks until the worker's
loss and gradients at them come back (each in a request of its own)::

    step = state.begin_closure_step(t)        # step.pending: Evaluate(t, k=0, params)
    step.provide(0, loss, grads)              # -> Evaluate(t, 1, params), ... or Done(result, loss, evaluations)

- Exactly once per ``(t, k)``: ``provide`` takes the evaluation the step waits for and no other
  (``EvaluationMismatch``, which says which one it waits for; nothing changes).
- Bad input (names, shapes, dtypes, a non-finite loss or gradient) is refused before torch sees it; the
  step still waits for the same ``k``.
- Replay: the step is a function of the state before it and of its evaluations in order. Logging each
  accepted evaluation ``(t, k, loss, gradient payload)`` and feeding them again (``replay``) into the state
  recovered from the snapshot before ``t`` gives the same bits; stopped after ``k`` of them, the step
  waits for evaluation ``k`` again, at the same parameters.
- While a step is under way the state is neither stepped otherwise nor snapshotted nor digested
  (``StepInProgress``): the service snapshots between steps only.
- ``abandon()`` ends the thread; the state is then unusable (``StepFailed``) and is to be reloaded from
  durable state. A step dropped unfinished is abandoned when it is garbage-collected.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import sparse
from .errors import (
    EvaluationMismatch,
    GradientError,
    NonFiniteGradient,
    ProtocolRequired,
    StepFailed,
    StepMismatch,
)
from .inputs import nonfinite
from .results import StepResult
from .spec import is_finite_number

if TYPE_CHECKING:
    from .run_state import RunState

_ABANDON = object()


class _Abandoned(BaseException):
    """Raised through torch's step by the closure of an abandoned step (a BaseException: no ``except Exception``
    on the way may swallow it)."""


@dataclass(frozen=True)
class Evaluate:
    """Evaluate the loss and gradients at ``params`` and ``provide`` them as evaluation ``k`` of step ``t``."""

    t: int
    k: int
    params: dict[str, torch.Tensor]  # the run's live parameters: read them before the next provide


@dataclass(frozen=True)
class Done:
    """Step ``t`` is over: ``result`` (``t + 1``, the LRs after the scheduler), the loss torch's step returned
    (evaluation 0's) and how many evaluations it took."""

    result: StepResult
    loss: float
    evaluations: int


def _drive(state: RunState, t: int, inbox: queue.SimpleQueue[Any], outbox: queue.SimpleQueue[Any]) -> None:
    """The step's thread: torch's ``step(closure)``, each evaluation a message out and one in."""
    params = state._params
    k = 0

    def closure() -> torch.Tensor:
        nonlocal k
        outbox.put(("evaluate", k))
        item = inbox.get()
        if item is _ABANDON:
            raise _Abandoned
        loss, grads = item
        for name, p in params.items():
            p.grad = grads.get(name)
        k += 1
        # torch reads the loss with float(): a float64 scalar gives back exactly the worker's float(loss)
        return torch.tensor(loss, dtype=torch.float64)

    message: tuple[str, Any]
    try:
        try:
            # typeshed says a closure returns a float; LBFGS float()s what it returns: a user's returns a tensor
            returned = state.optimizer.step(closure)  # type: ignore[arg-type]
        finally:
            for p in params.values():
                p.grad = None
    except _Abandoned:
        # here too (not only in abandon()): a step that was garbage-collected unfinished ends this way
        state._broken = f"closure step t={t} was abandoned after {k} evaluation(s)"
        state._busy = None
        message = ("abandoned", k)
    except BaseException as exc:
        message = ("failed", exc)
    else:
        message = ("done", (float(returned), k))
    outbox.put(message)


class ClosureStep:
    """One step ``t`` of a closure optimizer: ``begin``, then ``provide`` each evaluation ``pending`` asks for."""

    def __init__(self, state: RunState, t: int, steps_schedule: bool) -> None:
        self._state = state
        self.t = t
        self._steps_schedule = steps_schedule
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: Evaluate | Done | None = None
        self._ended: str | None = None  # why no evaluation is awaited any more
        state._busy = f"closure step t={t}"
        self._thread = threading.Thread(
            target=_drive, args=(state, t, self._inbox, self._outbox), name=f"closure-step-t{t}", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._inbox.put, _ABANDON)
        self._answer(self._outbox.get())

    @classmethod
    def begin(cls, state: RunState, t: int) -> ClosureStep:
        """Start step ``t`` (the run's current step): ``pending`` is then evaluation 0, at the current parameters."""
        state._check_usable()
        if "closure" not in state.entry.needs:
            raise ProtocolRequired(f"{state.entry.name!r} steps by one gradient per step: use apply(gradients, t)")
        if isinstance(t, bool) or not isinstance(t, int) or t != state.t:
            raise StepMismatch(f"closure step for t={t!r}, the run is at t={state.t}", current_t=state.t)
        return cls(state, t, state._schedule_steps_now(epoch=False))

    @property
    def pending(self) -> Evaluate | Done:
        """What the step waits for (``Evaluate``), or how it ended (``Done``): the answer to the last request."""
        if self._pending is None:
            raise StepFailed(f"closure step t={self.t} has {self._ended}")
        return self._pending

    @property
    def waiting_for(self) -> int | None:
        """The evaluation the step waits for; None once it has ended."""
        return self._pending.k if isinstance(self._pending, Evaluate) else None

    def provide(self, k: int, loss: float, grads: Mapping[str, torch.Tensor], *, donate: bool = False) -> Evaluate | Done:
        """Evaluation ``k``: the loss and gradients at the parameters ``pending`` gave. A missing name means no
        gradient (``p.grad is None``; LBFGS reads zeros). Returns the next ``pending``."""
        state, pending = self._state, self._pending
        if not isinstance(pending, Evaluate):
            ended = "ended" if isinstance(pending, Done) else str(self._ended)
            raise EvaluationMismatch(
                f"closure step t={self.t} has {ended}: no evaluation is awaited (got evaluation k={k!r})",
                t=self.t,
                expected_k=None,
            )
        if isinstance(k, bool) or not isinstance(k, int) or k != pending.k:
            what = "was already provided" if isinstance(k, int) and 0 <= k < pending.k else "was not asked for"
            raise EvaluationMismatch(
                f"evaluation k={k!r} of step t={self.t} {what}; the step waits for evaluation k={pending.k}",
                t=self.t,
                expected_k=pending.k,
            )
        if not is_finite_number(loss):
            raise GradientError(f"the loss of evaluation k={k} must be a finite number, got {str(loss)[:40]}")
        prepared = state.check_gradients(grads, donate=donate)
        refused = sparse.refusal(state.optimizer, state._name_of_param(), prepared)
        if refused is not None:
            raise GradientError(f"{state.entry.name!r} cannot take this evaluation: {refused}")
        bad = nonfinite(prepared)
        if bad:
            raise NonFiniteGradient(
                f"gradient(s) {bad[:10]} of evaluation k={k} contain NaN or Inf; an evaluation inside a step cannot "
                "be skipped: send a finite one, or abandon the step"
            )
        if k == 0 and self._steps_schedule:
            # a plateau scheduler reads the step's loss: evaluation 0's, which torch's step returns
            assert state.schedule is not None
            state.schedule.check(epoch=False, metric=float(loss))
        self._inbox.put((float(loss), prepared))
        self._answer(self._outbox.get())
        return self.pending

    def abandon(self) -> None:
        """End a step under way; the state is then unusable (reload it). Nothing happens to a step that has ended."""
        if not isinstance(self._pending, Evaluate):
            return
        self._inbox.put(_ABANDON)
        self._answer(self._outbox.get())

    def _answer(self, message: tuple[str, Any]) -> None:
        kind, value = message
        state = self._state
        if kind == "evaluate":
            self._pending = Evaluate(t=self.t, k=value, params=state.params())
            return
        self._thread.join()
        self._pending = None
        if kind == "abandoned":
            self._ended = f"been abandoned after {value} evaluation(s)"
            state._broken = f"closure step t={self.t} was abandoned after {value} evaluation(s)"
            state._busy = None
            return
        state._busy = None
        if kind == "failed":
            self._ended = f"failed: {type(value).__name__}: {value}"
            state._broken = f"closure step t={self.t} raised {type(value).__name__}: {value}"
            raise StepFailed(f"{state.entry.name!r} failed in step t={self.t}: {type(value).__name__}: {value}") from value
        loss, evaluations = value
        try:
            state._after_step(loss, steps_schedule=self._steps_schedule)
        except Exception as exc:
            self._ended = f"failed after the optimizer step: {type(exc).__name__}: {exc}"
            state._broken = f"step t={self.t} raised {type(exc).__name__}: {exc}"
            raise StepFailed(f"step t={self.t} failed after the optimizer step: {type(exc).__name__}: {exc}") from exc
        self._pending = Done(result=StepResult(t=state.t, lrs=state.lrs), loss=loss, evaluations=evaluations)


def replay(
    state: RunState, t: int, evaluations: Iterable[tuple[int, float, Mapping[str, torch.Tensor]]], *, donate: bool = False
) -> ClosureStep:
    """Step ``t`` fed the logged ``(k, loss, gradients)`` in order (recovery): it is then done, or waits for the
    evaluation after the last one given, exactly as it did when they were first provided."""
    step = ClosureStep.begin(state, t)
    for k, loss, grads in evaluations:
        step.provide(k, loss, grads, donate=donate)
    return step
