"""What hosting the optimizer costs, measured against the in-process baseline in the same run.

    make bench                      # everything (~15 min on 2 vCPU)
    .venv/bin/python bench/run.py --quick --sections step transport

Every figure is the median of repeated runs with min and max; every ratio divides two figures
measured in this run on this machine. Prints tables and writes ``bench/results/latest.json``.
Sections: step (AdamW 1M/10M/50M, each store and durability), optimizers (SGD, Lamb, Adafactor,
Lion at 10M), transport (HTTP echo through the same server stack vs raw TCP echo), rpc (the
``torch.distributed.rpc`` parameter server), sustained (steps/s, 1 and 8 runs), snapshot (write
time, step latency while one is written), recovery (kill -9 to the first answered step, vs
``torch.save``/``torch.load``), memory (the server's peak per run against the state's bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import baselines  # noqa: E402
from baselines import make_grads, make_params  # noqa: E402
from echo import http_echo  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from servers import pg_available, service  # noqa: E402

from optim_client import RemoteOptimizer  # noqa: E402
from optim_client.transport import Transport  # noqa: E402

console = Console(width=160)
RESULTS: dict[str, Any] = {}
# the in-process baseline steps where the service steps: CUDA when present (the service's default), else CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STORES = [("sqlite", "database"), ("sqlite", "directory"), ("postgresql", "database"), ("postgresql", "directory")]
OFF = {"durability": "snapshot", "snapshot_every": 1_000_000}  # no log; no snapshot during the measurement


# ---------------------------------------------------------------------------------------------- helpers
def stats(times: list[float]) -> dict[str, float]:
    """Median, min and max in milliseconds."""
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


def fmt(s: dict[str, float]) -> str:
    return f"{s['median_ms']:.1f} ({s['min_ms']:.1f}–{s['max_ms']:.1f})"


def timed(
    step: Callable[[], Any], ps: list[torch.nn.Parameter], grads: list[torch.Tensor], repeats: int, warmup: int = 2
) -> list[float]:
    out = []
    for k in range(repeats + warmup):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        start = time.perf_counter()
        step()
        if ps[0].is_cuda:
            torch.cuda.synchronize()
        if k >= warmup:
            out.append(time.perf_counter() - start)
    return out


def in_process(name: str, impl: str, ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer a user would build in the training process (same hyper-parameters as the run)."""
    if name == "torch.AdamW":
        kwargs = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
        return torch.optim.AdamW(ps, lr=1e-3, **kwargs)
    import timm.optim

    return timm.optim.create_optimizer_v2(ps, opt=name, lr=1e-3, weight_decay=0.0)


def remote(
    url: str, ps: list[torch.nn.Parameter], name: str, impl: str, run: str | None = None, **policy: Any
) -> RemoteOptimizer:
    hyper: dict[str, Any] = {"implementation": impl} if impl != "default" else {}
    if name != "torch.AdamW":
        hyper["weight_decay"] = 0.0
    return RemoteOptimizer(
        [(str(i), p) for i, p in enumerate(ps)],
        url=url,
        run=run or f"bench-{uuid.uuid4().hex[:8]}",
        optimizer=name,
        lr=1e-3,
        groups={"filter_bias_and_bn": False},
        **hyper,
        **policy,
    )


def split(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each part of the step's time: client encode, network (round trip minus the service's own
    time), the service's receive / decode / step / log / encode, client write into the parameters."""
    parts: dict[str, list[float]] = {}
    for s in samples:
        server = s["server"]
        own = sum(v for k, v in server.items() if k != "receive")
        row = {"client_encode": s["encode"], **{f"server_{k}": v for k, v in server.items()}}
        row["network"] = s["round_trip"] - own - server.get("receive", 0.0)
        row["client_write"] = s["write"]
        for k, v in row.items():
            parts.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


