"""The run lifecycle: runs in memory and their durable history.

- ``registry``: the one seam to a run's live state (load, lock, budget);
- ``lifecycle``: create, describe, list, delete;
- ``stepping``: the exactly-once step; ``journal``: its durable record;
- ``snapshots``: the full state now and then; ``recovery``: the state again from the database;
- ``history``: checkpoints, rollback, load, fork;
- ``series``: the per-step history (loss, LRs, norms, scalars) and its downsampled read;
- ``workers``: several workers on a run: sync gathers, async staleness, exactly once per (rank, t).
"""

from .live import Live, RunContext
from .registry import Later, RunRegistry
from .snapshots import Snapshots

__all__ = ["Later", "Live", "RunContext", "RunRegistry", "Snapshots"]
