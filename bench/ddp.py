"""Data parallel, side by side: N ranks x M parameters of AdamW, one step at a time, three ways.

    python bench/ddp.py [--ranks 4] [--millions 10] [--rounds 8] [--steps 5]

- **ddp**: what a user would pick instead: the ranks all-reduce their gradients with the gloo backend, in 25 MB
  buckets as DDP does (its default ``bucket_cap_mb``), divide by N and step a local ``torch.optim.AdamW`` each;
- **rpc**: a ``torch.distributed.rpc`` parameter server: each rank sends its gradients; once all N have, the
  server sums them in rank order, divides, steps one AdamW and answers every rank with the parameters;
- **hosted**: optim-service with the run's ``workers`` (sync, world size N), durable by default (the step log on
  SQLite), each rank a ``RemoteOptimizer``.

The gradients are synthetic (``baselines.make_grads``, the same every step): what is measured is moving the
gradients and the parameters and the optimizer's step, not a model's forward and backward. Every system's
processes live for the whole benchmark and the systems take turns, round after round (A B C A B C ...), so each
ratio compares figures taken in the same minutes on this shared machine. The figure of a round is the median
of rank 0's step times in it; the table gives the median over rounds and their spread.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from baselines import make_grads, make_params  # noqa: E402

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb
LR = 1e-3


def _env(port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", TP_SOCKET_IFNAME="lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", message=r"You are using a Backend .* as a ProcessGroup")


def _serve_commands(conn: Connection, step: Any) -> None:
    """A rank's loop: ``("steps", n)`` -> the seconds of each of n steps; ``("stop",)`` ends it."""
    while True:
        command = conn.recv()
        if command[0] == "stop":
            return
        times = []
        for _ in range(command[1]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        conn.send(times)


# ------------------------------------------------------------------------------------------------ ddp
def _ddp_rank(rank: int, world: int, port: int, millions: int, conn: Connection) -> None:
    _env(port)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    params = make_params(millions)
    grads = make_grads(millions)
    opt = torch.optim.AdamW(params, lr=LR)
    buckets: list[list[int]] = [[]]
    size = 0
    for i, g in enumerate(grads):
        if size and size + g.numel() * 4 > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += g.numel() * 4
    flats = [torch.empty(sum(grads[i].numel() for i in b)) for b in buckets]

    def step() -> None:
        for bucket, flat in zip(buckets, flats, strict=True):
            torch.cat([grads[i] for i in bucket], out=flat)
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for i in bucket:
                n = grads[i].numel()
                params[i].grad = flat[offset : offset + n].view_as(grads[i])
                offset += n
        opt.step()

    conn.send("ready")
    _serve_commands(conn, step)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ rpc
_ps: dict[str, Any] = {}


def _ps_push(rank: int, grads: list[Any]) -> list[Any]:
    """On the parameter server: this rank's gradients for the current step; answered once the step is done."""
    with _ps["cond"]:
        step = _ps["step"]
        _ps["pending"][rank] = grads
        if len(_ps["pending"]) == _ps["world"]:
            ranks = sorted(_ps["pending"])
            for i, p in enumerate(_ps["params"]):
                g = _ps["pending"][ranks[0]][i].clone()
                for r in ranks[1:]:
                    g.add_(_ps["pending"][r][i])
                p.grad = g.div_(len(ranks))
            _ps["opt"].step()
            _ps["pending"] = {}
            _ps["step"] += 1
            _ps["cond"].notify_all()
        else:
            _ps["cond"].wait_for(lambda: _ps["step"] != step)
        return _ps["params"]


def _rpc_server(world: int, port: int, millions: int, conn: Connection) -> None:
    _env(port)
    import torch
    import torch.distributed.rpc as rpc

    params = make_params(millions)
    _ps.update(params=params, opt=torch.optim.AdamW(params, lr=LR), cond=threading.Condition(), pending={}, step=0, world=world)
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=max(16, 2 * world))
    rpc.init_rpc("ps", rank=0, world_size=world + 1, rpc_backend_options=options)
    conn.send("ready")
    conn.recv()  # stop
    rpc.shutdown()


