"""Several workers on one run (the spec's ``workers``): who may send a step, each rank's gradient applied exactly
once, the steps of sync mode gathered across ranks, and the staleness of async mode.

Sync mode. Each rank sends its gradient for the run's ``t``. Under the run's write hold, a gradient is checked and
added to the step's ``Gather`` (``optim_core.workers.RankOrderedMean``: summed in rank order as ranks arrive),
and the request waits, without the hold, for the step. The step is applied (one optimizer step of the mean) when
every rank has sent ``t``, or once ``quorum`` ranks have and ``straggler_timeout_s`` has passed since the first
arrived: whichever request finds it so (one arriving, or one waiting past the deadline) applies it. Its record is
the mean as logged (replayed as any step) and who contributed; every contributing request is answered with the
same new parameters, encoded once after the step. A rank whose gradient comes after its step was applied is
told the run's ``t`` (409) and resyncs; the record lists it as dropped.

Async mode. Each rank sends a gradient computed at its own ``t``, applied at once as the run's next step if the
run has moved at most ``max_staleness`` steps since; the log keeps the order they were applied in.

Exactly once per (rank, t): each rank's last applied gradient ``(t, digest)`` is kept with the run
(``Live.marks``, written with every step record); a retry of it is answered again, another gradient for it is a
409. Gradients being gathered are in memory only: a restart loses them unacknowledged, and the ranks' retries
send them again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch

import optim_core
from optim_core.inputs import nonfinite
from optim_format import framing

from .. import payloads
from ..errors import Invalid, ServiceError, StepConflict, WaitingForWorkers, from_engine
from . import journal, series
from .gather import Answer, Gather, Pending, Sent
from .live import Live, RunContext, position

# a sync step's requests wait for the other ranks at most this many straggler timeouts (and at least a minute),
# then answer 503 (the worker's retry joins the same step again: exactly once)
WAIT_TIMEOUTS = 4
MIN_WAIT_S = 60.0


def sender_rank(live: Live, sent: Sent) -> int | None:
    """The rank of a step's sender on this run (None for a one-worker run), or a 4xx saying what does not fit."""
    workers = live.state.spec.workers
    if workers is None:
        if sent.rank not in (None, 0) or sent.world_size not in (None, 1):
            raise StepConflict(
                f"run {live.name!r} has one worker; got rank={sent.rank}, world_size={sent.world_size}",
                current_t=live.state.t,
                reason="world_size",
            )
        return None
    if sent.world_size is not None and sent.world_size != workers.world_size:
        raise StepConflict(
            f"run {live.name!r} has world_size={workers.world_size}; this worker says {sent.world_size}",
            current_t=live.state.t,
            reason="world_size",
        )
    if sent.rank is None:
        raise Invalid(f"run {live.name!r} has {workers.world_size} workers: send the step's rank (?rank=)")
    if not 0 <= sent.rank < workers.world_size:
        raise Invalid(f"rank {sent.rank} is outside [0, {workers.world_size}) for run {live.name!r}")
    return sent.rank


def repeated(live: Live, rank: int, t: int, digest: str) -> bool:
    """Whether (rank, t) is this rank's last applied gradient: True for a retry of it (same digest); another
    gradient for it is a 409."""
    mark = live.marks.get(rank)
    if mark is None or mark[0] != t:
        return False
    if mark[1] != digest:
        raise StepConflict(
            f"rank {rank}'s gradient for t={t} was already applied with a different gradient; the run is at t={live.state.t}",
            current_t=live.state.t,
            reason="other_gradient",
        )
    return True


# ---------------------------------------------------------------------------------------------- sync
def gather(
    ctx: RunContext,
    live: Live,
    rank: int,
    t: int,
    grads: dict[str, torch.Tensor],
    digest: str,
    loss: float | None,
    scalars: dict[str, float],
) -> Pending:
    """Rank ``rank``'s gradient for sync step ``t``, under the run's write hold: added to the step (or, from a
    retry, found there), and the step applied if that made it ready."""
    state, workers = live.state, live.state.spec.workers
    assert workers is not None
    current = live.gather
    if current is not None and current.t == t and rank in current.digests:
        if current.digests[rank] != digest:
            raise StepConflict(f"rank {rank} already sent another gradient for t={t}", current_t=state.t, reason="other_gradient")
        return Pending(current, rank)  # a retry while the step gathers: wait with it
    if t != state.t:
        what = "stale: the step was applied without it; resync from GET /runs/{run}/params" if t < state.t else "ahead"
        raise StepConflict(f"gradient is for t={t} but the run is at t={state.t} ({what})", current_t=state.t, reason="stale")
    try:
        # checked and copied into the parameters' dtypes before it joins: one rank's bad gradient spoils no step
        prepared = state.check_gradients(grads)
        bad = nonfinite(prepared)
        if bad and state.spec.nonfinite == "error":
            raise optim_core.NonFiniteGradient(f"gradient(s) {bad[:10]} of rank {rank} contain NaN or Inf; nothing was applied")
    except optim_core.EngineError as exc:
        raise from_engine(exc) from None
    if current is None:
        current = live.gather = Gather(t=t, workers=workers)
    current.mean.add(rank, prepared)
    current.digests[rank], current.received[rank] = digest, time.time()
    if loss is not None:
        current.losses[rank] = loss
    current.scalars[rank] = scalars
    if current.ready():
        apply(ctx, live)
    return Pending(current, rank)


