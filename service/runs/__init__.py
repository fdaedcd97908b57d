"""The run lifecycle: runs in memory and their durable history.

- ``registry``: the one seam to a run's live state (load, lock, budget);
- ``lifecycle``: create, describe, list, delete;
- ``stepping``: the exactly-once step; ``journal``: its durable record;
- ``snapshots``: the full state now and then; ``recovery``: the state again from the database;
- ``history``: checkpoints, rollback, load, fork.
"""

from .live import Live, RunContext
from .registry import RunRegistry
from .snapshots import Snapshots

__all__ = ["Live", "RunContext", "RunRegistry", "Snapshots"]
