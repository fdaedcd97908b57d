"""The exactly-once step, top-down: what happens to a gradient between its body and its answer.

Called under the run's write hold (``RunRegistry.answer``), in a worker thread:

1. decode the payload (safetensors views of the body; a small JSON body is encoded to safetensors first, so the
   log holds one format);
2. exactly once: a retry of the step just applied (same ``t``, same gradient digest) is answered again without
   applying anything; the same step with another gradient, a stale ``t`` or one ahead of the run is a 409 that
   tells the worker the run's ``t``;
3. the log record's blob starts on a log writer while the optimizer steps on a stepper thread (``journal``);
4. the record is committed, then (snapshot-only runs) a due snapshot is taken;
5. the outcome: the new ``t``, the LRs, the parameters the answer is sent from.
A request refused (4xx) changes nothing but the run's count of refused steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

import optim_core
from optim_core import StepResult

from .. import payloads
from ..errors import Invalid, InvalidPayload, ServiceError, StepConflict, from_engine
from . import journal
from .live import Live, RunContext
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

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.laps.items())


@dataclass(frozen=True)
class StepRequest:
    """A step as received: ``digest`` is ``payloads.digest`` of a binary payload, computed while it arrived."""

    t: int
    payload: bytes | memoryview
    content_type: str  # "binary" (safetensors) or "json"
    loss: float | None = None
    digest: str | None = None


@dataclass(frozen=True)
class StepOutcome:
    result: StepResult
    replayed: bool
    params: dict[str, torch.Tensor]


def step(ctx: RunContext, snapshots: Snapshots, live: Live, request: StepRequest, clock: Clock) -> StepOutcome:
    try:
        return _step(ctx, snapshots, live, request, clock)
    except ServiceError as exc:
        if exc.status_code < 500:
            live.rejected_steps += 1
        raise


def _step(ctx: RunContext, snapshots: Snapshots, live: Live, request: StepRequest, clock: Clock) -> StepOutcome:
    state = live.state
    grads, payload, digest, loss = _decode(live, request)
    clock.lap("decode")

    if request.t == state.t - 1 and live.last_step_digest is not None:
        if digest != live.last_step_digest:
            raise StepConflict(
                f"step t={request.t} was already applied with a different gradient; the run is at t={state.t}",
                current_t=state.t,
                reason="other_gradient",
            )
        return StepOutcome(StepResult(t=state.t, lrs=state.lrs), replayed=True, params=state.params())
    if request.t != state.t:
        what = "stale: resync from GET /runs/{run}/params" if request.t < state.t else "ahead of the run"
        raise StepConflict(
            f"gradient is for t={request.t} but the run is at t={state.t} ({what})",
            current_t=state.t,
            reason="stale" if request.t < state.t else "ahead",
        )

    # the gradient goes to the log while the optimizer steps: the payload is not the tensors the optimizer is
    # given (those are decoded copies), so both proceed at once and the answer waits for both. A run that logs
    # nothing gives the optimizer the body's own (writable) memory: the aligned gradients are not copied.
    writer = journal.begin(ctx, live, payload)
    donate = writer is None and (request.content_type == "json" or (isinstance(payload, memoryview) and not payload.readonly))
    try:
        result = ctx.stepper.run(state.apply, grads, request.t, loss=loss, donate=donate)
    except optim_core.StepFailed as exc:
        journal.abort(ctx, writer)
        live.stale = f"the optimizer failed part way through step t={request.t}"
        raise Invalid(f"the optimizer failed on this gradient and nothing was applied: {exc}") from None
    except optim_core.EngineError as exc:
        journal.abort(ctx, writer)
        raise from_engine(exc) from None
    except BaseException:
        journal.abort(ctx, writer)
        raise
    clock.lap("step")
    journal.commit(ctx, live, writer, kind="step", t=request.t, value=loss, grad_digest=digest)
    clock.lap("log")  # what the log write adds after the step (it ran beside it)
    live.last_step_digest = digest
    if live.durability == "snapshot":
        snapshots.take_if_due(live)  # its durability: before the answer (a log run's comes after it)
    return StepOutcome(result, replayed=False, params=state.params())


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


def _decode(live: Live, request: StepRequest) -> tuple[dict[str, torch.Tensor], bytes | memoryview, str, float | None]:
    """The gradients, the payload to log (safetensors), its digest, and the loss."""
    loss = request.loss
    if request.content_type != "json":
        grads, _ = payloads.decode(request.payload)
        return grads, request.payload, request.digest or payloads.digest(request.payload), loss
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
    return grads, payload, payloads.digest(payload), loss
