"""One worker, side by side: AdamW over M float32 parameters (100 tensors), stepped the ways a PyTorch user could.

    python bench/side_by_side.py [--millions 10] [--rounds 8] [--steps 8]
    python bench/side_by_side.py --plot 1 10 30 100 [--rounds 4] [--steps 4]

- **in-process**: ``torch.optim.AdamW.step()`` in the worker: the floor, nothing moved;
- **peer**: the parameter server a PyTorch user would write with ``torch.distributed.rpc`` (TensorPipe on
  loopback): the worker sends its gradients, the server steps one AdamW and answers the parameters;
- **off**: optim-service, a run with ``durability="snapshot"`` (nothing logged per step);
- **default**: optim-service as ``make serve`` runs it: the durable step log on SQLite, ``OPTIM_BLOB_STORE=auto``
  (files beside the database), every other setting at its default (the recovery target's snapshots included);
- **db blobs**: the same server with ``OPTIM_BLOB_STORE=database``.

Every system's processes live for the whole benchmark and the systems take turns, round after round
(A B C D E, A B C D E ...), so that each ratio compares figures taken in the same minutes on this shared machine.
The figure of a round is the median of its steps' times; the table gives the median over rounds, their spread,
and the ratio to the peer (median of the per-round ratios, and their spread). The gradients are synthetic and
the same every step (``baselines.make_grads``): what is measured is moving them and the parameters, and the
step. The peer and the service both step on every core of the machine; the in-process floor does too.

``--plot`` runs a shorter alternation of in-process, peer, off and default at each size and draws step time
against parameters (log-log) into ``bench/results/step_vs_params.png``; every run writes its figures to
``bench/results/side_by_side.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from baselines import make_grads, make_params  # noqa: E402
from ddp import _env, _serve_commands  # noqa: E402

LR = 1e-3
RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("in-process", "peer", "off", "default", "db blobs")
PLOTTED = ("in-process", "peer", "off", "default")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _step_with(opt: Any, params: list[Any], grads: list[Any]) -> None:
    """A worker's step: the same gradients into ``.grad``, then the optimizer (in-process or remote)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()


# ------------------------------------------------------------------------------------------------ in-process
def _in_process(millions: int, conn: Connection) -> None:
    import torch

    torch.set_num_threads(_cores())
    params, grads = make_params(millions), make_grads(millions)
    opt = torch.optim.AdamW(params, lr=LR)

    conn.send("ready")
    _serve_commands(conn, functools.partial(_step_with, opt, params, grads))


# ------------------------------------------------------------------------------------------------ peer
_ps: dict[str, Any] = {}


def _ps_step(grads: list[Any]) -> list[Any]:
    """On the parameter server: one worker's gradients, one AdamW step, the new parameters."""
    for p, g in zip(_ps["params"], grads, strict=True):
        p.grad = g
    _ps["opt"].step()
    return _ps["params"]


def _peer_server(port: int, millions: int, conn: Connection) -> None:
    _env(port)
    import torch
    import torch.distributed.rpc as rpc

    torch.set_num_threads(_cores())
    params = make_params(millions)
    _ps.update(params=params, opt=torch.optim.AdamW(params, lr=LR))
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4)
    rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=options)
    conn.send("ready")
    conn.recv()  # stop
    rpc.shutdown()


def _peer_worker(port: int, millions: int, conn: Connection) -> None:
    _env(port)
    import torch
    import torch.distributed.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4)
    rpc.init_rpc("worker", rank=1, world_size=2, rpc_backend_options=options)
    params, grads = make_params(millions), make_grads(millions)

    def step() -> None:
        new = rpc.rpc_sync("ps", _ps_step, args=(grads,))
        with torch.no_grad():
            for p, q in zip(params, new, strict=True):
                p.copy_(q)

    conn.send("ready")
    _serve_commands(conn, step)
    rpc.shutdown()


# ------------------------------------------------------------------------------------------------ hosted
def _hosted(base: str, run: str, durability: str, millions: int, conn: Connection) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from optim_client import RemoteOptimizer

    params, grads = make_params(millions), make_grads(millions)
    named = [(str(i), p) for i, p in enumerate(params)]
    opt = RemoteOptimizer(named, url=base, run=run, optimizer="torch.AdamW", lr=LR, durability=durability)

    phases: list[dict[str, float]] = []

    def step() -> None:
        _step_with(opt, params, grads)
        timings = opt.last_timings
        phases.append({**{k: v for k, v in timings.items() if k != "server"}, **timings["server"]})

    conn.send("ready")
    _serve_commands(conn, step)
    opt.close()
    # where a step's time goes (the worker's encode and round trip, the service's Server-Timing), median per phase
    medians = {k: round(statistics.median(p.get(k, 0.0) for p in phases), 2) for k in phases[-1]} if phases else {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"phases-{run}.json").write_text(json.dumps(medians))


# ------------------------------------------------------------------------------------------------ the rounds
def _round(conn: Connection, steps: int) -> float:
    conn.send(("steps", steps))
    return statistics.median(conn.recv())


