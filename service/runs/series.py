"""A run's per-step history (issue 20): what every applied step records, the worker's scalars, and the
downsampled read of ``GET /runs/{run}/history``.

Every applied step records, by name: ``loss`` (the worker's, when sent), ``lr/<group>`` (the LR the step was
applied with), ``grad_norm``, ``update_norm``, ``param_norm`` (``optim_core.norms``, as
``OPTIM_HISTORY_NORMS`` says), ``step_ms`` (the request's time in the service until the step was applied: not
the log's commit, nor the answer), ``time`` (seconds since the epoch) and the worker's scalars
(``Optim-Scalars``). A run that logs its steps writes them in the transaction of the step's record
(``journal.commit``): a step is in its history exactly when it is in the log, through kill -9, retries and
replays. A snapshot-only run keeps them in memory and writes them with its next snapshot (``Snapshots.write``):
what a crash loses of the run, it loses of the history.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from schemas import SERIES_NAME_PATTERN, History, Series

from ..errors import Invalid, RunNotFound
from ..storage.series import BLOCK, Aggregate
from .live import RunContext

RESERVED = frozenset({"loss", "grad_norm", "update_norm", "param_norm", "step_ms", "time"})
MAX_SCALARS = 32
_NAME = re.compile(SERIES_NAME_PATTERN)


def is_reserved(name: str) -> bool:
    return name in RESERVED or name.startswith("lr/")


def parse_scalars(header: str | None) -> dict[str, float]:
    """The ``Optim-Scalars`` header: a JSON object of at most ``MAX_SCALARS`` names to finite numbers."""
    if header is None:
        return {}
    try:
        scalars = json.loads(header)
    except (ValueError, RecursionError):
        raise Invalid(f"Optim-Scalars is not JSON: {header[:80]!r}") from None
    if not isinstance(scalars, dict):
        raise Invalid('Optim-Scalars must be a JSON object of names to numbers, e.g. {"acc": 0.9}')
    if len(scalars) > MAX_SCALARS:
        raise Invalid(f"Optim-Scalars has {len(scalars)} names; at most {MAX_SCALARS} are kept per step")
    out: dict[str, float] = {}
    for name, value in scalars.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise Invalid(f"Optim-Scalars: {name[:80]!r} is not a series name ([A-Za-z0-9_./-], 1 to 64 characters)")
        if is_reserved(name):
            raise Invalid(f"Optim-Scalars: {name!r} is the service's own series (send the loss as ?loss=)")
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise Invalid(f"Optim-Scalars: {name!r} must be a finite number, got {str(value)[:40]}")
        out[name] = float(value)
    return out


def _finite(value: float) -> bool:
    """A finite number that a float holds (JSON's integers may have 400 digits)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def sample(
    *,
    loss: float | None,
    lrs: Sequence[float | None],
    norms: Mapping[str, float],
    scalars: Mapping[str, float],
    step_ms: float,
) -> list[tuple[str, float | None]]:
    """The values one applied step records (a value that is not finite is kept as None)."""
    values: dict[str, Any] = {"time": time.time(), "step_ms": step_ms}
    if loss is not None:
        values["loss"] = loss
    values.update({f"lr/{g}": lr for g, lr in enumerate(lrs) if lr is not None})
    values.update(norms)
    values.update(scalars)
    return [(name, float(v) if math.isfinite(v) else None) for name, v in values.items()]


def bucket_size(start: int, stop: int, points: int) -> int:
    """Steps per bucket so that the buckets (aligned at multiples of it) over [start, stop) are at most ``points``;
    past ``BLOCK`` a multiple of it, so that whole blocks are read."""
    span = stop - start
    if span <= points:
        return 1

    def rounded(size: int) -> int:
        return -(-size // BLOCK) * BLOCK if size >= BLOCK else size

    # aligned buckets over a span cut one more than span / size: this size always fits (one bucket past stop)
    enough = rounded(-(-span // (points - 1)) if points > 1 else stop)
    size = rounded(-(-span // points))
    for _ in range(64):  # the smallest that fits is seldom more than a few steps above the first guess
        if size >= enough or -(-stop // size) - start // size <= points:
            return min(size, enough)
        size += BLOCK if size >= BLOCK else 1
    return enough


def parse_names(names: str | None) -> list[str] | None:
    """``names=loss,lr/0``: None (every name) when absent or empty."""
    if not names:
        return None
    out = names.split(",")
    for name in out:
        if not _NAME.fullmatch(name):
            raise Invalid(f"names: {name[:80]!r} is not a series name ([A-Za-z0-9_./-], 1 to 64 characters)")
    return list(dict.fromkeys(out))


def read(ctx: RunContext, tenant: str, name: str, *, start: int, stop: int | None, points: int, names: str | None) -> History:
    """The run's history over [start, stop) (default: the whole run) in at most ``points`` buckets."""
    wanted = parse_names(names)
    with ctx.db.read(f"reading the history of run {name!r}") as repo:
        row = repo.run(tenant, name)
        if row is None:
            raise RunNotFound(f"run {name!r} does not exist")
        stop = row.t if stop is None else stop
        if start > stop:
            raise Invalid(f"start={start} is after stop={stop}")
        size = bucket_size(start, stop, points)
        if size < BLOCK:
            aggregates = repo.series.from_values(row.id, [(start, stop)], size, wanted)
        else:  # whole blocks from their aggregates, the steps at the edges and past the last block one by one
            first = -(-start // BLOCK) * BLOCK
            last = min(stop - stop % BLOCK, repo.series.blocks_end(row.id))
            if last <= first:
                aggregates = repo.series.from_values(row.id, [(start, stop)], size, wanted)
            else:
                aggregates = repo.series.from_blocks(row.id, first, last, size, wanted)
                aggregates += repo.series.from_values(row.id, [(start, first), (last, stop)], size, wanted)
    series = _series(aggregates, size, start)
    for missing in wanted or []:
        series.setdefault(missing, Series(t=[], min=[], mean=[], max=[], count=[]))
    return History(run=name, t=row.t, start=start, stop=stop, bucket=size, series=series)


def _series(aggregates: list[Aggregate], size: int, start: int) -> dict[str, Series]:
    """Aggregates of the same (name, bucket) merged, in order of name and bucket."""
    merged: dict[tuple[str, int], list[Any]] = {}
    for name, k, lo, hi, total, count, finite in aggregates:
        m = merged.get((name, k))
        if m is None:
            merged[(name, k)] = [lo, hi, total, count, finite]
            continue
        m[0] = lo if m[0] is None else m[0] if lo is None else min(m[0], lo)
        m[1] = hi if m[1] is None else m[1] if hi is None else max(m[1], hi)
        m[2] = total if m[2] is None else m[2] if total is None else m[2] + total
        m[3] += count
        m[4] += finite
    out: dict[str, dict[str, list[Any]]] = {}
    for (name, k), (lo, hi, total, count, finite) in sorted(merged.items()):
        s = out.get(name)
        if s is None:
            s = out[name] = {"t": [], "min": [], "mean": [], "max": [], "count": []}
        whole = finite == count and count > 0  # a value that was not finite makes its bucket's statistics null
        s["t"].append(max(k * size, start))
        s["min"].append(lo if whole else None)
        s["mean"].append(total / count if whole else None)
        s["max"].append(hi if whole else None)
        s["count"].append(count)
    # built here: nothing to validate
    return {
        name: Series.model_construct(t=s["t"], min=s["min"], mean=s["mean"], max=s["max"], count=s["count"])
        for name, s in out.items()
    }
