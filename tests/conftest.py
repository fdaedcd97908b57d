"""What every test gets, and the markers each directory implies.

- ``tests/engine``: the engine (``optim_core``, ``optim_format``) in this process, no server, no database;
- ``tests/service``: the service's parts and the app in this process (``httpx.ASGITransport``), real databases;
- ``tests/api``: a real server process on 127.0.0.1 (marked ``slow``);
- ``tests/faults``: kill -9, databases down, disks full (marked ``faults`` and ``slow``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import server

HERE = Path(__file__).resolve().parent
MARKS_BY_DIRECTORY = {"api": ("slow",), "faults": ("faults", "slow")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            directory = Path(item.path).resolve().relative_to(HERE).parts[0]
        except ValueError:
            continue
        for mark in MARKS_BY_DIRECTORY.get(directory, ()):
            item.add_marker(mark)


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test() -> Iterator[None]:
    """A test that fails before it stops its server (few tests stop theirs in a ``finally``) must not leave the
    process running for the rest of the session. Servers of wider-scoped fixtures started before this test's
    set-up, and are theirs to stop."""
    before = len(server.STARTED)
    yield
    for srv in server.STARTED[before:]:
        srv.kill()
    del server.STARTED[before:]
