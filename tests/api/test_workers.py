"""Several workers on one run, through real processes and a real server: four ranks of ``examples/train_ddp.py``
on a sync run (AdamW, a cosine schedule, EMA) end bit for bit where the in-process reference ends, which applies
the contract's reduction (rank order: ``g = g[r0].clone(); g.add_(g[r]) ...; g.div_(n)``) to the same gradients."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import timm.optim
import torch
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..reference import assert_tree_bitwise, bitwise_equal
from ..server import Server, database, decode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import train_ddp  # noqa: E402  (the example is the worker program)

STEPS, WORLD = 12, 4


def ddp_args(**changes: Any) -> argparse.Namespace:
    base = {"steps": STEPS, "seed": 0, "world_size": WORLD, "mode": "sync", "quorum": 0, "straggler_timeout": 30.0}
    base.update(slow_rank=-1, slow_s=0.0, max_staleness=4)
    return argparse.Namespace(**{**base, **changes})


def rank_command(url: str, run: str, args: argparse.Namespace, rank: int) -> list[str]:
    command = [sys.executable, str(ROOT / "examples" / "train_ddp.py"), "--worker", "--url", url, "--run", run]
    command += ["--steps", str(args.steps), "--seed", str(args.seed), "--mode", args.mode, "--world-size", str(args.world_size)]
    command += ["--quorum", str(args.quorum), "--straggler-timeout", str(args.straggler_timeout), "--rank", str(rank)]
    command += ["--slow-rank", str(args.slow_rank), "--slow-s", str(args.slow_s), "--max-staleness", str(args.max_staleness)]
    return command


# the ranks compute their gradients with one thread, as the reference below does: a reduction split between threads
# rounds otherwise (torch's backward of a matmul sums the batch in chunks)
RANK_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def reference(args: argparse.Namespace, contributors: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """The run in this process: at every step the given ranks' gradients (all ranks by default), reduced as the
    contract says, one AdamW step, the cosine schedule per step, the EMA."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(args, contributors)
    finally:
        torch.set_num_threads(threads)


def _reference(args: argparse.Namespace, contributors: Sequence[Sequence[int]] | None) -> dict[str, Any]:
    model = train_ddp.make_model(args.seed)
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=3e-3, weight_decay=0.01)
    sched, _ = create_scheduler_v2(
        opt,
        sched="cosine",
        num_epochs=args.steps,
        warmup_epochs=args.steps // 10,
        warmup_lr=1e-4,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    for t in range(args.steps):
        ranks = sorted(contributors[t]) if contributors is not None else range(args.world_size)
        grads = []
        for rank in ranks:
            x, y = train_ddp.batch(t, rank, args.seed)
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for n, p in model.named_parameters():
            g = grads[0][n].clone()
            for other in grads[1:]:
                g.add_(other[n])
            p.grad = g.div_(len(grads))
        opt.step()
        sched.step_update(num_updates=t + 1)
        ema.update_parameters(model)
    return {"model": model, "optimizer": opt, "ema": ema}


def served(base: str, run: str) -> dict[str, Any]:
    """The run as the service holds it: parameters, EMA, the optimizer's state (an export), its steps."""
    with httpx.Client(base_url=base, timeout=60) as c:
        params = decode(c.get(f"/runs/{run}/params").content)
        ema = decode(c.get(f"/runs/{run}/averages/ema").content)
        name = f"end-{uuid.uuid4().hex[:6]}"
        assert c.post(f"/runs/{run}/checkpoints", json={"name": name}).status_code == 201
        exported = torch.load(io.BytesIO(c.get(f"/runs/{run}/checkpoints/{name}/export").content), weights_only=True)
        steps = c.get(f"/runs/{run}/steps", params={"limit": 10_000}).json()["steps"]
        described = c.get(f"/runs/{run}").json()
    return {"params": params, "ema": ema, "exported": exported, "steps": steps, "run": described}


def assert_equal_to_reference(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert all(bitwise_equal(p, got["params"][n]) for n, p in ref["model"].named_parameters()), "parameters differ"
    assert all(bitwise_equal(p, got["ema"][n]) for n, p in ref["ema"].module.named_parameters()), "EMA differs"
    assert_tree_bitwise(ref["optimizer"].state_dict()["state"], got["exported"]["optimizer"]["state"], "optimizer state")


def test_four_ranks_in_sync_equal_the_contract_s_reduction(tmp_path: Path) -> None:
    args = ddp_args()
    run = f"sync-{uuid.uuid4().hex[:6]}"
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        try:
            procs = [subprocess.Popen(rank_command(server.base, run, args, r), cwd=ROOT, env=RANK_ENV) for r in range(WORLD)]
            assert [p.wait(timeout=300) for p in procs] == [0] * WORLD
            got = served(server.base, run)
        finally:
            server.stop()
    assert got["run"]["t"] == STEPS and [s["t"] for s in got["steps"]] == list(range(STEPS))
    assert all(s["contributors"] == list(range(WORLD)) and s["dropped"] == [] for s in got["steps"])
    assert_equal_to_reference(got, reference(args))


PREEMPT = ["--world-size", "3", "--preempt", "--kills", "3"]


def test_the_example_preempts_ranks_and_ends_where_the_uninterrupted_run_ends(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        server = Server(url, tmp_path).start()
        try:
            done = subprocess.run(
                [sys.executable, str(ROOT / "examples" / "train_ddp.py"), "--url", server.base, "--steps", "15", *PREEMPT],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            server.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bit for bit: yes" in done.stdout and "preempted rank" in done.stdout, done.stdout
