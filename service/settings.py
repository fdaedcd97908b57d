"""All of the service's settings, in one place: environment variables with the ``OPTIM_`` prefix."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPTIM_", extra="forbid", frozen=True)

    database_url: str = Field(
        default="sqlite:///./data/optim.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    database_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="How long a request waits for the database (SQLite's write lock, a PostgreSQL connection) before "
        "it is answered 503 with Retry-After.",
    )
    data_dir: Path = Field(default=Path("./data"), description="Where the directory blob store and the SQLite file live.")
    blob_store: Literal["auto", "database", "directory"] = Field(
        default="auto",
        description="Where tensors (step log, snapshots, checkpoints) are kept: fsync'd files under OPTIM_DATA_DIR/blobs "
        "(directory), rows of the database (database), or auto: files beside a SQLite database (unless it already "
        "holds database blobs), rows of a PostgreSQL one (servers sharing it need share no filesystem).",
    )
    # SQLite copies a row twice while it inserts it (the bound blob and the record it builds), so the row size is
    # paid three times over in memory during every log write; 4 MiB rows wrote as fast as 16 MiB ones here and took
    # the server's peak over steady steps of a 10M AdamW run (with one snapshot) from 3.2-3.3x to 2.6-2.8x the state
    blob_chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, description="Row size of the database blob store.")
    blob_spare_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Directory blob store: bytes of unreferenced files kept to be rewritten by new blobs of their size.",
    )
    max_body_bytes: int = Field(default=2 * 1024**3, ge=1024, description="Largest request body accepted (413 beyond).")
    default_snapshot_every: int = Field(default=100, ge=1, description="Snapshot interval of runs that do not set one.")
    recovery_target_s: float = Field(
        default=2.0,
        ge=0,
        description="Recovery time objective of runs that log their steps: a snapshot is taken whenever reading the "
        "newest one and replaying the log since would take longer (at the replay rate measured), even before "
        "snapshot_every steps; 0 leaves snapshots to snapshot_every alone.",
    )
    restart_after_crash: bool = Field(
        default=True,
        description="serve from a process forked by a parent that holds the imports and the port, and fork a new one "
        "at once when it is killed (OOM killer, segfault, kill -9), instead of a cold start of several seconds; false: "
        "the server is one process, and whatever supervises it restarts it.",
    )
    max_runs: int = Field(default=10_000, ge=1, description="Most runs a tenant may keep.")
    auth: Literal["auto", "required"] = Field(
        default="auto", description="auto: API keys required unless the server listens on loopback only."
    )
    max_tensors: int = Field(default=100_000, ge=1, description="Most parameter tensors a run may have.")
    max_live_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Bytes of run state kept in memory: past it the least recently used idle runs are dropped (their "
        "state is durable) and loaded again when next asked for. Default: half of the device's memory.",
    )
    device: str | None = Field(default=None, description="Torch device to step on; default CUDA when present, else CPU.")
    steppers: int = Field(
        default=1, ge=1, le=256, description="Threads the optimizer steps run on (each with a team of OPTIM_STEP_THREADS)."
    )
    step_threads: int = Field(
        default=0, ge=0, le=4096, description="OpenMP threads of each stepper; 0: every core the process may run on."
    )
    history_norms: Literal["all", "cheap", "off"] = Field(
        default="cheap",
        description="Norms each step's history records: all (gradient, update and parameter norms), cheap (no update "
        "norm: it needs a copy of the parameters before the step) or off. README: what each costs.",
    )
    metrics_per_run: bool = Field(
        default=False,
        description="Label /metrics' step counters with the run's name too (one series per run: for a few runs only).",
    )
    metrics_require_key: bool | None = Field(
        default=None,
        description="GET /metrics needs Authorization: Bearer <an API key> (true) or not (false); default: when the "
        "server requires API keys (it shows every tenant's name and counts).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="The logs' level.")
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object a line (a request, a background event); text: for a terminal."
    )
    tune_allocator: bool = Field(
        default=True, description="Keep large blocks in glibc's heap (mallopt) so each step reuses warm memory."
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "postgresql+psycopg://", "postgresql://")):
            raise ValueError(f"OPTIM_DATABASE_URL must be sqlite:///... or postgresql+psycopg://..., got {url!r}")
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return url

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | None) -> str | None:
        if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"OPTIM_DEVICE must be cpu or cuda[:N], got {device!r}")
        return device

    @cached_property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @cached_property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"
