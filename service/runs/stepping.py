"""The exactly-once step, top-down: what happens to a gradient between its body and its answer.

Called under the run's write hold (``RunRegistry.answer``), in a worker thread:

1. decode the payload: safetensors views of the body (dense gradients, sparse ones as ``#indices``/``#values``,
   Hessian estimates as ``#hessian``); a small JSON body is encoded to safetensors first, so the log holds one
   format;
2. exactly once: a retry of the gradient just applied (same ``t`` and evaluation ``k``, same digest) is answered
   again without applying anything; another gradient for it, a stale ``t`` or one ahead of the run is a 409 that
   tells the worker where the run is;
3. the log record's blob starts on a log writer while the optimizer steps on a stepper thread (``journal``);
4. the record is committed, then (snapshot-only runs) a due snapshot is taken;
5. the outcome: the new ``t``, the LRs, the parameters the answer is sent from, and what the worker needs next
   (``position``: the evaluation a closure step waits for, the Hessian estimates an Adahessian step takes).

A closure optimizer (LBFGS) steps through evaluations (``_evaluate``): each request is evaluation ``k`` of step
``t``, answered with the parameters to evaluate at next, until the step is done. A request refused (4xx)
changes nothing but the run's count of refused steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import optim_core
from optim_core import StepResult
from optim_core.closure import Done
from optim_core.norms import total_norm

from .. import payloads
from ..errors import Invalid, InvalidPayload, ServiceError, StepConflict, from_engine
from . import journal, series, workers
from .gather import Pending, Sent
from .live import Live, RunContext, position
from .snapshots import Snapshots


class Clock:
    """Named intervals of a request, in milliseconds (sent back as a ``Server-Timing`` header)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + (now - self._last) * 1e3
        self._last = now

    def elapsed(self) -> float:
        """Milliseconds since the request started, to the last lap."""
        return sum(self.laps.values())

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.laps.items())


@dataclass(frozen=True)
class StepRequest:
    """A step as received: ``digest`` is ``payloads.digest`` of a binary payload, computed while it arrived;
    ``k`` the evaluation of a closure step (closure optimizers only)."""

    t: int
    payload: bytes | memoryview
    content_type: str  # "binary" (safetensors) or "json"
    loss: float | None = None
    digest: str | None = None
    k: int | None = None
    rank: int | None = None
    world_size: int | None = None
    scalars: dict[str, float] = field(default_factory=dict)  # the worker's, for the step's history (Optim-Scalars)
    log: journal.Inflow | None = None  # the body written to the log as it arrived (``journal.stream``)


@dataclass(frozen=True)
class StepOutcome:
    result: StepResult
    replayed: bool
    params: dict[str, torch.Tensor]
    position: dict[str, str]  # the answer's metadata: t, lr, and what the worker needs next


@dataclass(frozen=True)
class _Decoded:
    grads: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]
    payload: bytes | memoryview  # as logged: safetensors
    digest: str
    loss: float | None


def step(ctx: RunContext, snapshots: Snapshots, live: Live, request: StepRequest, clock: Clock) -> StepOutcome | Pending:
    """The step (see the module's docstring); a sync step of several workers answers ``Pending``: wait for the
    other ranks (``workers.wait``) without the run's hold."""
    try:
        return _step(ctx, snapshots, live, request, clock)
    except ServiceError as exc:
        if exc.status_code < 500:
            live.rejected_steps += 1
        raise


def _step(ctx: RunContext, snapshots: Snapshots, live: Live, request: StepRequest, clock: Clock) -> StepOutcome | Pending:
    state = live.state
    closure = "closure" in state.entry.needs
    if closure and request.k is None:
        raise Invalid(f"{state.entry.name} steps by closure evaluations: send each one as evaluation k (?k=0, 1, ...)")
    if not closure and request.k is not None:
        raise Invalid(f"{state.entry.name} takes one gradient per step: k is for closure optimizers (torch.LBFGS)")
    rank = workers.sender_rank(live, Sent(request.rank, request.world_size))
    decoded = _decode(live, request)
    clock.lap("decode")
    if rank is not None:
        return _from_rank(ctx, snapshots, live, request, rank, decoded, clock)

    last = live.last_applied
    if last is not None and (request.t, request.k) == last[:2] and (closure or request.t == state.t - 1):
        if decoded.digest != last[2]:
            what = f"step t={request.t}" if request.k is None else f"evaluation k={request.k} of step t={request.t}"
            raise StepConflict(
                f"{what} was already applied with a different gradient; the run is at t={state.t}",
                current_t=state.t,
                reason="other_gradient",
            )
        return _replayed(live)
    if request.t != state.t:
        what = "stale: resync from GET /runs/{run}/params" if request.t < state.t else "ahead of the run"
        raise StepConflict(
            f"gradient is for t={request.t} but the run is at t={state.t} ({what})",
            current_t=state.t,
            reason="stale" if request.t < state.t else "ahead",
        )
    if closure:
        return _evaluate(ctx, snapshots, live, request, decoded, clock)
    record = {"contributors": [0], "dropped": [], "base_t": None, "received": {"0": time.time()}}
    outcome = _apply(ctx, snapshots, live, request, decoded, clock, record=record)
    live.last_applied = (request.t, None, decoded.digest)
    return outcome


