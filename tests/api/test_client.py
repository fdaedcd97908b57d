"""The worker's side against a real server: RemoteOptimizer is a drop-in torch optimizer."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm.optim
import torch
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typer.testing import CliRunner

from optim_client import OptimServiceError, RemoteOptimizer
from service.cli import cli

from ..reference import bitwise_equal, make_model
from ..server import Server, database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("client")
    with database("sqlite", tmp) as url:
        srv = Server(url, tmp).start()
        yield srv
        srv.stop()


def _run() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def _data(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model.norm(model.embed(x))
    for block in model.blocks:
        h = torch.relu(block(h))
    return model.head(h)


def _loop(model: nn.Module, opt: torch.optim.Optimizer, steps: range, after_step: Any = None) -> list[float]:
    losses = []
    for k in steps:
        x, y = _data(k)
        opt.zero_grad()
        loss = nn.functional.mse_loss(_forward(model, x), y)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(k)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("durability", ["log", "snapshot"])  # a snapshot-only run steps on the body's own memory
@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd", "lion", "adafactor", "torch.AdamW", "torch.Rprop"])
def test_loop_equals_local_timm_with_scheduler_and_ema(server: Server, name: str, durability: str) -> None:
    options: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.05}
    local, remote_model = make_model(3), make_model(3)
    if name == "torch.Rprop":  # changes .grad in place
        options = {"lr": 0.01}
        local_opt = torch.optim.Rprop(local.parameters(), **options)
        groups = {"filter_bias_and_bn": False}
    elif name.startswith("torch."):
        local_opt = torch.optim.AdamW(local.parameters(), **options)
        groups: dict[str, Any] = {"filter_bias_and_bn": False}  # exactly torch.optim.AdamW(model.parameters())
    else:
        local_opt = timm.optim.create_optimizer_v2(local, opt=name, **options)
        groups = {}
    sched, _ = create_scheduler_v2(
        local_opt, sched="cosine", num_epochs=12, warmup_epochs=2, warmup_lr=1e-4, step_on_epochs=False, updates_per_epoch=1
    )
    ema = AveragedModel(local, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    local_losses = _loop(
        local, local_opt, range(10), lambda k: (sched.step_update(num_updates=k + 1), ema.update_parameters(local))
    )

    opt = RemoteOptimizer(
        remote_model.named_parameters(),
        url=server.base,
        run=_run(),
        optimizer=name,
        groups=groups,
        scheduler={"name": "cosine", "num_epochs": 12, "warmup_epochs": 2, "warmup_lr": 1e-4},
        ema={"decay": 0.9},
        durability=durability,
        **options,
    )
    assert isinstance(opt, torch.optim.Optimizer) and not opt.resumed
    remote_losses = _loop(remote_model, opt, range(10))
    assert remote_losses == local_losses
    assert opt.t == 10
    assert all(bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in local_opt.param_groups]
    assert opt.scheduler.get_last_lr() == [g["lr"] for g in local_opt.param_groups]
    averaged = opt.fetch_average("ema")
    assert all(bitwise_equal(p, averaged[n]) for n, p in ema.module.named_parameters())
    opt.close()


def test_plain_tensors_and_param_group_dicts_like_torch(server: Server) -> None:
    local, remote_model = make_model(4), make_model(4)

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        decay = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 0.003}]

    local_opt = torch.optim.AdamW(groups(local), lr=0.01)
    opt = RemoteOptimizer(groups(remote_model), url=server.base, run=_run(), optimizer="torch.AdamW", lr=0.01)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in local_opt.param_groups]
    assert _loop(remote_model, opt, range(5)) == _loop(local, local_opt, range(5))
    assert all(bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.003]
    opt.close()


def test_a_restarted_worker_resumes_whatever_its_initialisation(server: Server) -> None:
    run = _run()
    first = make_model(5)
    opt = RemoteOptimizer(first.named_parameters(), url=server.base, run=run, lr=0.01)
    _loop(first, opt, range(4))
    opt.close()
    fresh = make_model(99)  # the new process initialised differently
    again = RemoteOptimizer(fresh.named_parameters(), url=server.base, run=run, lr=0.01)
    assert again.resumed and again.t == 4
    assert all(bitwise_equal(a, b) for a, b in zip(first.parameters(), fresh.parameters(), strict=True))
    with pytest.raises(OptimServiceError) as info:
        RemoteOptimizer(fresh.named_parameters(), url=server.base, run=run, lr=0.02)  # another spec
    assert info.value.status == 409 and info.value.error == "RunConflict"
    again.close()


def test_a_stale_worker_resyncs_instead_of_failing(server: Server) -> None:
    run = _run()
    a_model, b_model = make_model(6), make_model(6)
    a = RemoteOptimizer(a_model.named_parameters(), url=server.base, run=run, lr=0.01)
    b = RemoteOptimizer(b_model.named_parameters(), url=server.base, run=run, lr=0.01)
    _loop(b_model, b, range(3))
    _loop(a_model, a, range(1))  # a's gradient is for t=0, the run is at t=3: a 409 that resyncs
    assert a.t == 3
    assert all(bitwise_equal(x, y) for x, y in zip(a_model.parameters(), b_model.parameters(), strict=True))
    a.close()
    b.close()


def test_state_dict_round_trip_puts_the_run_back(server: Server) -> None:
    model = make_model(7)
    opt = RemoteOptimizer(
        model.named_parameters(), url=server.base, run=_run(), lr=0.01, scheduler={"name": "StepLR", "step_size": 2, "gamma": 0.5}
    )
    _loop(model, opt, range(4))
    saved_opt = opt.state_dict()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(saved_opt) == {"state", "param_groups", "optim_service"} and saved_opt["optim_service"]["step"] == 4
    first = _loop(model, opt, range(4, 8))
    after_first = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved_model)  # what a checkpoint loader (Lightning, Accelerate) does...
    opt.load_state_dict(saved_opt)  # ...then this puts the run back to step 4
    assert opt.t == 4
    assert _loop(model, opt, range(4, 8)) == first
    assert all(bitwise_equal(a, b) for a, b in zip(after_first, model.parameters(), strict=True))
    opt.close()


def test_wire_dtype_sends_bf16_and_applies_in_fp32(server: Server) -> None:
    local, remote_model = make_model(8), make_model(8)
    local_opt = timm.optim.create_optimizer_v2(local, opt="adamw", lr=0.01)

    class Bf16Wire(torch.optim.Optimizer):  # the local reference: gradients rounded to bf16 and back
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.inner, self.param_groups = inner, inner.param_groups

        def zero_grad(self, set_to_none: bool = True) -> None:
            self.inner.zero_grad(set_to_none)

        def step(self, closure: Any = None) -> None:
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = p.grad.to(torch.bfloat16).float()
            self.inner.step()

    opt = RemoteOptimizer(remote_model.named_parameters(), url=server.base, run=_run(), lr=0.01, wire_dtype=torch.bfloat16)
    assert _loop(remote_model, opt, range(4)) == _loop(local, Bf16Wire(local_opt), range(4))
    assert all(bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True))
    opt.close()


def test_retries_until_the_service_is_back(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        srv = Server(url, tmp_path).start()
        model = make_model(9)
        opt = RemoteOptimizer(model.named_parameters(), url=srv.base, run=_run(), lr=0.01, retry_deadline=120)
        srv.kill()
        threading.Timer(1.0, srv.start).start()
        _loop(model, opt, range(2))  # the first step waits for the restarted service
        assert opt.t == 2
        opt.close()
        time.sleep(0.1)
        srv.stop()


def test_a_connection_the_service_closed_while_idle_is_replaced(server: Server) -> None:
    """uvicorn closes a kept-alive connection after 5 s idle: the next request, even one that is not retried
    (a checkpoint), goes out on a new connection instead of failing."""
    model = make_model(11)
    opt = RemoteOptimizer(model.named_parameters(), url=server.base, run=_run(), lr=0.01, retry_deadline=0)
    _loop(model, opt, range(1))
    time.sleep(6)
    assert opt.checkpoint("after-idle")["name"] == "after-idle"
    time.sleep(6)
    _loop(model, opt, range(1, 2))
    assert opt.t == 2
    opt.close()


def test_step_timings_come_back_from_the_service(server: Server) -> None:
    model = make_model(12)
    opt = RemoteOptimizer(model.named_parameters(), url=server.base, run=_run(), lr=0.01)
    _loop(model, opt, range(1))
    timings = opt.last_timings
    assert {"encode", "round_trip", "write"} <= set(timings)
    assert {"receive", "decode", "step", "log", "encode"} <= set(timings["server"])
    assert all(v >= 0 for v in timings["server"].values())
    assert sum(timings["server"].values()) <= timings["round_trip"]  # the service's own time is part of the round trip
    opt.close()


def test_cli_lists_shows_plots_and_exports(server: Server, tmp_path: Path) -> None:
    model = make_model(10)
    run = _run()
    opt = RemoteOptimizer(
        model.named_parameters(),
        url=server.base,
        run=run,
        lr=0.01,
        scheduler={"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 100},
    )
    _loop(model, opt, range(3))
    opt.checkpoint("c3")
    runner = CliRunner()
    env = {"OPTIM_URL": server.base, "COLUMNS": "200"}
    listed = runner.invoke(cli, ["runs", "list"], env=env)
    assert listed.exit_code == 0 and run in listed.output
    shown = runner.invoke(cli, ["runs", "show", run], env=env)
    assert shown.exit_code == 0 and "OneCycleLR" in shown.output
    plotted = runner.invoke(cli, ["runs", "schedule", run, "--steps", "50"], env=env)
    assert plotted.exit_code == 0 and "t=3" in plotted.output and any(c in plotted.output for c in "▁▂▃▄▅▆▇█")
    assert runner.invoke(cli, ["checkpoints", "list", run], env=env).output.count("c3") == 1
    path = tmp_path / "c3.pt"
    exported = runner.invoke(cli, ["checkpoints", "export", run, "c3", str(path)], env=env)
    assert exported.exit_code == 0, exported.output
    assert torch.load(io.BytesIO(path.read_bytes()), weights_only=True)["step"] == 3
    missing = runner.invoke(cli, ["runs", "show", "no-such-run"], env=env)
    assert missing.exit_code == 1 and "RunNotFound" in missing.output
    opt.close()


def test_example_trains_through_preemption(server: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_mlp.py"), "--url", server.base, "--steps", "40", "--preempt"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preempted the worker" in result.stdout and "resumed" in result.stdout
    assert "same loss curve: yes; same final weights, bit for bit: yes" in result.stdout


def test_client_needs_no_server_dependencies() -> None:
    code = (
        "import sys; blocked = ('fastapi', 'sqlalchemy', 'alembic', 'starlette', 'uvicorn', 'httpx');"
        "sys.modules.update({m: None for m in blocked});"
        "import optim_client; print(optim_client.RemoteOptimizer.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "RemoteOptimizer", out.stderr


class CuttingRelay:
    """A TCP relay to the server (on loopback) that closes its connection once the server has sent ``cut_at``
    bytes through it in all: an answer lost part way, as a dropped connection loses it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0  # bytes the server has sent through the relay
        self.cut_at: int | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers and self.cut_at is not None and self.sent + len(data) >= self.cut_at:
                    dst.sendall(data[: self.cut_at - self.sent])
                    self.sent, self.cut_at = self.cut_at, None
                    break
                if answers:  # counted before it is passed on: once the client has read it, it is in `sent`
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


