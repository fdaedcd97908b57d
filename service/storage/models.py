"""The database: SQLAlchemy 2 models. Tables are singular snake_case; constraints are named by convention."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """A training run's optimizer side. ``seq`` counts the durable events (steps, epoch steps).

    Beside the spec and the position, the row holds what the API tells of a run (LRs, groups, counts, the last
    snapshot, the state's size), written with every step record and snapshot, so that listing and describing
    runs reads this table alone and loads no tensors."""

    __tablename__ = "run"
    __table_args__ = (UniqueConstraint("tenant", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict] = mapped_column(JSON)
    spec_digest: Mapped[str] = mapped_column(String(64))
    durability: Mapped[str] = mapped_column(String(16))
    snapshot_every: Mapped[int] = mapped_column(Integer)
    t: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    # LR per group (null where the optimizer has none: timm's relative-step Adafactor); null until first described
    lrs: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # the optimizer's param groups: parameter names and options, as of the last snapshot
    groups: Mapped[list | None] = mapped_column(JSON, nullable=True)
    group_sizes: Mapped[list | None] = mapped_column(JSON, nullable=True)  # elements per group
    skipped_steps: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rejected_steps: Mapped[int] = mapped_column(BigInteger, server_default="0")
    last_snapshot_t: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_snapshot_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    state_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")  # parameters, optimizer state, averages
    # several workers: each rank's last gradient applied, {rank: [t, digest]} (exactly once per rank and t)
    worker_marks: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=func.now())


class Event(Base):
    """The log: every acknowledged step (its gradient payload as received), closure evaluation and epoch step, in
    order."""

    __tablename__ = "event"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(8))  # "step" | "eval" (an evaluation of a closure step) | "epoch"
    t: Mapped[int] = mapped_column(BigInteger)  # the run's t before the event
    k: Mapped[int | None] = mapped_column(Integer, nullable=True)  # which evaluation of step t ("eval")
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # loss (step) or metric (epoch)
    grad_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    checksum: Mapped[str] = mapped_column(String(64))  # of the parameters after the event
    blob_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StepRecord(Base):
    """An applied step, kept for good (the log before a snapshot is pruned): who contributed, who was dropped, when."""

    __tablename__ = "step_record"
    __table_args__ = (UniqueConstraint("run_id", "t"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    t: Mapped[int] = mapped_column(BigInteger)  # the step's t: the run's t before it
    contributors: Mapped[list] = mapped_column(JSON)  # the ranks whose gradients made the step
    dropped: Mapped[list] = mapped_column(JSON)  # sync: the ranks the step did not wait for
    base_t: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # async: the t each gradient was computed at
    received: Mapped[dict] = mapped_column(JSON)  # {rank: seconds since the epoch its gradient arrived}
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HistoryValue(Base):
    """One value of an applied step's history (``GET /runs/{run}/history``): its loss, an LR, a norm, its latency,
    its wall time or a worker's scalar, by name; null when it was not finite (a skipped step's gradient norm)."""

    __tablename__ = "history_value"

    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), primary_key=True)
    t: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # the step's t: the run's t before it
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)


class HistoryBlock(Base):
    """The values of one name over a block of ``storage.series.BLOCK`` steps, aggregated when the block's last step
    is recorded, so a long run's history is downsampled from these rows instead of every step's."""

    __tablename__ = "history_block"

    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), primary_key=True)
    # by name, then step: a name's blocks are read in order, without a sort
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    block_t: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # the block's first step
    min: Mapped[float | None] = mapped_column(Float, nullable=True)  # of the finite values
    max: Mapped[float | None] = mapped_column(Float, nullable=True)
    sum: Mapped[float | None] = mapped_column(Float, nullable=True)
    count: Mapped[int] = mapped_column(Integer)  # values recorded
    finite: Mapped[int] = mapped_column(Integer)  # of which finite


class Snapshot(Base):
    """A full RunState after ``seq`` events: the base that recovery replays the log onto."""

    __tablename__ = "snapshot"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    t: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Checkpoint(Base):
    """A named snapshot the user asked for; kept until deleted."""

    __tablename__ = "checkpoint"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    t: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BlobChunk(Base):
    """The database blob store: a blob is its chunks of bounded size, in order."""

    __tablename__ = "blob_chunk"

    blob_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ApiKey(Base):
    """An API key, stored as its SHA-256 (keys are 256 random bits: a fast hash is enough); shown once."""

    __tablename__ = "api_key"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
