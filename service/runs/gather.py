"""A sync step of a data-parallel run while its ranks arrive: who sent what (``Gather``, held by the run's ``Live``),
the request that waits for it (``Pending``) and the one answer every contributing rank gets (``Answer``).
``runs/workers.py`` fills and applies it."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from optim_core import StepResult
from optim_core.workers import RankOrderedMean, WorkersSpec


@dataclass(frozen=True)
class Sent:
    """A step's sender as its request says: rank and world size (None for a one-worker run)."""

    rank: int | None = None
    world_size: int | None = None


@dataclass(frozen=True)
class Answer:
    """A sync step's answer, the same for every contributing rank: the parameters after it, encoded once."""

    result: StepResult
    position: dict[str, str]
    body: memoryview


@dataclass
class Gather:
    """The gradients of sync step ``t`` so far."""

    t: int
    workers: WorkersSpec
    started: float = field(default_factory=time.monotonic)
    mean: RankOrderedMean = field(init=False)
    digests: dict[int, str] = field(default_factory=dict)
    received: dict[int, float] = field(default_factory=dict)  # seconds since the epoch
    losses: dict[int, float] = field(default_factory=dict)
    scalars: dict[int, dict[str, float]] = field(default_factory=dict)  # each rank's Optim-Scalars
    done: Future[Answer] = field(default_factory=Future)

    def __post_init__(self) -> None:
        self.mean = RankOrderedMean(self.workers.world_size)

    @property
    def deadline(self) -> float:
        return self.started + self.workers.straggler_timeout_s

    def ready(self) -> bool:
        """Every rank has sent, or enough have and the stragglers' time is up."""
        have = len(self.digests)
        return have == self.workers.world_size or (have >= self.workers.needed and time.monotonic() >= self.deadline)


@dataclass(frozen=True)
class Pending:
    """A request waiting for its sync step (see ``wait``)."""

    gather: Gather
    rank: int
