"""An optim-service server as a process of its own: started, waited for until it answers, stopped or killed.

What a supervisor (systemd, Kubernetes, ``optim-service supervise``) does with the server, as a class: the
benchmarks and the tests start real servers with it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(host: str, port: int, path: str = "/healthz", timeout: float = 1.0) -> bool:
    """Whether a server on ``host:port`` answers ``path`` with 200."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class ServiceProcess:
    """``optim-service serve`` on ``host:port`` with ``env`` (``OPTIM_*`` settings), its output in ``log``."""

    def __init__(
        self, *, port: int | None = None, env: Mapping[str, str] | None = None, log: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.host, self.port = host, port or free_port()
        self.env = dict(env or {})
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 90) -> ServiceProcess:
        """Start the process and wait until it answers ``/healthz``; a process that exits first raises with its
        output's end."""
        args = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            # quiet unless the environment asks for a level (OPTIM_LOG_LEVEL)
            *(["--log-level", "warning"] if "OPTIM_LOG_LEVEL" not in self.env else []),
        ]
        with open(self.log, "ab") if self.log is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(args, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log is not None else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {tail}")
            if answers(self.host, self.port):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"server did not answer in {timeout}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """The serving process (under ``OPTIM_RESTART_AFTER_CRASH``, the default, the process started is a parent that
        forks it)."""
        if not self.alive():
            return []
        assert self.proc is not None
        try:
            return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except OSError:
            return []

    @property
    def serving_pid(self) -> int:
        """The process that holds the runs and answers requests (for its memory in ``/proc``)."""
        assert self.proc is not None
        return next(iter(self.children()), self.proc.pid)

    def kill(self) -> None:
        """SIGKILL to the server and its serving process: no shutdown hook runs, as in a crash of the machine."""
        if self.alive():
            assert self.proc is not None
            children = self.children()
            self.proc.send_signal(signal.SIGKILL)
            _kill_and_wait(children)
            self.proc.wait()

    def kill_serving(self, timeout: float = 30) -> list[int]:
        """SIGKILL to the serving process alone (the OOM killer's choice, a segfault), then wait until the one its
        parent forks (after a back-off, for quick deaths in a row) answers on the same port. Returns the pids killed."""
        children = self.children()
        _kill_and_wait(children)
        deadline = time.monotonic() + timeout
        while self.children() in ([], children) or not answers(self.host, self.port, timeout=timeout):
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError(f"no serving process answered within {timeout}s of the kill")
            time.sleep(0.005)
        return children

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM: a clean stop (snapshot-only runs write theirs); killed if it takes longer than ``timeout``."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def _kill_and_wait(pids: list[int], timeout: float = 10) -> None:
    """SIGKILL ``pids`` (not this process's children) and wait until each has died."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not dead(pid) and time.monotonic() < deadline:
            time.sleep(0.005)


def dead(pid: int) -> bool:
    """Whether ``pid`` has died and let go of its port and files: gone, or a zombie with no thread still exiting
    (a killed process's main thread turns zombie before its other threads have closed the files they share)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X") and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True
