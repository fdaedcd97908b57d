"""The database: engines, the unit of work every statement runs in, and the schema gate at start-up.

``Database.read(what)`` and ``Database.write(what)`` are the only ways into a transaction. Each yields a
``Repository`` bound to a session of its own, commits (``write``) or ends (``read``) it, and is the one place
where a storage error becomes ``StorageUnavailable`` (503, ``Retry-After``): ``what`` says what the service was
doing, for the message. On SQLite a read is a deferred transaction (no lock until it reads, and in WAL mode
never one that blocks a writer); only ``write`` takes the write lock up front (``BEGIN IMMEDIATE``), so that a
writer waits for the lock at its start instead of failing to upgrade a read lock part way.

Alembic owns the schema. Serving an empty database creates it (as MLflow's default store does); a database
at an older revision is refused with the command that upgrades it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StorageUnavailable
from ..settings import Settings
from .repository import Repository

log = logging.getLogger("optim_service")

ROOT = Path(__file__).resolve().parents[2]
# SQLite pages: at 4 KiB (its default) 40 MB of 16 MiB blob chunks took 130-175 ms to commit, at 64 KiB
# 52-55 ms (../shared/PERF-NOTES.md); the WAL's auto-checkpoint (1000 pages) also comes 16x less often
SQLITE_PAGE_SIZE = 65536
_WRITES = "optim_writes"  # the execution option that marks a write transaction (BEGIN IMMEDIATE on SQLite)


class Duplicate(Exception):
    """A write that a unique constraint refused (a run or checkpoint name taken meanwhile)."""


class SchemaNotAtHead(RuntimeError):
    pass


def make_engine(settings: Settings) -> Engine:
    if settings.is_sqlite:
        path = settings.database_url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        timeout = settings.database_timeout_s
        engine = create_engine(settings.database_url, connect_args={"check_same_thread": False, "timeout": timeout})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is off: transactions begin in _begin (below)
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only takes effect on a new file (see migrate)
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged step survives power loss, not just a crash
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITES) else "BEGIN")

        return engine
    return create_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        connect_args={"connect_timeout": max(1, int(settings.database_timeout_s))},
    )


class Database:
    """The unit of work: ``with db.write("creating the run") as repo: ...``."""

    def __init__(self, engine: Engine, on_error: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._on_error = on_error  # counted in /metrics (optim_storage_errors_total)
        self._readers = sessionmaker(engine, expire_on_commit=False)
        self._writers = sessionmaker(engine, expire_on_commit=False, execution_options={_WRITES: True})

    @contextlib.contextmanager
    def read(self, what: str) -> Iterator[Repository]:
        with self._unit(self._readers, what) as session:
            yield Repository(session)

    @contextlib.contextmanager
    def write(self, what: str) -> Iterator[Repository]:
        """Commits when the block ends, rolls back when it raises; a unique constraint's refusal is ``Duplicate``."""
        with self._unit(self._writers, what) as session, session.begin():
            yield Repository(session)

    @contextlib.contextmanager
    def _unit(self, sessions: sessionmaker[Session], what: str) -> Iterator[Session]:
        try:
            with sessions() as session:
                yield session
        except IntegrityError as exc:
            raise Duplicate(str(exc.orig)) from exc
        except SQLAlchemyError as exc:
            if self._on_error is not None:
                self._on_error()
            raise unavailable(exc, what) from exc

    def close(self) -> None:
        self.engine.dispose()


def unavailable(exc: BaseException, what: str) -> StorageUnavailable:
    log.warning("storage failure while %s: %s", what, exc)
    return StorageUnavailable(f"the database is unavailable while {what}; nothing was changed, retry: {exc.__class__.__name__}")


# ---------------------------------------------------------------------------------------------- the schema
def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def schema_status(engine: Engine, database_url: str) -> tuple[str | None, str | None]:
    """(current revision of the database, head revision of the code)."""
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


def migrate(settings: Settings, revision: str = "head") -> tuple[int, int] | None:
    """Upgrade the database to ``revision``; on SQLite, rebuild a file made with smaller pages (see
    ``upgrade_sqlite_pages``). (old, new) page sizes when the file was rebuilt, else None."""
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        make_engine(settings).dispose()  # the first connection sets the page size, before any table exists
    command.upgrade(alembic_config(settings.database_url), revision)
    if not settings.is_sqlite:
        return None
    engine = make_engine(settings)
    try:
        return upgrade_sqlite_pages(engine)
    finally:
        engine.dispose()


def require_schema(engine: Engine, settings: Settings) -> None:
    """At start-up: an empty database gets the schema; one at another revision than the code's is refused."""
    current, head = schema_status(engine, settings.database_url)
    if current is None and not set(inspect(engine).get_table_names()) - {"alembic_version"}:
        log.info("the database is empty: creating its schema (%s)", head)
        migrate(settings)
        current, head = schema_status(engine, settings.database_url)
    if current != head:
        raise SchemaNotAtHead(
            f"the database schema is at {current or 'nothing'}, this code needs {head}: "
            f"run `OPTIM_DATABASE_URL={_shown(settings.database_url)} optim-service migrate` first"
        )


def _shown(url: str) -> str:
    """The URL without its password, as a command line may show it."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def upgrade_sqlite_pages(engine: Engine) -> tuple[int, int] | None:
    """Rebuild an SQLite file made with smaller pages (by an earlier version) with ``SQLITE_PAGE_SIZE``:
    ``VACUUM`` outside WAL mode, which needs the file's size again on disk for a while. (old, new) when
    it was rebuilt, else None."""
    conn = engine.raw_connection()  # the DB-API connection: these pragmas and VACUUM run outside any transaction
    try:
        cur = conn.cursor()
        (old,) = cur.execute("PRAGMA page_size").fetchone()
        if old == SQLITE_PAGE_SIZE:
            return None
        cur.execute("PRAGMA journal_mode=DELETE")
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        cur.execute("VACUUM")
        cur.execute("PRAGMA journal_mode=WAL")
        (new,) = cur.execute("PRAGMA page_size").fetchone()
        return old, new
    finally:
        conn.close()
