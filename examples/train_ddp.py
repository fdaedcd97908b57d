"""Data-parallel training through optim-service: several workers (ranks), one hosted optimizer.

    torchrun --nproc-per-node 4 examples/train_ddp.py --url http://127.0.0.1:8000 --steps 200
    python examples/train_ddp.py --url http://127.0.0.1:8000 --steps 200 --world-size 4 [--preempt]

Each rank runs the same loop on its own data (a batch drawn from the step and the rank), and sends its gradient;
the service averages the ranks' gradients in rank order and steps once (sync mode), and answers every rank with
the same new parameters. Under torchrun (RANK and WORLD_SIZE set) the script is one rank. Run plainly, it starts
the ranks itself as processes; with --preempt it first trains an uninterrupted run, then the same run again while
it kills random ranks with SIGKILL and starts them again with the same command, and compares the two: the final
weights must be the same, bit for bit (every step waits for all ranks: a killed rank's step waits for it to come
back; with a --quorum below the world size the run goes on without it, and differs).
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

import torch
from torch import nn

from optim_client import RemoteOptimizer
from optim_client.transport import Transport


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(t: int, rank: int, seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at step ``t``: a rank that restarts at step t sees the batches it would have seen."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + t) * 64 + rank)
    x = torch.rand(size, 2, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, :1]) * torch.cos(3 * x[:, 1:]) + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def workers_spec(args: argparse.Namespace) -> dict[str, object]:
    spec: dict[str, object] = {"world_size": args.world_size, "mode": args.mode}
    if args.mode == "sync":
        spec.update(quorum=args.quorum or args.world_size, straggler_timeout_s=args.straggler_timeout)
    else:
        spec["max_staleness"] = args.max_staleness
    return spec


def train(url: str, run: str, rank: int, world_size: int, args: argparse.Namespace) -> None:
    """One rank: an ordinary loop; the optimizer is the one line that changed."""
    model = make_model(args.seed)  # every rank starts from the run's parameters (the first to create it sets them)
    opt = RemoteOptimizer(
        model.named_parameters(),
        url=url,
        run=run,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.01,
        scheduler={"name": "cosine", "num_epochs": args.steps, "warmup_epochs": args.steps // 10, "warmup_lr": 1e-4},
        ema={"decay": 0.99},
        seed=args.seed,
        snapshot_every=25,
        workers=workers_spec(args),
        rank=rank,
        world_size=world_size,
    )
    if opt.resumed and opt.t > 0:
        print(f"[rank {rank}, pid {os.getpid()}] joined {run} at step {opt.t}", flush=True)
    while opt.t < args.steps:
        x, y = batch(opt.t, rank, args.seed)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if rank == args.slow_rank:
            time.sleep(args.slow_s)  # a straggler (the tests make one)
        opt.step()  # sync: answered once the step of every rank's gradient is applied
    opt.close()


def final_params(url: str, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    http = Transport(url)
    try:
        return load(http.request("GET", f"/runs/{run}/params").content)
    finally:
        http.close()


def launch(args: argparse.Namespace, run: str, preempt: bool) -> int:
    """The ranks as processes of their own; with ``preempt``, random ranks are killed (-9) and started again."""
    rng = random.Random(args.seed)
    command = [sys.executable, __file__, "--worker", "--url", args.url, "--run", run]
    command += ["--steps", str(args.steps), "--seed", str(args.seed), "--mode", args.mode, "--world-size", str(args.world_size)]
    command += ["--quorum", str(args.quorum or 0), "--straggler-timeout", str(args.straggler_timeout)]
    command += ["--max-staleness", str(args.max_staleness)]
    procs = {rank: subprocess.Popen([*command, "--rank", str(rank)]) for rank in range(args.world_size)}
    kills = args.kills if preempt else 0
    starts = args.world_size
    while procs:
        time.sleep(0.05)
        if kills and rng.random() < 0.05:
            rank = rng.choice(sorted(procs))
            procs[rank].send_signal(signal.SIGKILL)
            procs[rank].wait()
            print(f"preempted rank {rank} (kill -9)", flush=True)
            procs[rank] = subprocess.Popen([*command, "--rank", str(rank)])
            kills, starts = kills - 1, starts + 1
        for rank, proc in list(procs.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise SystemExit(f"rank {rank} failed with exit code {proc.returncode}")
                del procs[rank]
    return starts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("OPTIM_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 4)))
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--quorum", type=int, default=0, help="sync: ranks enough once the stragglers' time is up (0: all)")
    parser.add_argument("--straggler-timeout", type=float, default=30.0)
    parser.add_argument("--max-staleness", type=int, default=4, help="async: steps a gradient may lag the run")
    parser.add_argument("--preempt", action="store_true", help="kill random ranks and compare with an uninterrupted run")
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--run", default=None)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--slow-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--slow-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tag = args.run or f"ddp-{uuid.uuid4().hex[:8]}"
    if args.worker or "RANK" in os.environ:  # one rank: launched by this script, or by torchrun
        rank = args.rank if args.rank is not None else int(os.environ["RANK"])
        train(args.url, tag, rank, args.world_size, args)
        return 0

    launch(args, f"{tag}-steady", preempt=False)
    print(f"uninterrupted run: {args.world_size} ranks, {args.steps} steps")
    if not args.preempt:
        return 0
    starts = launch(args, f"{tag}-preempted", preempt=True)
    a, b = final_params(args.url, f"{tag}-steady"), final_params(args.url, f"{tag}-preempted")
    same = a.keys() == b.keys() and all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a)
    print(f"preempted run: {starts} rank starts for {args.world_size} ranks")
    print(f"same final weights as the uninterrupted run, bit for bit: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
