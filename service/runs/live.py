"""A run in memory, and what the run lifecycle's modules share."""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from optim_core import RunSpec, RunState
from optim_core.closure import ClosureStep

from ..errors import StorageUnavailable
from ..metrics import Metrics
from ..settings import Settings
from ..stepper import Stepper
from ..storage import BlobStore, Database
from .gather import Gather

RunKey = tuple[str, str]  # (tenant, run name)
# the last gradient applied: (t, k, digest), k the evaluation of a closure step (None for a plain step); a retry of
# it is answered again, another gradient for it is a conflict
Applied = tuple[int, int | None, str]
# the run's columns that say where it stands: a run that logs its steps writes them with every step record
POSITION = ("t", "epoch", "lrs", "skipped_steps")


def spec_digest(spec: RunSpec, durability: str, snapshot_every: int) -> str:
    """A run's identity: creating it again with the same spec and policy answers the existing run."""
    canonical = json.dumps({"spec": spec.to_dict(), "durability": durability, "snapshot_every": snapshot_every}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def described(state: RunState) -> dict[str, Any]:
    """What the ``run`` row tells of a state (``storage.models.Run``), read off it under the run's hold."""
    groups = state.groups()
    sizes = {n: p.numel() for n, p in state.params().items()}
    return {
        "t": state.t,
        "epoch": state.epoch,
        "lrs": state.lrs,
        "skipped_steps": state.skipped_steps,
        "groups": groups,
        "group_sizes": [sum(sizes[n] for n in g["params"]) for g in groups],
        "state_bytes": state.nbytes(),
    }


@dataclass
class Pace:
    """Steps per second of a run in memory, over its recent steps (the runs list's steps/s).

    The times of the last ``keep`` steps are kept; the rate counts those of the last ``window`` seconds from the
    first of them to now, so a run that stops stepping falls towards 0 and is at 0 once ``window`` has passed."""

    window: float = 30.0
    times: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def tick(self, now: float | None = None) -> None:
        self.times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        times = list(self.times)  # one C call: a step thread may append meanwhile (the list is read without the hold)
        recent = [x for x in times if x >= now - self.window]
        if len(recent) < 2 or now <= recent[0]:
            return 0.0
        return (len(recent) - 1) / (now - recent[0])


# a snapshot-only run keeps its steps' history rows in memory until its next snapshot writes them: at most this many
# (~100 bytes each), whatever its snapshot_every
MAX_UNWRITTEN_HISTORY = 100_000


@dataclass
class Live:
    """A run's state in this process, and where its durable history stands.

    ``seq`` counts the events applied (steps, closure evaluations and epoch steps); a run that logs its steps has
    as many in the database. ``closure`` is the step under way of a closure optimizer (LBFGS), waiting for its next
    evaluation. ``stale`` says why the state can no longer be trusted (it ran ahead of the database, or the
    optimizer failed part way): the registry drops such a run when its hold is released, and the next request
    recovers it from the database.
    """

    id: int
    tenant: str
    name: str
    durability: str
    snapshot_every: int
    state: RunState
    seq: int
    last_applied: Applied | None
    last_snapshot_seq: int
    last_snapshot_t: int | None
    rejected_steps: int = 0  # step requests refused since the run was loaded; written with its next record
    closure: ClosureStep | None = None
    # several workers: each rank's last applied gradient (t, digest), and the sync step being gathered
    marks: dict[int, tuple[int, str]] = field(default_factory=dict)
    gather: Gather | None = None
    stale: str | None = None
    state_bytes: int = 0  # as of the last ``measure``
    # a snapshot-only run: the history (t, name, value) of its steps since its last snapshot, written with the next
    unwritten_history: list[tuple[int, str, float | None]] = field(default_factory=list)
    # the recovery time objective (OPTIM_RECOVERY_TARGET_S, 0: off): the seconds one logged event takes to replay
    # (its live step's, or the last recovery's own rate) and reading the newest snapshot took at the last recovery
    recovery_target_s: float = 0.0
    replay_s: float = 0.0
    load_s: float = 0.0
    loaded_at: float = field(default_factory=time.monotonic)
    pace: Pace = field(default_factory=Pace)

    @property
    def key(self) -> RunKey:
        return (self.tenant, self.name)

    @property
    def snapshot_due(self) -> bool:
        """``snapshot_every`` events or more since the last snapshot, or (a run that logs its steps) as many as
        recovery could replay within its target: one more would take reading the snapshot and replaying the log
        past ``recovery_target_s``; or (a snapshot-only run) its history waiting for a snapshot has grown to
        ``MAX_UNWRITTEN_HISTORY`` rows."""
        since = self.seq - self.last_snapshot_seq
        if since >= self.snapshot_every or len(self.unwritten_history) >= MAX_UNWRITTEN_HISTORY:
            return True
        if self.durability != "log" or self.recovery_target_s <= 0 or since == 0:
            return False
        # reading the snapshot counts against the target, but at most half of it: a state too large to load within
        # the target alone would otherwise be snapshotted after every step
        budget = self.recovery_target_s - min(self.load_s, self.recovery_target_s / 2)
        return (since + 1) * self.replay_s > budget

    def note_replay_cost(self, seconds: float) -> None:
        """A logged event took ``seconds`` to apply and log: replaying it costs about as much (a moving average)."""
        self.replay_s = seconds if self.replay_s == 0 else 0.8 * self.replay_s + 0.2 * seconds

    def reset(self, state: RunState, *, seq: int) -> None:
        """``state`` is the run's whole history from now on, as its newest snapshot at ``seq`` (rollback, load)."""
        self.close()
        self.state, self.seq = state, seq
        self.last_applied, self.last_snapshot_seq, self.last_snapshot_t = None, seq, state.t
        self.marks = {}
        self.unwritten_history = []

    def close(self) -> None:
        """The run leaves memory (or its state is replaced): a closure step under way ends (its thread with it); its
        logged evaluations are replayed when the run is loaded again. A sync step being gathered is dropped: its
        ranks' requests are answered 503, and their retries gather it again."""
        if self.closure is not None:
            self.closure.abandon()
            self.closure = None
        if self.gather is not None:
            self.gather.done.set_exception(StorageUnavailable("the run left this server's memory while its step gathered"))
            self.gather = None

    def measure(self) -> int:
        """The bytes of the state's tensors (parameters, optimizer state, averages): an optimizer allocates its
        state at its first step, so this is measured again whenever the run changed."""
        self.state_bytes = self.state.nbytes()
        return self.state_bytes


@dataclass
class RunContext:
    """What the run lifecycle's modules share: settings, the database, the blob store, the steppers, the device,
    and the threads that write the step log beside the optimizer step."""

    settings: Settings
    db: Database
    blobs: BlobStore
    stepper: Stepper
    device: torch.device
    metrics: Metrics = field(default_factory=Metrics)
    log_writers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=16, thread_name_prefix="log"), repr=False
    )

    def close(self) -> None:
        self.log_writers.shutdown(wait=True)
        self.stepper.close()


def position(live: Live) -> dict[str, str]:
    """Where the run stands, for an answer's headers and safetensors metadata: ``t``, ``lr`` (JSON), ``evaluate``
    (the evaluation a closure step under way waits for) and ``hessian`` (JSON of the Hessian request of the next
    Adahessian step)."""
    state = live.state
    out = {"t": str(state.t), "lr": json.dumps(state.lrs)}
    if live.closure is not None and live.closure.waiting_for is not None:
        out["evaluate"] = str(live.closure.waiting_for)
    if "hessian" in state.entry.needs:
        out["hessian"] = json.dumps(state.hessian_request().to_dict())
    return out
