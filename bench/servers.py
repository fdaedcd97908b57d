"""The servers the benchmark measures: real processes (``service.supervisor.ServiceProcess``) on fresh databases,
an SQLite file or a PostgreSQL database of their own, dropped afterwards."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from service.settings import Settings
from service.storage import migrate
from service.supervisor import ServiceProcess

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A database at head for one measurement: a file in ``tmp``, or a PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'optim.db'}"
        migrate(Settings(database_url=url, data_dir=tmp))
        yield url
        return
    name = f"optim_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        migrate(Settings(database_url=url, data_dir=tmp))
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def service(db: str, blob_store: str, **env: str) -> Iterator[ServiceProcess]:
    with tempfile.TemporaryDirectory(prefix="optim-bench-") as tmp, database(db, Path(tmp)) as url:
        settings = {"OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": tmp, "OPTIM_BLOB_STORE": blob_store, **env}
        server = ServiceProcess(env=settings, log=Path(tmp) / "server.log").start()
        try:
            yield server
        finally:
            server.stop()
