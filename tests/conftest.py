"""What every test gets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import server


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
