"""Every SQL statement of a run's per-step history (``GET /runs/{run}/history``), bound to a unit of work's session
(``Repository.series``).

Two tables: ``history_value`` holds one row per (step, name); ``history_block`` the aggregates (min, max, sum of
the finite values, how many values, how many finite) of each name over each block of ``BLOCK`` steps, written
in the same transaction as the block's last step. A downsampled read takes whole blocks from ``history_block``
and only the steps at the edges (a block not complete yet, a range that starts or stops inside a block) from
``history_value``, so it reads ~names x steps / ``BLOCK`` rows whatever the run's length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, func, insert, literal, or_, select
from sqlalchemy.orm import Session

from .models import HistoryBlock, HistoryValue

BLOCK = 100  # steps per aggregated block
# (name, bucket index, min, max, sum, count, finite) of one name over one bucket
Aggregate = tuple[str, int, float | None, float | None, float | None, int, int]


class SeriesRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, run_id: int, rows: Sequence[tuple[int, str, float | None]]) -> None:
        """Record values ``(t, name, value)`` (None: not finite); a block whose last step is among them is
        aggregated."""
        if not rows:
            return
        self.session.execute(insert(HistoryValue), [{"run_id": run_id, "t": t, "name": n, "value": v} for t, n, v in rows])
        for block_t in sorted({t - t % BLOCK for t, _, _ in rows if t % BLOCK == BLOCK - 1}):
            self._aggregate(run_id, block_t)

    def _aggregate(self, run_id: int, block_t: int) -> None:
        self.session.execute(delete(HistoryBlock).where(HistoryBlock.run_id == run_id, HistoryBlock.block_t == block_t))
        v = HistoryValue.value
        rows = (
            select(
                HistoryValue.run_id,
                literal(block_t),
                HistoryValue.name,
                func.min(v),
                func.max(v),
                func.sum(v),
                func.count(),
                func.count(v),
            )
            .where(HistoryValue.run_id == run_id, HistoryValue.t >= block_t, HistoryValue.t < block_t + BLOCK)
            .group_by(HistoryValue.run_id, HistoryValue.name)
        )
        columns = ["run_id", "block_t", "name", "min", "max", "sum", "count", "finite"]
        self.session.execute(insert(HistoryBlock).from_select(columns, rows))

    def forget_from(self, run_id: int, t: int) -> None:
        """The history of steps ``t`` and later goes (a rollback's dropped future), with the blocks holding any."""
        self.session.execute(delete(HistoryValue).where(HistoryValue.run_id == run_id, HistoryValue.t >= t))
        self.session.execute(delete(HistoryBlock).where(HistoryBlock.run_id == run_id, HistoryBlock.block_t > t - BLOCK))

    def blocks_end(self, run_id: int) -> int:
        """The step after the run's last aggregated block (0 when none is)."""
        last = self.session.execute(select(func.max(HistoryBlock.block_t)).where(HistoryBlock.run_id == run_id)).scalar()
        return 0 if last is None else int(last) + BLOCK

    def last_values(self, run_id: int, name: str, count: int) -> list[tuple[int, float | None]]:
        """The last ``count`` (t, value) of one name, newest first."""
        rows = self.session.execute(
            select(HistoryValue.t, HistoryValue.value)
            .where(HistoryValue.run_id == run_id, HistoryValue.name == name)
            .order_by(HistoryValue.t.desc())
            .limit(count)
        ).all()
        return [(int(t), v) for t, v in rows]

    def from_values(
        self, run_id: int, ranges: Iterable[tuple[int, int]], bucket: int, names: Sequence[str] | None
    ) -> list[Aggregate]:
        """Aggregates over buckets ``t // bucket`` of the values of steps in ``ranges`` ([start, stop) each)."""
        spans = [and_(HistoryValue.t >= a, HistoryValue.t < b) for a, b in ranges if a < b]
        if not spans:
            return []
        v, k = HistoryValue.value, (HistoryValue.t // bucket) if bucket > 1 else HistoryValue.t
        q = select(HistoryValue.name, k, func.min(v), func.max(v), func.sum(v), func.count(), func.count(v)).where(
            HistoryValue.run_id == run_id, or_(*spans)
        )
        if names is not None:
            q = q.where(HistoryValue.name.in_(names))
        return _rows(self.session.execute(q.group_by(HistoryValue.name, k)).all())

    def from_blocks(self, run_id: int, start: int, stop: int, bucket: int, names: Sequence[str] | None) -> list[Aggregate]:
        """Aggregates over buckets ``t // bucket`` (a multiple of ``BLOCK``) of the blocks that start in [start, stop)."""
        b = HistoryBlock
        where = [b.run_id == run_id, b.block_t >= start, b.block_t < stop]
        if names is not None:
            where.append(b.name.in_(names))
        if bucket == BLOCK:  # a bucket is a block: its rows as they are, in the key's order
            plain = select(b.name, b.block_t // BLOCK, b.min, b.max, b.sum, b.count, b.finite).where(*where)
            return _rows(self.session.execute(plain.order_by(b.name, b.block_t)).all())
        k = b.block_t // bucket
        q = select(b.name, k, func.min(b.min), func.max(b.max), func.sum(b.sum), func.sum(b.count), func.sum(b.finite))
        return _rows(self.session.execute(q.where(*where).group_by(b.name, k)).all())


def _rows(rows: Sequence[Any]) -> list[Aggregate]:
    return [(str(n), int(k), lo, hi, total, int(count), int(finite)) for n, k, lo, hi, total, count, finite in rows]