def alternate(millions: int, systems: tuple[str, ...], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Each system's per-round median step time (seconds), the systems taking turns round after round."""
    from service.supervisor import ServiceProcess, free_port

    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    conns: dict[str, Connection] = {}
    servers: list[Any] = []

    def start(target: Any, *args: Any) -> Connection:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
        proc.start()
        procs.append((proc, mine))
        return mine

    with tempfile.TemporaryDirectory(prefix="optim-sbs-") as tmp:
        try:
            bases: dict[str, str] = {}
            for store in ("auto", "database"):
                if store == "database" and "db blobs" not in systems:
                    continue
                data = Path(tmp) / store
                data.mkdir()
                env = {"OPTIM_DATABASE_URL": f"sqlite:///{data}/optim.db", "OPTIM_DATA_DIR": str(data)}
                if store != "auto":
                    env["OPTIM_BLOB_STORE"] = store
                servers.append(ServiceProcess(env=env, log=data / "server.log").start())
                bases[store] = servers[-1].base
            ps_conn = None
            if "peer" in systems:
                port = free_port()
                ps_conn = start(_peer_server, port, millions)
                conns["peer"] = start(_peer_worker, port, millions)
            if "in-process" in systems:
                conns["in-process"] = start(_in_process, millions)
            if "off" in systems:
                conns["off"] = start(_hosted, bases["auto"], "off", "snapshot", millions)
            if "default" in systems:
                conns["default"] = start(_hosted, bases["auto"], "default", "log", millions)
            if "db blobs" in systems:
                conns["db blobs"] = start(_hosted, bases["database"], "db-blobs", "log", millions)
            for conn in ([ps_conn] if ps_conn else []) + list(conns.values()):
                assert conn.recv() == "ready"
            order = [name for name in systems if name in conns]
            for name in order:  # allocations, connections, the optimizer's state, a first snapshot
                _round(conns[name], warmup)
            figures: dict[str, list[float]] = {name: [] for name in order}
            for _ in range(rounds):
                for name in order:
                    figures[name].append(_round(conns[name], steps))
            return figures
        finally:
            for _, conn in procs:  # every loop (and the parameter server) ends on ("stop",)
                try:
                    conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
            for proc, _ in procs:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()
            for server in servers:
                server.stop()


def summarize(figures: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    peer = figures.get("peer")
    out = {}
    for name, times in figures.items():
        row = {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}
        if peer:
            ratios = [t / p for t, p in zip(times, peer, strict=True)]
            row |= {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        out[name] = row
    return out


def show(millions: int, rounds: int, steps: int, summary: dict[str, dict[str, float]]) -> None:
    print(f"\nAdamW, {millions}M float32 parameters in 100 tensors, {rounds} alternating rounds of {steps} steps")
    print(f"{'system':<12} {'median ms/step':>15} {'spread (rounds)':>20}   ratio to the peer (spread)")
    for name, row in summary.items():
        ratio = f"{row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})" if "ratio" in row else "-"
        print(f"{name:<12} {row['median_ms']:>15.1f} {row['min_ms']:>9.1f}-{row['max_ms']:<10.1f}   {ratio}")
    for run in ("off", "default", "db-blobs"):
        path = RESULTS / f"phases-{run}.json"
        if path.exists():
            print(f"  {run} phases (ms, median): " + ", ".join(f"{k} {v}" for k, v in json.loads(path.read_text()).items()))
            path.unlink()


def plot(by_size: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(by_size)
    for name in PLOTTED:
        xs = [m * 1e6 for m in sizes if name in by_size[m]]
        ys = [by_size[m][name]["median_ms"] for m in sizes if name in by_size[m]]
        lows = [by_size[m][name]["min_ms"] for m in sizes if name in by_size[m]]
        highs = [by_size[m][name]["max_ms"] for m in sizes if name in by_size[m]]
        ax.plot(xs, ys, marker="o", label=name)
        ax.fill_between(xs, lows, highs, alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (float32, 100 tensors)")
    ax.set_ylabel("ms per step (median of alternating rounds)")
    ax.set_title(f"AdamW, one worker: {platform.node()}, {_cores()} cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--millions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="steps per round")
    parser.add_argument("--warmup", type=int, default=6, help="steps of each system before the rounds")
    parser.add_argument("--plot", type=int, nargs="+", metavar="MILLIONS", help="sizes to draw step time against")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="which systems take turns")
    parser.add_argument("--out", type=Path, default=RESULTS / "side_by_side.json")
    args = parser.parse_args(argv)
    started = time.time()
    results: dict[str, Any] = {
        "machine": platform.node(),
        "cores": _cores(),
        "started": started,
        "args": vars(args) | {"out": str(args.out)},
    }
    if args.plot:
        by_size = {}
        for millions in args.plot:
            figures = alternate(millions, tuple(s for s in PLOTTED if s in args.systems), args.rounds, args.steps, args.warmup)
            by_size[millions] = summarize(figures)
            show(millions, args.rounds, args.steps, by_size[millions])
        results["by_size"] = {str(m): s for m, s in by_size.items()}
        plot(by_size, args.out.with_name("step_vs_params.png"))
    else:
        figures = alternate(args.millions, tuple(s for s in SYSTEMS if s in args.systems), args.rounds, args.steps, args.warmup)
        results["figures"] = figures
        results["summary"] = summarize(figures)
        show(args.millions, args.rounds, args.steps, results["summary"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
