"""Every SQL statement of the service, as methods of one ``Repository`` bound to a unit of work's session
(``Database.read`` / ``Database.write``). Methods ``flush`` what they add; the unit of work commits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import CompoundSelect, delete, func, insert, select, union, update
from sqlalchemy.orm import Session

from .models import ApiKey, BlobChunk, Checkpoint, Event, Run, Snapshot, StepRecord
from .series import SeriesRepository


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.series = SeriesRepository(session)  # the per-step history's statements (storage/series.py)

    # ------------------------------------------------------------------ runs
    def run(self, tenant: str, name: str) -> Run | None:
        return self.session.execute(select(Run).where(Run.tenant == tenant, Run.name == name)).scalar_one_or_none()

    def run_by_id(self, run_id: int) -> Run | None:
        return self.session.get(Run, run_id)

    def runs(self, tenant: str) -> Sequence[Run]:
        return self.session.execute(select(Run).where(Run.tenant == tenant).order_by(Run.id)).scalars().all()

    def count_runs(self, tenant: str) -> int:
        return int(self.session.execute(select(func.count()).select_from(Run).where(Run.tenant == tenant)).scalar_one())

    def add_run(self, **fields: Any) -> Run:
        run = Run(**fields)
        self.session.add(run)
        self.session.flush()
        return run

    def update_run(self, run_id: int, **values: Any) -> None:
        self.session.execute(update(Run).where(Run.id == run_id).values(**values, updated_at=datetime.now(UTC)))

    def delete_run(self, run_id: int) -> None:
        # events, snapshots, checkpoints and the history go with it (ON DELETE CASCADE)
        self.session.execute(delete(Run).where(Run.id == run_id))

    # ------------------------------------------------------------------ the log
    def add_event(self, run_id: int, **fields: Any) -> None:
        self.session.execute(insert(Event).values(run_id=run_id, **fields))

    def events_after(self, run_id: int, seq: int) -> Sequence[Event]:
        return (
            self.session.execute(select(Event).where(Event.run_id == run_id, Event.seq > seq).order_by(Event.seq)).scalars().all()
        )

    def last_gradient(self, run_id: int) -> tuple[int, int | None, str] | None:
        """(t, k, digest) of the run's last logged gradient (a step, or an evaluation of a closure step)."""
        row = self.session.execute(
            select(Event.t, Event.k, Event.grad_digest)
            .where(Event.run_id == run_id, Event.kind.in_(("step", "eval")))
            .order_by(Event.seq.desc())
            .limit(1)
        ).one_or_none()
        if row is None or row[2] is None:
            return None
        t, k, digest = row
        return (int(t), k, str(digest))

    def prune_events_before(self, run_id: int, seq: int) -> list[str]:
        """Delete the events before ``seq``; the blob keys they held."""
        keys = self.session.execute(
            select(Event.blob_key).where(Event.run_id == run_id, Event.seq < seq, Event.blob_key.is_not(None))
        ).scalars()
        dropped = [k for k in keys if k]
        self.session.execute(delete(Event).where(Event.run_id == run_id, Event.seq < seq))
        return dropped

    # ------------------------------------------------------------------ the record of applied steps
    def add_step_record(self, run_id: int, **fields: Any) -> None:
        self.session.execute(insert(StepRecord).values(run_id=run_id, **fields))

    def step_records(self, run_id: int, start: int, stop: int | None, limit: int) -> Sequence[StepRecord]:
        q = select(StepRecord).where(StepRecord.run_id == run_id, StepRecord.t >= start)
        if stop is not None:
            q = q.where(StepRecord.t < stop)
        return self.session.execute(q.order_by(StepRecord.t).limit(limit)).scalars().all()

    def forget_steps_from(self, run_id: int, t: int) -> None:
        """The records of steps ``t`` and later (a rollback's dropped future)."""
        self.session.execute(delete(StepRecord).where(StepRecord.run_id == run_id, StepRecord.t >= t))

    # ------------------------------------------------------------------ snapshots
    def newest_snapshot(self, run_id: int) -> Snapshot | None:
        return self.session.execute(
            select(Snapshot).where(Snapshot.run_id == run_id).order_by(Snapshot.seq.desc()).limit(1)
        ).scalar_one_or_none()

    def add_snapshot(self, run_id: int, **fields: Any) -> None:
        self.session.execute(insert(Snapshot).values(run_id=run_id, **fields))

    def prune_snapshots_before(self, run_id: int, seq: int) -> list[str]:
        keys = list(
            self.session.execute(select(Snapshot.blob_key).where(Snapshot.run_id == run_id, Snapshot.seq < seq)).scalars()
        )
        self.session.execute(delete(Snapshot).where(Snapshot.run_id == run_id, Snapshot.seq < seq))
        return keys

    def clear_history(self, run_id: int) -> list[str]:
        """Delete the run's log and snapshots (checkpoints stay); the blob keys they held."""
        keys = [k for k in self.session.execute(select(Event.blob_key).where(Event.run_id == run_id)).scalars() if k]
        keys += self.session.execute(select(Snapshot.blob_key).where(Snapshot.run_id == run_id)).scalars().all()
        self.session.execute(delete(Event).where(Event.run_id == run_id))
        self.session.execute(delete(Snapshot).where(Snapshot.run_id == run_id))
        return keys

    # ------------------------------------------------------------------ checkpoints
    def add_checkpoint(self, run_id: int, **fields: Any) -> Checkpoint:
        ckpt = Checkpoint(run_id=run_id, **fields)
        self.session.add(ckpt)
        self.session.flush()
        return ckpt

    def checkpoints(self, run_id: int) -> Sequence[Checkpoint]:
        return self.session.execute(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.id)).scalars().all()

    def checkpoint(self, run_id: int, name: str) -> Checkpoint | None:
        return self.session.execute(
            select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.name == name)
        ).scalar_one_or_none()

    def delete_checkpoint(self, checkpoint_id: int) -> None:
        self.session.execute(delete(Checkpoint).where(Checkpoint.id == checkpoint_id))

    # ------------------------------------------------------------------ blob keys
    def blob_keys_of_run(self, run_id: int) -> list[str]:
        q: CompoundSelect[Any] = union(
            select(Event.blob_key).where(Event.run_id == run_id, Event.blob_key.is_not(None)),
            select(Snapshot.blob_key).where(Snapshot.run_id == run_id),
            select(Checkpoint.blob_key).where(Checkpoint.run_id == run_id),
        )
        return [k for k in self.session.execute(q).scalars() if k]

    def referenced_keys(self) -> set[str]:
        q: CompoundSelect[Any] = union(
            select(Event.blob_key).where(Event.blob_key.is_not(None)),
            select(Snapshot.blob_key),
            select(Checkpoint.blob_key),
        )
        return {k for k in self.session.execute(q).scalars() if k}

    # ------------------------------------------------------------------ the database blob store's rows
    def insert_chunk(self, key: str, part: int, data: bytes | memoryview) -> None:
        # executed now, not at a flush: the caller reuses the row's buffer for the next row
        self.session.execute(insert(BlobChunk), [{"blob_key": key, "part": part, "data": data}])

    def chunk_sizes(self, key: str) -> list[tuple[int, int]]:
        """(part, bytes) of each of the blob's rows, in order (length() reads no blob data)."""
        rows = self.session.execute(
            select(BlobChunk.part, func.length(BlobChunk.data)).where(BlobChunk.blob_key == key).order_by(BlobChunk.part)
        ).all()
        return [(part, n) for part, n in rows]

    def chunk(self, key: str, part: int) -> bytes | None:
        return self.session.execute(
            select(BlobChunk.data).where(BlobChunk.blob_key == key, BlobChunk.part == part)
        ).scalar_one_or_none()

    def delete_chunks(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self.session.execute(delete(BlobChunk).where(BlobChunk.blob_key.in_(keys)))

    def any_chunk(self) -> bool:
        return self.session.execute(select(BlobChunk.blob_key).limit(1)).first() is not None

    def chunk_keys(self) -> set[str]:
        return set(self.session.execute(select(BlobChunk.blob_key).distinct()).scalars())

    # ------------------------------------------------------------------ API keys
    def add_api_key(self, *, tenant: str, key_hash: str, prefix: str) -> None:
        self.session.add(ApiKey(tenant=tenant, key_hash=key_hash, prefix=prefix))
        self.session.flush()

    def tenant_for_key(self, key_hash: str) -> str | None:
        return self.session.execute(
            select(ApiKey.tenant).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        ).scalar_one_or_none()

    def revoke_api_keys(self, prefix: str) -> int:
        result = self.session.execute(
            update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    def api_keys(self) -> Sequence[ApiKey]:
        return self.session.execute(select(ApiKey).order_by(ApiKey.id)).scalars().all()