def _from_rank(
    ctx: RunContext, snapshots: Snapshots, live: Live, request: StepRequest, rank: int, decoded: _Decoded, clock: Clock
) -> StepOutcome | Pending:
    """A gradient from rank ``rank`` of a run of several workers: gathered (sync) or applied as it comes (async)."""
    state, spec = live.state, live.state.spec.workers
    assert spec is not None
    if workers.repeated(live, rank, request.t, decoded.digest):
        if spec.mode == "sync" and state.t != request.t + 1:  # the run moved on: its answer is gone with it
            raise StepConflict(
                f"rank {rank}'s step t={request.t} was applied; the run is at t={state.t}: resync",
                current_t=state.t,
                reason="stale",
            )
        return _replayed(live)  # async: the run as it is now, which is what the rank goes on from
    if spec.mode == "sync":
        return workers.gather(ctx, live, rank, request.t, decoded.grads, decoded.digest, decoded.loss, request.scalars)
    if request.t > state.t:
        raise StepConflict(f"gradient is for t={request.t}, ahead of the run at t={state.t}", current_t=state.t, reason="ahead")
    if state.t - request.t > spec.max_staleness:
        raise StepConflict(
            f"rank {rank}'s gradient was computed at t={request.t}, {state.t - request.t} steps behind the run at "
            f"t={state.t} (max_staleness={spec.max_staleness}): resync from GET /runs/{{run}}/params",
            current_t=state.t,
            reason="stale",
        )
    record = {"contributors": [rank], "dropped": [], "base_t": {str(rank): request.t}, "received": {str(rank): time.time()}}
    marks = {rank: (request.t, decoded.digest)}
    # applied as the run's next step, whatever t it was computed at: the order of arrival is the log's
    outcome = _apply(ctx, snapshots, live, request, decoded, clock, t=state.t, record=record, marks=marks)
    live.marks.update(marks)
    return outcome


def _replayed(live: Live) -> StepOutcome:
    state = live.state
    return StepOutcome(StepResult(t=state.t, lrs=state.lrs), replayed=True, params=state.params(), position=position(live))


def _apply(
    ctx: RunContext,
    snapshots: Snapshots,
    live: Live,
    request: StepRequest,
    decoded: _Decoded,
    clock: Clock,
    *,
    t: int | None = None,
    record: dict[str, Any] | None = None,
    marks: dict[int, tuple[int, str]] | None = None,
) -> StepOutcome:
    """One optimizer step of ``decoded`` as the run's step ``t`` (the request's), logged beside it."""
    state = live.state
    t = request.t if t is None else t
    # the gradient goes to the log while the optimizer steps (or went as the body arrived: ``request.log``). The
    # optimizer is given the body's own (writable) memory, its aligned gradients not copied, when nothing else
    # reads it: a run that logs nothing, or a body already in the log's file; else decoded copies, beside the write.
    writer = journal.begin(ctx, live, decoded.payload, request.log)
    written = writer.written if writer is not None else None
    if written is not None:
        written.result()  # the last piece handed to the kernel (its sync goes on beside the step)
        clock.lap("inflow")
    payload = decoded.payload
    donate = (writer is None or written is not None) and (
        request.content_type == "json" or (isinstance(payload, memoryview) and not payload.readonly)
    )
    hessians = decoded.hessians if "hessian" in state.entry.needs or decoded.hessians else None
    lrs = state.lrs  # the LRs this step is applied with (the scheduler steps after it)

    try:
        result = ctx.stepper.run(
            state.apply,
            decoded.grads,
            t,
            loss=decoded.loss,
            donate=donate,
            hessians=hessians,
            measure=ctx.settings.history_norms,
        )
    except optim_core.StepFailed as exc:
        journal.abort(ctx, writer)
        live.stale = f"the optimizer failed part way through step t={t}"
        raise Invalid(f"the optimizer failed on this gradient and nothing was applied: {exc}") from None
    except optim_core.EngineError as exc:
        journal.abort(ctx, writer)
        raise from_engine(exc) from None
    except BaseException:
        journal.abort(ctx, writer)
        raise
    clock.lap("step")
    history = series.sample(loss=decoded.loss, lrs=lrs, norms=result.norms, scalars=request.scalars, step_ms=clock.elapsed())
    journal.commit(
        ctx,
        live,
        writer,
        kind="step",
        t=t,
        value=decoded.loss,
        grad_digest=decoded.digest,
        record=record,
        marks=marks,
        history=history,
    )
    clock.lap("log")  # what the log write adds after the step (it ran beside it)
    if live.durability == "snapshot":
        snapshots.take_if_due(live)  # its durability: before the answer (a log run's comes after it)
    return StepOutcome(result, replayed=False, params=state.params(), position=position(live))