def _rpc_rank(rank: int, world: int, port: int, millions: int, conn: Connection) -> None:
    _env(port)
    import torch
    import torch.distributed.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4)
    rpc.init_rpc(f"rank{rank}", rank=rank + 1, world_size=world + 1, rpc_backend_options=options)
    params, grads = make_params(millions), make_grads(millions)

    def step() -> None:
        new = rpc.rpc_sync("ps", _ps_push, args=(rank, grads))
        with torch.no_grad():
            for p, q in zip(params, new, strict=True):
                p.copy_(q)

    conn.send("ready")
    _serve_commands(conn, step)
    rpc.shutdown()


# ------------------------------------------------------------------------------------------------ hosted
def _hosted_rank(rank: int, world: int, base: str, millions: int, conn: Connection) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from optim_client import RemoteOptimizer

    params, grads = make_params(millions), make_grads(millions)
    named = [(str(i), p) for i, p in enumerate(params)]
    opt = RemoteOptimizer(
        named,
        url=base,
        run="ddp-bench",
        optimizer="torch.AdamW",
        lr=LR,
        workers={"world_size": world},
        rank=rank,
        world_size=world,
    )

    def step() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    conn.send("ready")
    _serve_commands(conn, step)
    opt.close()


# ------------------------------------------------------------------------------------------------ the rounds
def _start(ctx: Any, target: Any, ranks: int, *args: Any) -> list[tuple[Any, Connection]]:
    out = []
    for rank in range(ranks):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=target, args=(rank, ranks, *args, theirs), daemon=True)
        proc.start()
        out.append((proc, mine))
    return out


def _round(ranks: list[tuple[Any, Connection]], steps: int) -> float:
    for _, conn in ranks:
        conn.send(("steps", steps))
    times = [conn.recv() for _, conn in ranks]
    return statistics.median(times[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--millions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    args = parser.parse_args(argv)

    from service.supervisor import ServiceProcess, free_port

    ctx = mp.get_context("spawn")
    systems: dict[str, list[tuple[Any, Connection]]] = {}
    with tempfile.TemporaryDirectory(prefix="optim-ddp-") as tmp:
        url = f"sqlite:///{tmp}/optim.db"
        server = ServiceProcess(env={"OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": tmp}, log=Path(tmp) / "server.log").start()
        ps_mine, ps_theirs = ctx.Pipe()
        rpc_port = free_port()
        ps = ctx.Process(target=_rpc_server, args=(args.ranks, rpc_port, args.millions, ps_theirs), daemon=True)
        ps.start()
        try:
            systems["ddp"] = _start(ctx, _ddp_rank, args.ranks, free_port(), args.millions)
            systems["rpc"] = _start(ctx, _rpc_rank, args.ranks, rpc_port, args.millions)
            systems["hosted"] = _start(ctx, _hosted_rank, args.ranks, server.base, args.millions)
            assert ps_mine.recv() == "ready"
            for ranks in systems.values():
                for _, conn in ranks:
                    assert conn.recv() == "ready"
            for ranks in systems.values():  # warm-up: allocations, connections, the first snapshot
                _round(ranks, 2)
            figures: dict[str, list[float]] = {name: [] for name in systems}
            for _ in range(args.rounds):
                for name, ranks in systems.items():  # A B C, A B C, ...
                    figures[name].append(_round(ranks, args.steps))
        finally:
            for ranks in systems.values():
                for proc, conn in ranks:
                    conn.send(("stop",))
                    proc.join(60)
            ps_mine.send("stop")
            ps.join(60)
            server.stop()
    print(f"{args.ranks} ranks x {args.millions}M AdamW parameters, {args.rounds} alternating rounds of {args.steps} steps")
    print(f"{'system':<8} {'median ms/step':>15} {'spread':>18}   ratio to ddp (per round)")
    ddp = figures["ddp"]
    for name, times in figures.items():
        ratios = [t / d for t, d in zip(times, ddp, strict=True)]
        print(
            f"{name:<8} {statistics.median(times) * 1e3:>15.1f} {min(times) * 1e3:>8.1f}-{max(times) * 1e3:<8.1f}"
            f"   {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