@contextlib.contextmanager
def client_threads(n: int = 1) -> Iterator[None]:
    """The worker's side of a remote step only copies bytes: one thread, so that idle OpenMP threads of this
    process do not spin on the cores the service steps on (the in-process baseline keeps torch's default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def remote_steps(
    opt: RemoteOptimizer, ps: list[torch.nn.Parameter], grads: list[torch.Tensor], repeats: int, warmup: int = 2
) -> tuple[list[float], dict[str, float]]:
    samples: list[dict[str, Any]] = []

    def step() -> None:
        opt.step()
        samples.append(opt.last_timings)

    with client_threads():
        times = timed(step, ps, grads, repeats, warmup=warmup)
    return times, split(samples[warmup:])


def durable(repeats: int) -> dict[str, Any]:
    """A durable run measured in its steady state: past its first snapshot, which pruned the log behind it
    (the directory store then rewrites recycled files), and before its second."""
    return {"durability": "log", "snapshot_every": repeats + 3}


def steady_steps(
    opt: RemoteOptimizer, ps: list[torch.nn.Parameter], grads: list[torch.Tensor], repeats: int
) -> tuple[list[float], dict[str, float]]:
    """``repeats`` steps of a run made with ``durable(repeats)``: its first snapshot's steps, then a wait for
    that snapshot to land (the background write is not what this measures; the snapshot section does)."""
    every = repeats + 3
    with client_threads():
        timed(opt.step, ps, grads, every, warmup=0)
    deadline = time.monotonic() + 300
    while opt._http.request("GET", f"/runs/{opt.run}").json()["last_snapshot_t"] != every:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {opt.run}: no snapshot at t={every} after 300 s")
        time.sleep(0.05)
    return remote_steps(opt, ps, grads, repeats, warmup=0)


def stores() -> list[tuple[str, str]]:
    pg = pg_available()
    return [s for s in STORES if s[0] == "sqlite" or pg]


def show(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(*columns, title=title, title_justify="left")
    for r in rows:
        table.add_row(*r)
    console.print(table)


# ---------------------------------------------------------------------------------------------- sections
def section_step(args: argparse.Namespace) -> None:
    """AdamW at each size: in-process (default, fused) vs remote, durability off and on each store."""
    rows: list[dict[str, Any]] = []
    for millions in args.sizes:
        repeats = args.repeats if millions < 50 else max(3, args.repeats // 2)
        ps = make_params(millions)
        grads = make_grads(millions)
        base = {}
        for impl in ("default", "fused"):
            local = [p.detach().to(DEVICE, copy=True).requires_grad_() for p in ps]
            opt = in_process("torch.AdamW", impl, local)
            base[impl] = stats(timed(opt.step, local, [g.to(DEVICE) for g in grads], repeats))
            rows.append({"params_m": millions, "config": f"in-process, {impl}", "impl": impl, "time": base[impl], "ratio": 1.0})
        configs: list[tuple[str, str, str, bool, dict[str, Any]]] = []
        for db, store in stores():
            for impl in ("default", "fused") if (db, store) == ("sqlite", "database") else ("default",):
                if (db, store) == ("sqlite", "database"):
                    configs.append((db, store, impl, False, OFF))
                configs.append((db, store, impl, False, durable(repeats)))
        if millions == 10:  # bf16 on the wire: half the request's bytes
            configs += [("sqlite", "database", "default", True, OFF), ("sqlite", "directory", "default", True, durable(repeats))]
        for db, store, impl, bf16, policy in configs:
            with service(db, store) as srv:
                opt = remote(srv.base, ps, "torch.AdamW", impl, wire_dtype=torch.bfloat16 if bf16 else None, **policy)
                if policy is OFF:
                    times, parts = remote_steps(opt, ps, grads, repeats)
                else:
                    times, parts = steady_steps(opt, ps, grads, repeats)
                opt.close()
            label = "durability off" if policy is OFF else f"durable log, {db}, {store} blobs"
            s = stats(times)
            rows.append(
                {
                    "params_m": millions,
                    "config": f"{label}, {impl}" + (", bf16 wire" if bf16 else ""),
                    "impl": impl,
                    "wire": "bf16" if bf16 else "fp32",
                    "request_mb": sum(p.numel() for p in ps) * (2 if bf16 else 4) / 1e6,
                    "time": s,
                    "ratio": s["median_ms"] / base[impl]["median_ms"],
                    "split_ms": parts,
                }
            )
            console.print(f"  {millions}M {label}, {impl}: {fmt(s)} ms  x{rows[-1]['ratio']:.2f}", highlight=False)
    RESULTS["step"] = rows
    show(
        "AdamW step round trip (ms, median (min–max); ratio to in-process with the same implementation)",
        ["params", "config", "time", "ratio", "split (median ms)"],
        [
            [
                f"{r['params_m']}M",
                r["config"],
                fmt(r["time"]),
                f"{r['ratio']:.2f}",
                " ".join(f"{k}={v:.1f}" for k, v in r.get("split_ms", {}).items()),
            ]
            for r in rows
        ],
    )


def section_optimizers(args: argparse.Namespace) -> None:
    rows = []
    millions = 10
    ps = make_params(millions)
    grads = make_grads(millions)
    for name in ("sgd", "lamb", "adafactor", "lion"):
        local = [p.detach().to(DEVICE, copy=True).requires_grad_() for p in ps]
        base = stats(timed(in_process(name, "default", local).step, local, [g.to(DEVICE) for g in grads], args.repeats))
        row: dict[str, Any] = {"optimizer": name, "in_process": base}
        for label, policy, store in (
            ("off", OFF, "database"),
            ("durable", durable(args.repeats), args.store),
        ):
            with service("sqlite", store) as srv:
                opt = remote(srv.base, ps, name, "default", **policy)
                steps = remote_steps if policy is OFF else steady_steps
                times, _ = steps(opt, ps, grads, args.repeats)
                opt.close()
            row[label] = stats(times)
        rows.append(row)
        console.print(f"  {name}: in-process {fmt(base)}, off {fmt(row['off'])}, durable {fmt(row['durable'])}", highlight=False)
    RESULTS["optimizers"] = rows
    show(
        f"Other optimizers at {millions}M (ms; durable = SQLite, {args.store} blobs)",
        ["optimizer", "in-process", "durability off", "ratio", "durable", "ratio"],
        [
            [
                r["optimizer"],
                fmt(r["in_process"]),
                fmt(r["off"]),
                f"{r['off']['median_ms'] / r['in_process']['median_ms']:.2f}",
                fmt(r["durable"]),
                f"{r['durable']['median_ms'] / r['in_process']['median_ms']:.2f}",
            ]
            for r in rows
        ],
    )


def section_transport(args: argparse.Namespace) -> None:
    """The service's HTTP stack against raw TCP. A request/response server receives the whole body before it
    answers, so the like-for-like floor is a store-and-forward TCP echo; the streaming echo (full duplex) is shown
    too: it is what moving the bytes costs when nothing waits for the whole body."""
    rows = []
    for mb in (1, 10, 40, 100, 200):
        n = mb * 1_000_000
        repeats = args.repeats if mb <= 40 else max(3, args.repeats // 2)
        store = stats(baselines.tcp_echo(n, repeats, store=True))
        stream = stats(baselines.tcp_echo(n, repeats))
        http = stats(http_echo(n, repeats))
        rows.append(
            {
                "mb": mb,
                "tcp_echo": store,
                "tcp_stream": stream,
                "http_echo": http,
                "ratio": http["median_ms"] / store["median_ms"],
            }
        )
    RESULTS["transport"] = rows
    show(
        "Echo of N MB each way over loopback (ms): the service's HTTP stack and client vs raw TCP",
        ["MB", "TCP, store and forward", "TCP, streaming", "HTTP echo", "HTTP / TCP s&f", "HTTP MB/s each way"],
        [
            [
                str(r["mb"]),
                fmt(r["tcp_echo"]),
                fmt(r["tcp_stream"]),
                fmt(r["http_echo"]),
                f"{r['ratio']:.2f}",
                f"{r['mb'] / r['http_echo']['median_ms'] * 1e3:.0f}",
            ]
            for r in rows
        ],
    )


def section_rpc(args: argparse.Namespace) -> None:
    rows = []
    for impl in ("default", "fused"):
        for transport in ("tcp", "shm"):
            s = stats(baselines.rpc_peer(10, optimizer="adamw", impl=impl, transport=transport, repeats=args.repeats))
            rows.append({"impl": impl, "transport": transport, "time": s})
    RESULTS["rpc"] = rows
    ours = {(r["impl"], r["config"]): r["time"] for r in RESULTS.get("step", []) if r["params_m"] == 10}
    table = []
    for r in rows:
        off = next((v for (i, c), v in ours.items() if i == r["impl"] and c.startswith("durability off")), None)
        durable = [v for (i, c), v in ours.items() if i == r["impl"] and c.startswith("durable log")]
        best = min(durable, key=lambda v: v["median_ms"]) if durable else None
        table.append(
            [
                r["impl"],
                r["transport"],
                fmt(r["time"]),
                f"{off['median_ms'] / r['time']['median_ms']:.2f}" if off else "-",
                f"{best['median_ms'] / r['time']['median_ms']:.2f}" if best else "-",
            ]
        )
    show(
        "torch.distributed.rpc parameter server, AdamW 10M (ms); ratios: the service at 10M (step section) / the peer",
        ["impl", "TensorPipe", "peer", "off / peer", "best durable / peer"],
        table,
    )


def _sustained_worker(url: str, millions: int, seconds: float, out: Any) -> None:
    torch.set_num_threads(1)
    ps = make_params(millions)
    grads = make_grads(millions)
    opt = remote(url, ps, "torch.AdamW", "default", durability="log", snapshot_every=100)
    for p, g in zip(ps, grads, strict=True):
        p.grad = g
    opt.step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        opt.step()
        count += 1
    out.put(count / (time.perf_counter() - start))
    opt.close()


def section_sustained(args: argparse.Namespace) -> None:
    rows = []
    ctx = mp.get_context("spawn")
    for runs in (1, 8):
        with service("sqlite", args.store) as srv:
            queue = ctx.Queue()
            procs = [ctx.Process(target=_sustained_worker, args=(srv.base, 1, args.seconds, queue)) for _ in range(runs)]
            for p in procs:
                p.start()
            rates = [queue.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
        rows.append({"runs": runs, "params_m": 1, "steps_per_s_total": sum(rates), "per_run": rates})
    RESULTS["sustained"] = rows
    show(
        f"Sustained steps/s, AdamW 1M per run, durable log (SQLite, {args.store} blobs, snapshot every 100), "
        f"{args.seconds:.0f} s",
        ["runs", "steps/s (all runs)", "per run (min–max)"],
        [[str(r["runs"]), f"{r['steps_per_s_total']:.1f}", f"{min(r['per_run']):.1f}–{max(r['per_run']):.1f}"] for r in rows],
    )


def section_snapshot(args: argparse.Namespace) -> None:
    rows = []
    millions = 10
    ps = make_params(millions)
    grads = make_grads(millions)
    with service("sqlite", args.store) as srv:
        # both runs in their steady state (past a snapshot that pruned the log: the directory store then rewrites
        # recycled files, as in a long run, where a run that never snapshots would create a new file every step)
        quiet = remote(srv.base, ps, "torch.AdamW", "default", **durable(args.repeats * 2))
        quiet_times, quiet_split = steady_steps(quiet, ps, grads, args.repeats * 2)
        # a snapshot every 2 steps: one is being written during almost every step (one at a time per run)
        busy = remote(srv.base, ps, "torch.AdamW", "default", durability="log", snapshot_every=2)
        busy_times, busy_split = remote_steps(busy, ps, grads, args.repeats * 2)
        writes = []
        for k in range(max(3, args.repeats // 2)):
            start = time.perf_counter()
            busy.checkpoint(f"c{k}")  # digest + blob write from the live state, as a snapshot from its capture, in the request
            writes.append(time.perf_counter() - start)
        quiet.close()
        busy.close()
    state_mb = 3 * 4 * millions
    rows = {
        "params_m": millions,
        "state_mb": state_mb,
        "write": stats(writes),
        "step_quiet": stats(quiet_times),
        "step_during_snapshots": stats(busy_times),
        "rise": statistics.median(busy_times) / statistics.median(quiet_times) - 1,
        "split_quiet": quiet_split,
        "split_during_snapshots": busy_split,
    }
    RESULTS["snapshot"] = rows
    show(
        f"Snapshots, AdamW {millions}M ({state_mb} MB of state), SQLite, {args.store} blobs (ms)",
        ["full snapshot write", "step, no snapshot", "step, snapshot being written", "rise"],
        [[fmt(rows["write"]), fmt(rows["step_quiet"]), fmt(rows["step_during_snapshots"]), f"{rows['rise'] * 100:+.0f}%"]],
    )
    show(
        "Where the rise goes: median ms of each part of a step (see the step section's split)",
        ["part", "no snapshot", "snapshot being written"],
        [[k, f"{v:.1f}", f"{busy_split.get(k, 0.0):.1f}"] for k, v in quiet_split.items()],
    )


OUTAGES = {
    "serving process": "the serving process killed; its parent forks another (OPTIM_RESTART_AFTER_CRASH, the default)",
    "whole service": "the service killed and started again at once (a cold start: imports, then recovery)",
}


def _outage(srv: Any, how: str) -> float:
    """Kill the server as ``how`` says and return when a process answers again."""
    if how == "serving process":
        srv.kill_serving()
    else:
        srv.kill()
        srv.start()
    return time.perf_counter()


def section_recovery(args: argparse.Namespace) -> None:
    rows = []
    for millions in args.recovery_sizes:
        ps = make_params(millions)
        grads = make_grads(millions)
        state = {}
        for i, p in enumerate(ps):
            state[f"p{i}"] = p.detach()
            state[f"exp_avg{i}"] = torch.zeros_like(p)
            state[f"exp_avg_sq{i}"] = torch.ones_like(p)
        with tempfile.TemporaryDirectory() as tmp:
            saves, loads = baselines.torch_save_load(state, str(Path(tmp) / "state.pt"), repeats=3)
        # the floor of a recovery that replays the log: loading the state, then each logged step applied again
        local = stats(timed(in_process("torch.AdamW", "default", ps).step, ps, grads, 5))
        logged = 10
        floor = statistics.median(loads) + (logged + 3) * local["median_ms"] / 1e3
        for how in OUTAGES:
            with service("sqlite", args.store) as srv:
                run = f"recovery-{millions}"
                opt = remote(srv.base, ps, "torch.AdamW", "default", run=run, durability="log", snapshot_every=20)
                timed(opt.step, ps, grads, 20 + logged, warmup=0)  # snapshot at 20 (background), then 10 logged steps
                time.sleep(2)  # let the snapshot land
                normal = stats(timed(opt.step, ps, grads, 3, warmup=0))
                t_before = opt.t
                opt.close()
                killed = time.perf_counter()
                started = _outage(srv, how)
                http = Transport(srv.base)
                http.request("GET", f"/runs/{run}/digest")  # the first request on its state: recovered here (snapshot + log)
                recovered = time.perf_counter()
                http.close()
                opt2 = remote(srv.base, ps, "torch.AdamW", "default", run=run, durability="log", snapshot_every=20)
                timed(opt2.step, ps, grads, 1, warmup=0)
                answered = time.perf_counter()
                assert opt2.t == t_before + 1, (opt2.t, t_before)
                opt2.close()
            rows.append(
                {
                    "params_m": millions,
                    "outage": how,
                    "logged_steps": logged + 3,
                    "kill_to_first_step_s": answered - killed,
                    "process_start_s": started - killed,
                    "first_step_after_start_s": answered - started,
                    "recovery_s": recovered - started,
                    "normal_step": normal,
                    "torch_save": stats(saves),
                    "torch_load": stats(loads),
                    "in_process_step": local,
                    "floor_s": floor,
                    "ratio_to_load": (recovered - started) / statistics.median(loads),
                    "ratio_to_floor": (recovered - started) / floor,
                }
            )
    RESULTS["recovery"] = rows
    show(
        "Recovery after kill -9 (durable log: snapshot + 13 logged steps replayed, timed as the run's first request after the "
        "restart); torch.save/torch.load of the same state (save includes fsync); the floor: torch.load + 13 in-process steps. "
        + "; ".join(f"{k}: {v}" for k, v in OUTAGES.items()),
        [
            "params",
            "killed",
            "kill → answered step",
            "process answers",
            "recovery",
            "torch.save",
            "torch.load",
            "recovery / load",
            "/ floor",
        ],
        [
            [
                f"{r['params_m']}M",
                r["outage"],
                f"{r['kill_to_first_step_s']:.2f} s",
                f"{r['process_start_s']:.2f} s",
                f"{r['recovery_s'] * 1e3:.0f} ms",
                fmt(r["torch_save"]),
                fmt(r["torch_load"]),
                f"{r['ratio_to_load']:.1f}",
                f"{r['ratio_to_floor']:.1f}",
            ]
            for r in rows
        ],
    )


def _rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def section_memory(args: argparse.Namespace) -> None:
    rows = []
    for millions in args.memory_sizes:
        ps = make_params(millions)
        grads = make_grads(millions)
        with service("sqlite", args.store) as srv:
            assert srv.proc is not None
            idle = _rss(srv.serving_pid, "VmRSS")
            opt = remote(srv.base, ps, "torch.AdamW", "default", durability="log", snapshot_every=5)
            timed(opt.step, ps, grads, 8, warmup=0)  # steps, a snapshot, more steps during it
            opt.checkpoint("m")
            peak = _rss(srv.serving_pid, "VmHWM")
            opt.close()
        state_bytes = 3 * 4 * sum(p.numel() for p in ps)
        rows.append(
            {
                "params_m": millions,
                "idle_rss_mb": idle / 1e6,
                "peak_rss_mb": peak / 1e6,
                "state_mb": state_bytes / 1e6,
                "ratio": (peak - idle) / state_bytes,
            }
        )
    RESULTS["memory"] = rows
    show(
        "Server memory: peak RSS above the idle process, per run, against the state's bytes (params + exp_avg + exp_avg_sq)",
        ["params", "idle RSS", "peak RSS", "state", "(peak − idle) / state"],
        [
            [
                f"{r['params_m']}M",
                f"{r['idle_rss_mb']:.0f} MB",
                f"{r['peak_rss_mb']:.0f} MB",
                f"{r['state_mb']:.0f} MB",
                f"{r['ratio']:.2f}",
            ]
            for r in rows
        ],
    )


def _median(row: dict[str, Any] | None, key: str = "time") -> float | None:
    return row[key]["median_ms"] if row else None


def targets() -> list[dict[str, Any]]:
    """Each target of the benchmark's issue next to what this run measured (only what its sections gave)."""
    out: list[dict[str, Any]] = []

    def add(what: str, measured: float | None, limit: float, unit: str = "x", lower_is_better: bool = True) -> None:
        if measured is not None:
            met = measured <= limit if lower_is_better else measured >= limit
            out.append({"target": what, "measured": measured, "limit": limit, "unit": unit, "met": met})

    step = [r for r in RESULTS.get("step", []) if r["params_m"] == 10]

    def find(prefix: str, impl: str, wire: str = "fp32") -> dict[str, Any] | None:
        rows = (r for r in step if r["config"].startswith(prefix) and r["impl"] == impl and r.get("wire", "fp32") == wire)
        return next(rows, None)

    peer = {(r["impl"], r["transport"]): r["time"]["median_ms"] for r in RESULTS.get("rpc", [])}
    echo40 = next((r["tcp_echo"]["median_ms"] for r in RESULTS.get("transport", []) if r["mb"] == 40), None)
    for impl in ("default", "fused"):
        off, local = _median(find("durability off", impl)), _median(find("in-process", impl))
        if off and (impl, "tcp") in peer:
            add(f"10M AdamW ({impl}), durability off / RPC peer over TCP", off / peer[(impl, "tcp")], 1.0)
        if off and local and echo40:
            add(f"10M AdamW ({impl}), durability off / (in-process step + TCP echo of 40 MB)", off / (local + echo40), 1.3)
    durables = [r for r in step if r["config"].startswith("durable log") and r["impl"] == "default" and r.get("wire") == "fp32"]
    if durables and ("default", "tcp") in peer:
        best = min(durables, key=lambda r: r["time"]["median_ms"])
        add(f"10M AdamW, durable ({best['config']}) / RPC peer over TCP", _median(best) / peer[("default", "tcp")], 1.3)
    for r in RESULTS.get("transport", []):
        add(f"HTTP echo / TCP echo, {r['mb']} MB", r["ratio"], 1.5)
    off32, off16 = _median(find("durability off", "default")), _median(find("durability off", "default", "bf16"))
    if off32 and off16:
        add("10M AdamW, durability off: bf16 wire / fp32 wire step time", off16 / off32, 0.75)
    if "snapshot" in RESULTS:
        add("step latency rise while a snapshot is written", RESULTS["snapshot"]["rise"] * 100, 10.0, "%")
    for r in RESULTS.get("recovery", []):
        if r["params_m"] == 10 and r["outage"] == "serving process":
            add("recovery of 10M AdamW (snapshot + logged steps) / its floor", r["ratio_to_floor"], 1.5)
        if r["params_m"] == 10:
            add(f"kill -9 ({r['outage']}) → next answered step, 10M AdamW", r["kill_to_first_step_s"], 3.0, " s")
    for r in RESULTS.get("memory", []):
        add(f"server peak memory per run / state bytes, {r['params_m']}M", r["ratio"], 1.5)
    return out


