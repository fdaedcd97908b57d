"""Train a small MLP through optim-service, optionally preempting the worker at random points.

    python examples/train_mlp.py --url http://127.0.0.1:8000 --steps 300
    python examples/train_mlp.py --url http://127.0.0.1:8000 --steps 300 --preempt

The data is generated from the step number (a noisy 2-D function to regress), so a worker that
restarts at step t sees the same batches it would have seen. With --preempt, the script first trains
a steady run, then the same run again in a worker process that it kills with SIGKILL at random
moments and restarts with the same command, until it finishes; then it compares the two: the loss
curve and the final weights must be the same, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from optim_client import RemoteOptimizer
from optim_client.transport import Transport


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(t: int, seed: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + t)
    x = torch.rand(size, 2, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, :1]) * torch.cos(3 * x[:, 1:]) + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def train(url: str, run: str, steps: int, seed: int, losses: Path) -> None:
    """The worker: an ordinary loop; the optimizer is the one line that changed."""
    model = make_model(seed)  # on a restart the run exists: its parameters replace this initialisation
    opt = RemoteOptimizer(
        model.named_parameters(),
        url=url,
        run=run,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.01,
        scheduler={"name": "cosine", "num_epochs": steps, "warmup_epochs": steps // 10, "warmup_lr": 1e-4},
        ema={"decay": 0.99},
        seed=seed,
        snapshot_every=25,
    )
    if opt.resumed:
        print(f"[worker {os.getpid()}] resumed {run} at step {opt.t}", flush=True)
    with losses.open("a") as log:
        while opt.t < steps:
            x, y = batch(opt.t, seed)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            log.write(f"{opt.t} {loss.item()!r}\n")
            log.flush()
            opt.step()
    opt.close()


def read_curve(path: Path) -> dict[int, float]:
    """Step -> loss; a step computed twice (killed before it was acknowledged) must give the same loss."""
    curve: dict[int, float] = {}
    for line in path.read_text().splitlines():
        t_text, loss_text = line.split()
        t, loss = int(t_text), float(loss_text)
        if curve.get(t, loss) != loss:
            raise SystemExit(f"step {t} gave two different losses after a restart: {curve[t]} and {loss}")
        curve[t] = loss
    return curve


def final_params(url: str, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    http = Transport(url)
    try:
        return load(http.request("GET", f"/runs/{run}/params").content)
    finally:
        http.close()


def preempted(args: argparse.Namespace, run: str, losses: Path) -> int:
    """Run the worker in a subprocess; kill it at random steps; restart it with the same command."""
    rng = random.Random(args.seed)
    targets = sorted(rng.sample(range(1, args.steps), min(args.kills, args.steps - 1)))
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--url",
        args.url,
        "--run",
        run,
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--losses",
        str(losses),
    ]
    starts = 0
    while True:
        proc = subprocess.Popen(command)
        starts += 1
        target = targets.pop(0) if targets else None
        while proc.poll() is None:
            done = len(losses.read_text().splitlines()) if losses.exists() else 0
            if target is not None and done >= target:
                time.sleep(rng.uniform(0, 0.02))  # sometimes between requests, sometimes in the middle of one
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                print(f"preempted the worker after {done} logged steps (kill -9)", flush=True)
                break
            time.sleep(0.005)
        if proc.returncode == 0:
            return starts
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the worker failed with exit code {proc.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("OPTIM_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preempt", action="store_true", help="kill the worker at random points and compare")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--run", default=None)
    parser.add_argument("--losses", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tag = args.run or f"mlp-{uuid.uuid4().hex[:8]}"
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    if args.worker:
        train(args.url, tag, args.steps, args.seed, args.losses)
        return 0

    steady_log = workdir / f"{tag}-steady.losses"
    train(args.url, f"{tag}-steady", args.steps, args.seed, steady_log)
    steady = read_curve(steady_log)
    print(f"steady run: loss {steady[0]:.4f} -> {steady[args.steps - 1]:.4f} in {args.steps} steps")
    if not args.preempt:
        return 0
    preempt_log = workdir / f"{tag}-preempted.losses"
    starts = preempted(args, f"{tag}-preempted", preempt_log)
    curve = read_curve(preempt_log)
    same_curve = curve == steady
    a, b = final_params(args.url, f"{tag}-steady"), final_params(args.url, f"{tag}-preempted")
    same_weights = a.keys() == b.keys() and all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a)
    print(f"preempted run: {starts} worker starts, {len(curve)} steps")
    print(f"same loss curve: {'yes' if same_curve else 'NO'}; same final weights, bit for bit: {'yes' if same_weights else 'NO'}")
    return 0 if same_curve and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
