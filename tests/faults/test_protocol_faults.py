"""The protocols through kill -9: the server killed in the middle of a step's evaluations (LBFGS) or between
steps (Adahessian, sparse gradients), and a worker killed in the middle of an LBFGS step and started again with the
same command: every run ends bit for bit where torch and timm in this process end."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm.optim
import torch

from optim_client import RemoteOptimizer

from ..api.test_protocols import Bag, Cnn, Mlp, _lbfgs_loop, _same
from ..reference import bitwise_equal
from ..server import Server, database

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
LBFGS = {"lr": 0.5, "max_iter": 6, "history_size": 4, "line_search_fn": "strong_wolfe"}


def _restarting(server: Server) -> Callable[[], None]:
    """kill -9 of the server, started again at once in the background (the worker's retries wait for it)."""

    def kill() -> None:
        server.kill()
        threading.Thread(target=server.start, daemon=True).start()

    return kill


class Killing(Mlp):
    """The MLP whose loss, at chosen evaluations, first kills the server: between two evaluations of a step."""

    def __init__(self, kill: Callable[[], None], at: set[int]) -> None:
        super().__init__()
        self.kill, self.at, self.evaluations = kill, at, 0

    def loss(self, step: int) -> torch.Tensor:
        self.evaluations += 1
        if self.evaluations in self.at:
            self.kill()
        return super().loss(step)


def test_lbfgs_survives_the_server_killed_between_evaluations(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, env={"OPTIM_DEFAULT_SNAPSHOT_EVERY": "4"}).start()
        try:
            model = Killing(_restarting(server), at={3, 9, 10, 17})
            remote = RemoteOptimizer(
                model.named_parameters(), url=server.base, run="lbfgs-kill", optimizer="torch.LBFGS", **LBFGS
            )
            losses = _lbfgs_loop(model, remote, STEPS)
        finally:
            server.stop()
    local = Mlp()
    assert losses == _lbfgs_loop(local, torch.optim.LBFGS(local.parameters(), **LBFGS), STEPS)
    assert _same(model, local) and model.evaluations > 17


@pytest.mark.parametrize("kind", ["adahessian", "sparse"])
def test_second_order_and_sparse_runs_survive_the_server_killed(tmp_path: Path, kind: str) -> None:
    name, options, make = {
        "adahessian": ("adahessian", {"lr": 0.1, "update_each": 2, "n_samples": 1}, Cnn),
        "sparse": ("torch.SGD", {"lr": 0.1, "momentum": 0.9}, Bag),
    }[kind]
    local, remote_model = make(), make()
    reference: Any = (
        timm.optim.create_optimizer_v2(local, opt=name, **options)
        if kind == "adahessian"
        else torch.optim.SGD(local.parameters(), **options)
    )
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path, env={"OPTIM_DEFAULT_SNAPSHOT_EVERY": "2"}).start()
        try:
            remote = RemoteOptimizer(
                remote_model.named_parameters(), url=server.base, run=f"kill-{kind}", optimizer=name, **options
            )
            for step in range(STEPS):
                if step in (1, 3):
                    _restarting(server)()  # the next step finds a new server, which recovers the run from its log
                for model, opt in ((local, reference), (remote_model, remote)):
                    opt.zero_grad()
                    model.loss(step).backward(create_graph=kind == "adahessian")
                    opt.step()
        finally:
            server.stop()
    assert _same(remote_model, local)


WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
from optim_client import RemoteOptimizer
from tests.api.test_protocols import Mlp, _lbfgs_loop

die_at = int(sys.argv[1])  # the evaluation (counted over the whole run) before which this worker dies; 0: never
model = Mlp()
opt = RemoteOptimizer(model.named_parameters(), url={url!r}, run={run!r}, optimizer="torch.LBFGS", **{options!r})
evaluations = 0
base = Mlp.loss

def loss(self, step):
    global evaluations
    evaluations += 1
    if evaluations == die_at:
        os.kill(os.getpid(), signal.SIGKILL)  # preempted in the middle of a step's evaluations
    return base(self, step)

Mlp.loss = loss
while opt.t < {steps}:
    _lbfgs_loop(model, opt, 1)
torch.save({{n: p.detach() for n, p in model.named_parameters()}}, {out!r})
"""


def test_lbfgs_survives_its_worker_killed_in_the_middle_of_a_step(tmp_path: Path) -> None:
    out = tmp_path / "final.pt"
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        try:
            script = WORKER.format(
                root=str(ROOT), url=server.base, run=f"worker-{uuid.uuid4().hex[:6]}", options=LBFGS, steps=STEPS, out=str(out)
            )
            for die_at in (4, 11, 0):  # twice killed in a step (the evaluations it had sent are kept), then to the end
                done = subprocess.run(
                    [sys.executable, "-c", script, str(die_at)], cwd=ROOT, capture_output=True, text=True, timeout=300
                )
                if die_at:
                    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
                else:
                    assert done.returncode == 0, done.stderr[-2000:]
        finally:
            server.stop()
    local = Mlp()
    _lbfgs_loop(local, torch.optim.LBFGS(local.parameters(), **LBFGS), STEPS)
    final = torch.load(out, weights_only=True)
    assert all(bitwise_equal(final[n], p) for n, p in local.named_parameters())