def apply(ctx: RunContext, live: Live) -> None:
    """Apply the gathered step (under the run's write hold): the mean as logged, one optimizer step, its record;
    every waiting request gets the same answer."""
    current, state = live.gather, live.state
    assert current is not None
    live.gather = None
    try:
        contributors = sorted(current.digests)
        grads = current.mean.close(contributors)
        losses = [current.losses[r] for r in contributors if r in current.losses]
        loss = sum(losses) / len(losses) if losses else None
        parts = framing.parts(framing.flatten(grads))
        hasher = payloads.Hasher()
        for part in parts:
            hasher.update(part)
        digest = hasher.hexdigest()
        writer = journal.begin(ctx, live, parts)  # the log writer reads the mean; the optimizer steps on its copy
        lrs = state.lrs
        try:
            result = ctx.stepper.run(state.apply, grads, current.t, loss=loss, measure=ctx.settings.history_norms)
        except BaseException:
            journal.abort(ctx, writer)
            raise
        marks = {r: (current.t, current.digests[r]) for r in contributors}
        record = step_record(current, contributors, current.workers.world_size)
        step_ms = (time.monotonic() - current.started) * 1e3  # from the first rank's gradient
        history = series.sample(
            loss=loss, lrs=lrs, norms=result.norms, scalars=mean_scalars(current, contributors), step_ms=step_ms
        )
        journal.commit(
            ctx,
            live,
            writer,
            kind="step",
            t=current.t,
            value=loss,
            grad_digest=digest,
            record=record,
            marks=marks,
            history=history,
        )
        live.marks.update(marks)
        where = position(live)
        answer = Answer(result=result, position=where, body=payloads.encode(state.params(), where))
    except optim_core.StepFailed as exc:
        live.stale = f"the optimizer failed part way through step t={current.t}"
        current.done.set_exception(Invalid(f"the optimizer failed on this step's mean gradient: {exc}"))
        raise Invalid(f"the optimizer failed on this step's mean gradient: {exc}") from None
    except optim_core.EngineError as exc:
        error = from_engine(exc)
        current.done.set_exception(error)
        raise error from None
    except BaseException as exc:
        current.done.set_exception(exc if isinstance(exc, ServiceError) else RuntimeError(str(exc)))
        raise
    current.done.set_result(answer)


def mean_scalars(current: Gather, contributors: list[int]) -> dict[str, float]:
    """Each scalar the contributing ranks sent, averaged over those that sent it (as their losses are)."""
    sent: dict[str, list[float]] = {}
    for r in contributors:
        for name, value in current.scalars.get(r, {}).items():
            sent.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in sent.items()}


def apply_if_ready(ctx: RunContext, live: Live, t: int) -> None:
    """From a request waiting past the deadline (under the write hold): apply sync step ``t`` if it is ready."""
    if live.gather is not None and live.gather.t == t and live.gather.ready():
        apply(ctx, live)


def step_record(current: Gather, contributors: list[int], world_size: int) -> dict[str, Any]:
    return {
        "contributors": contributors,
        "dropped": [r for r in range(world_size) if r not in contributors],
        "base_t": None,
        "received": {str(r): current.received[r] for r in contributors},
    }


async def wait(pending: Pending, apply_later: Callable[[int], Any]) -> Answer:
    """Wait, without the run's hold, for the step ``pending`` is part of; past its deadline, ``apply_later(t)``
    (which takes the hold) applies it if enough ranks came. A 503 after ``WAIT_TIMEOUTS`` straggler timeouts."""
    current = pending.gather
    done = asyncio.wrap_future(current.done)
    give_up = current.started + max(MIN_WAIT_S, WAIT_TIMEOUTS * current.workers.straggler_timeout_s)
    while True:
        now = time.monotonic()
        if now >= give_up:
            raise WaitingForWorkers(
                f"step t={current.t} has gradients from ranks {sorted(current.digests)}; it waits for "
                f"{current.workers.needed} of {current.workers.world_size}: retry (the same gradient joins it again)"
            )
        timeout = current.deadline - now if now < current.deadline else 1.0
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout=min(timeout, give_up - now))
        except TimeoutError:
            await apply_later(current.t)


def received_at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()