def _met(row: dict[str, Any], no: str) -> str:
    return "yes" if row["met"] else no


def show_targets() -> None:
    rows = targets()
    RESULTS["targets"] = rows
    show(
        "Targets (issue #6) against this run",
        ["target", "measured", "limit", "met"],
        [[r["target"], f"{r['measured']:.2f}{r['unit']}", f"{r['limit']:.2f}{r['unit']}", _met(r, "NO")] for r in rows],
    )


def markdown() -> str:
    """The README's tables: the main figures of this run, with the machine they came from."""
    m = RESULTS["machine"]
    lines = [
        f"Measured {m['date']} on {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, "
        f"{'CUDA' if m['cuda'] else 'no GPU'} (`make bench`; medians, min–max in `bench/results/latest.json`).",
        "",
    ]
    if "step" in RESULTS:
        lines += ["| params | configuration | step, ms (min–max) | × in-process |", "|---|---|---|---|"]
        lines += [f"| {r['params_m']}M | {r['config']} | {fmt(r['time'])} | {r['ratio']:.2f} |" for r in RESULTS["step"]]
        lines.append("")
    if "rpc" in RESULTS:
        lines += ["| `torch.distributed.rpc` peer, AdamW 10M | ms (min–max) |", "|---|---|"]
        lines += [f"| {r['impl']}, TensorPipe {r['transport']} | {fmt(r['time'])} |" for r in RESULTS["rpc"]]
        lines.append("")
    if "targets" in RESULTS:
        lines += ["| target | measured | limit | met |", "|---|---|---|---|"]
        lines += [
            f"| {r['target']} | {r['measured']:.2f}{r['unit']} | {r['limit']:.2f}{r['unit']} | {_met(r, '**no**')} |"
            for r in RESULTS["targets"]
        ]
    return "\n".join(lines) + "\n"


SECTIONS = {
    "step": section_step,
    "optimizers": section_optimizers,
    "transport": section_transport,
    "rpc": section_rpc,
    "sustained": section_sustained,
    "snapshot": section_snapshot,
    "recovery": section_recovery,
    "memory": section_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50], help="millions of float32 parameters (step)")
    parser.add_argument("--recovery-sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each sustained run")
    parser.add_argument("--store", choices=["database", "directory"], default="database", help="blob store of the other sections")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.recovery_sizes, args.memory_sizes = [1], [1], [1]
        args.repeats, args.seconds = 3, 3.0
    # the in-process baseline runs with torch's default threads, as in a user's process; the service
    # steps with its own default threads while the worker waits for the answer
    RESULTS["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    console.print(
        f"[bold]optim-service benchmark[/bold] on {RESULTS['machine']['platform']}, {os.cpu_count()} CPUs", highlight=False
    )
    for name in args.sections:
        console.rule(name)
        start = time.perf_counter()
        SECTIONS[name](args)
        RESULTS.setdefault("seconds", {})[name] = time.perf_counter() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(RESULTS, indent=2))
    show_targets()
    args.out.write_text(json.dumps(RESULTS, indent=2))
    args.out.with_suffix(".md").write_text(markdown())
    console.print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