def _one_step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    x, y = _data(k)
    opt.zero_grad()
    nn.functional.mse_loss(_forward(model, x), y).backward()
    opt.step()


def test_an_answer_cut_off_inside_the_parameters(server: Server) -> None:
    """The answer is read straight into the parameters, so a connection lost part way leaves them half written:
    the retried step's answer (a replay) writes them all; if the client gives up, its next step resyncs."""
    relay = CuttingRelay(server.port)
    local, remote_model = make_model(13), make_model(13)
    local_opt = timm.optim.create_optimizer_v2(local, opt="adamw", lr=0.01)
    opt = RemoteOptimizer(remote_model.named_parameters(), url=f"http://127.0.0.1:{relay.port}", run=_run(), lr=0.01)
    before = relay.sent
    _one_step(remote_model, opt, 0)
    answer = relay.sent - before  # each step's answer is this long, give or take a few header bytes
    assert answer > 1000

    relay.cut_at = relay.sent + answer - 200  # inside the last parameter's bytes
    _one_step(remote_model, opt, 1)  # retried on a new connection: the service replays its answer
    assert relay.cut_at is None and opt.t == 2
    for k in range(2):
        _one_step(local, local_opt, k)
    assert all(bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True))

    opt._http.retry_deadline = 0  # a client that gives up at once
    relay.cut_at = relay.sent + answer - 200
    with pytest.raises((OSError, http.client.HTTPException)):
        _one_step(remote_model, opt, 2)
    _one_step(local, local_opt, 2)  # the service applied that step
    written = [bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True)]
    assert any(written) and not all(written)  # the parameters before the cut got the new values, the last did not
    _one_step(remote_model, opt, 3)  # resyncs instead of sending a gradient of half-written parameters
    assert opt.t == 3
    assert all(bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True))
    for k in range(3, 5):
        _one_step(remote_model, opt, k)
        _one_step(local, local_opt, k)
    assert opt.t == 5
    assert all(bitwise_equal(a, b) for a, b in zip(local.parameters(), remote_model.parameters(), strict=True))
    opt.close()
    relay.close()
