"""Several workers on one run (data parallel): how they are declared, and how their gradients become one.

``WorkersSpec`` is the spec's ``workers``: ``world_size`` ranks, stepping in ``sync`` (one step of the ranks'
mean gradient, once every rank, or a ``quorum`` of them after ``straggler_timeout_s``, has sent step ``t``) or
``async`` mode (each gradient applied as it arrives, if computed at most ``max_staleness`` steps ago).

``RankOrderedMean`` reduces a sync step's gradients the same way whatever order they arrive in: in rank order,
``g = g[r0].clone(); g.add_(g[r]) for the others; g.div_(n)``, in the parameter's dtype. It adds each gradient
as soon as every lower rank that will contribute has been added (the longest prefix of ranks), and holds the
others until then: never more than ``world_size`` gradients in memory, and usually one sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import GradientError, SpecError
from .spec_values import integer, number, require_keys

MODES = ("sync", "async")


@dataclass(frozen=True)
class WorkersSpec:
    world_size: int
    mode: str = "sync"
    quorum: int | None = None  # sync: ranks enough to step once the straggler timeout has passed (default: all)
    straggler_timeout_s: float = 30.0
    max_staleness: int = 4  # async: steps a gradient may lag the run

    @property
    def needed(self) -> int:
        """Ranks a sync step waits for once the straggler timeout has passed."""
        return self.quorum if self.quorum is not None else self.world_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> WorkersSpec | None:
        if data is None:
            return None
        require_keys("workers", data, {"world_size", "mode", "quorum", "straggler_timeout_s", "max_staleness"}, {"world_size"})
        world_size = integer("workers.world_size", data["world_size"], minimum=1)
        mode = data.get("mode", "sync")
        if mode not in MODES:
            raise SpecError(f"workers.mode must be 'sync' or 'async', got {mode!r}")
        quorum = data.get("quorum")
        if quorum is not None:
            quorum = integer("workers.quorum", quorum, minimum=1)
            if quorum > world_size:
                raise SpecError(f"workers.quorum must be at most world_size={world_size}, got {quorum}")
            if mode == "async":
                raise SpecError("workers.quorum is for sync mode: in async mode each gradient is a step of its own")
        if "max_staleness" in data and mode == "sync":
            raise SpecError("workers.max_staleness is for async mode: in sync mode every rank sends the run's t")
        timeout = number("workers.straggler_timeout_s", data.get("straggler_timeout_s", 30.0), minimum=0.0)
        if timeout > 86_400:
            raise SpecError(f"workers.straggler_timeout_s must be at most a day (86400), got {timeout!r}")
        return cls(
            world_size=world_size,
            mode=mode,
            quorum=quorum,
            straggler_timeout_s=float(timeout),
            max_staleness=integer("workers.max_staleness", data.get("max_staleness", 4)),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"world_size": self.world_size, "mode": self.mode}
        if self.mode == "sync":
            out.update(quorum=self.needed, straggler_timeout_s=self.straggler_timeout_s)
        else:
            out["max_staleness"] = self.max_staleness
        return out


class RankOrderedMean:
    """The mean of a sync step's gradients, summed in rank order as they arrive (see the module's docstring).

    ``add(rank, grads)`` takes one rank's checked gradients (in the parameters' dtypes; the first becomes the sum:
    they are the caller's to give, copies of what arrived); ``close(contributors)``, once it is known which ranks
    contribute, adds those still held and divides by their number. A name some contributors lack is summed over
    those that have it (and divided by all of them: a missing gradient counts as zero); a name none of them has
    stays without a gradient."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._sum: dict[str, torch.Tensor] = {}
        self._held: dict[int, Mapping[str, torch.Tensor]] = {}
        self._added: list[int] = []  # ranks in the sum, in order
        self._next = 0  # the lowest rank not yet added nor known to be absent

    @property
    def ranks(self) -> list[int]:
        return sorted([*self._added, *self._held])

    def add(self, rank: int, grads: Mapping[str, torch.Tensor]) -> None:
        if rank in self._held or rank in self._added:
            raise GradientError(f"rank {rank} already contributed to this step")
        self._held[rank] = grads
        self._absorb()

    def _absorb(self) -> None:
        while self._next in self._held:
            self._accumulate(self._next, self._held.pop(self._next))
            self._next += 1

    def _accumulate(self, rank: int, grads: Mapping[str, torch.Tensor]) -> None:
        for name, g in grads.items():
            if name in self._sum:
                self._sum[name].add_(g)
            else:  # the first rank with this gradient: it is the sum (the contract's clone, without a copy)
                self._sum[name] = g
        self._added.append(rank)

    def close(self, contributors: Iterable[int]) -> dict[str, torch.Tensor]:
        """The mean over ``contributors`` (all of them added or held): ranks that will not come are skipped."""
        chosen = sorted(contributors)
        missing = [r for r in chosen if r not in self._held and r not in self._added]
        if missing or not chosen:
            raise GradientError(f"cannot close the step: ranks {missing} have not contributed")
        if any(r not in chosen for r in self._added):
            raise GradientError("a rank already summed is not among the contributors")
        for rank in chosen:  # the rest in rank order, past the ranks that will not come
            if rank in self._held:
                self._accumulate(rank, self._held.pop(rank))
        self._held.clear()
        n = len(chosen)
        return {name: s.div_(n) for name, s in self._sum.items()}
