"""A real optim-service process on 127.0.0.1, on a fresh SQLite file or PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.settings import Settings
from service.storage import migrate as upgrade
from service.supervisor import ServiceProcess, free_port

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg_reachable() -> tuple[bool, str]:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True, ""
    except psycopg.Error as exc:
        return False, f"PostgreSQL is not reachable at 127.0.0.1:5432 ({exc.__class__.__name__}); its tests cannot run here"


PG_AVAILABLE, PG_REASON = _pg_reachable()
DATABASES = [
    "sqlite",
    pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.skipif(not PG_AVAILABLE, reason=PG_REASON)]),
]
BLOB_STORES = ["database", "directory"]


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A database of its own for one test, at head, dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'optim.db'}"
        migrate(url, tmp)
        yield url
        return
    name = f"optim_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        migrate(url, tmp)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str, tmp: Path, revision: str = "head") -> None:
    upgrade(Settings(database_url=url, data_dir=tmp), revision)


# every server a test started, in order: tests/conftest.py kills those a failing test left running
STARTED: list[Server] = []


@dataclass
class Server:
    """A real server process (``service.supervisor.ServiceProcess``) on a test's database and data directory."""

    url: str
    data_dir: Path
    blob_store: str = "database"
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    starts: int = 0
    process: ServiceProcess | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    @property
    def serving_pid(self) -> int:
        assert self.process is not None
        return self.process.serving_pid

    def start(self, timeout: float = 90) -> Server:
        env = {
            "OPTIM_DATABASE_URL": self.url,
            "OPTIM_DATA_DIR": str(self.data_dir),
            "OPTIM_BLOB_STORE": self.blob_store,
            **self.env,
        }
        self.process = ServiceProcess(port=self.port, env=env, log=self.data_dir / f"server-{self.starts}.log")
        self.starts += 1
        if not any(s is self for s in STARTED):
            STARTED.append(self)
        self.process.start(timeout)
        return self

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.data_dir.glob("server-*.log")))

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60)


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def decode(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary directory), which it may stop and start."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not versions or shutil.which("runuser") is None:
            pytest.fail("no PostgreSQL binaries (initdb) or runuser here")
        self.bindir = versions[-1].parent
        self.root = Path(tempfile.mkdtemp(prefix="optim-pg-"))
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*self._as_pg, str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self._as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