def _evaluate(
    ctx: RunContext, snapshots: Snapshots, live: Live, request: StepRequest, decoded: _Decoded, clock: Clock
) -> StepOutcome:
    """Evaluation ``k`` of a closure step: logged before the step goes on with it; the answer is the parameters of
    the next evaluation, or the step's result once torch's ``step(closure)`` returns."""
    state, k = live.state, request.k
    assert k is not None
    if decoded.loss is None:
        raise Invalid(f"evaluation k={k} of step t={request.t} needs its loss (?loss=): the line search compares them")
    if live.closure is None:
        if k != 0:
            raise StepConflict(
                f"step t={request.t} has not started: its first evaluation is k=0, got k={k}",
                current_t=state.t,
                expected_k=0,
                reason="evaluation",
            )
        try:
            live.closure = ctx.stepper.run(state.begin_closure_step, request.t)
        except optim_core.EngineError as exc:
            raise from_engine(exc) from None
    expected = live.closure.waiting_for
    if k != expected:
        raise StepConflict(
            f"evaluation k={k} of step t={request.t} is not the one it waits for: k={expected}",
            current_t=state.t,
            expected_k=expected,
            reason="evaluation",
        )
    writer = journal.begin(ctx, live, decoded.payload, request.log)
    lrs = state.lrs  # before the step: its scheduler steps when the step is done
    try:
        pending = ctx.stepper.run(live.closure.provide, k, decoded.loss, decoded.grads)
    except optim_core.StepFailed as exc:
        journal.abort(ctx, writer)
        live.closure = None
        live.stale = f"the optimizer failed part way through step t={request.t}"
        raise Invalid(f"the optimizer failed on evaluation k={k} and nothing was applied: {exc}") from None
    except optim_core.EngineError as exc:  # refused before torch saw it: the step waits for the same k
        journal.abort(ctx, writer)
        raise from_engine(exc) from None
    except BaseException:
        journal.abort(ctx, writer)
        raise
    clock.lap("step")
    # the step's record once it is done: its evaluations were one worker's
    done = {"contributors": [0], "dropped": [], "base_t": None, "received": {"0": time.time()}}
    record, history = None, None
    if isinstance(pending, Done):  # the step's history: the loss torch's step returned (evaluation 0's)
        norms = (
            {} if ctx.settings.history_norms == "off" else {"param_norm": ctx.stepper.run(total_norm, state.params().values())}
        )
        record = done
        history = series.sample(loss=pending.loss, lrs=lrs, norms=norms, scalars=request.scalars, step_ms=clock.elapsed())
    journal.commit(
        ctx,
        live,
        writer,
        kind="eval",
        t=request.t,
        k=k,
        value=decoded.loss,
        grad_digest=decoded.digest,
        record=record,
        history=history,
    )
    clock.lap("log")
    live.last_applied = (request.t, k, decoded.digest)
    result = pending.result if isinstance(pending, Done) else StepResult(t=state.t, lrs=state.lrs)
    if isinstance(pending, Done):
        live.closure = None
        if live.durability == "snapshot":
            snapshots.take_if_due(live)
    return StepOutcome(result, replayed=False, params=state.params(), position=position(live))


def step_epoch(ctx: RunContext, live: Live, *, metric: float | None) -> StepResult:
    """The end of an epoch: epoch-interval schedulers (with the metric for plateau ones) and SWA; logged."""
    try:
        result = live.state.step_epoch(metric=metric)
    except optim_core.StepFailed as exc:
        live.stale = "the epoch step failed part way"
        raise Invalid(f"the epoch step failed and nothing was applied: {exc}") from None
    except optim_core.EngineError as exc:
        raise from_engine(exc) from None
    journal.commit(ctx, live, journal.begin(ctx, live, None), kind="epoch", t=live.state.t, value=metric, grad_digest=None)
    return result


def _decode(live: Live, request: StepRequest) -> _Decoded:
    """The gradients, the payload to log (safetensors), its digest, and the loss."""
    loss = request.loss
    if request.content_type != "json":
        grads, hessians = payloads.decode_gradients(request.payload, live.state.spec.shapes())
        digest = request.digest or payloads.digest(request.payload)
        return _Decoded(grads, hessians, request.payload, digest, loss)
    try:
        body = json.loads(bytes(request.payload))  # a JSON body is read as bytes: no copy
    except (ValueError, RecursionError) as exc:
        raise InvalidPayload(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict) or "grads" not in body:
        raise Invalid('a JSON step body is {"grads": {name: nested lists}, "loss": optional number}')
    if loss is None and body.get("loss") is not None:
        loss = body["loss"]
    grads = payloads.from_json_lists(body["grads"], live.state.params(), "grads")
    payload = payloads.encode(grads)
    return _Decoded(grads, {}, payload, payloads.digest(payload), loss)
