"""Engines and sessions, and the schema check that gates start-up (Alembic owns the schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from .settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# SQLite pages: at 4 KiB (its default) 40 MB of 16 MiB blob chunks took 130-175 ms to commit, at 64 KiB
# 52-55 ms (../shared/PERF-NOTES.md); the WAL's auto-checkpoint (1000 pages) also comes 16x less often
SQLITE_PAGE_SIZE = 65536


def make_engine(settings: Settings) -> Engine:
    if settings.is_sqlite:
        path = settings.database_url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(settings.database_url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is off: we BEGIN IMMEDIATE ourselves (below), so a
            # writer waits for the lock up front instead of failing to upgrade a read lock later.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only takes effect on a new file (see migrate)
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged step survives power loss, not just a crash
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(settings.database_url, pool_pre_ping=True, pool_size=10, max_overflow=10)


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


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


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
