"""The parent that forks the serving process (``service/respawn.py``): what it passes on, what it does not restart,
and that it takes its serving process with it. (A killed serving process replaced and the run resumed bit for bit:
``test_durability.py``.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from service.respawn import MAX_BACKOFF_S, backoff
from service.supervisor import dead

from ..reference import initial_params, make_grads, make_model, manifest
from ..server import Server, database, encode, migrate


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_killing_the_parent_takes_the_serving_process_and_the_port_with_it(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        assert server.proc is not None
        serving = server.serving_pid
        assert serving != server.proc.pid and not dead(serving)
        os.kill(server.proc.pid, signal.SIGKILL)  # the parent alone
        server.proc.wait()
        deadline = time.monotonic() + 10
        while not dead(serving):
            assert time.monotonic() < deadline, "the serving process outlived its parent"
            time.sleep(0.01)
        assert _port_is_free(server.port)


def test_sigterm_reaches_the_serving_process_which_stops_cleanly(tmp_path: Path) -> None:
    """A snapshot-only run writes its snapshot when the server is stopped: only the serving process can, so the
    parent must have passed SIGTERM on (had it died of it, the kernel would have killed the serving process)."""
    model = make_model()
    grads = make_grads(model, 3)
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        with server.client() as client:
            spec = {"params": manifest(model), "optimizer": {"name": "adamw"}}
            run = {"name": "light", "spec": spec, "durability": "snapshot", "snapshot_every": 1000}
            r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
            assert r.status_code == 201, r.text
            for k in range(3):
                assert client.post("/runs/light/step", params={"t": k}, content=encode(grads[k])).status_code == 200
        server.stop()
        assert server.proc is not None and server.proc.returncode == -signal.SIGTERM  # as the server alone ends
        server.start()
        with server.client() as client:
            assert client.get("/runs/light").json()["t"] == 3
        server.stop()


def test_a_serving_process_that_fails_to_start_is_not_restarted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, tmp_path, revision="0002")
    server = Server(url, tmp_path)
    with pytest.raises(RuntimeError, match="server exited with 3"):
        server.start(timeout=60)
    log = server.log()  # one refusal, no second start
    assert log.count(f"OPTIM_DATABASE_URL={url} optim-service migrate") == 1 and '"event": "respawn"' not in log


def test_without_restart_after_crash_the_server_is_one_process(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, env={"OPTIM_RESTART_AFTER_CRASH": "false"}).start()
        assert server.process is not None and server.proc is not None
        assert server.process.children() == [] and server.serving_pid == server.proc.pid
        with server.client() as client:
            assert client.get("/healthz").status_code == 200
        server.kill()
        assert server.proc.returncode == -signal.SIGKILL


def test_quick_deaths_in_a_row_back_off_up_to_a_bound() -> None:
    waits = [backoff(n) for n in range(1, 12)]
    assert waits[0] == 0.0 and 0 < waits[1] < 1.0
    assert waits == sorted(waits) and max(waits) == MAX_BACKOFF_S
