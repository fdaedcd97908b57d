"""What a step of a run answers: the run's new position and the LR of each param group."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepResult:
    t: int
    lrs: list[float | None]  # None: a group without one LR (RunState.lr_notes says why)
    skipped: bool = False
    norms: dict[str, float] = field(default_factory=dict)  # optim_core.norms.measured, as ``apply(measure=)`` asked
