"""The per-step history (issue 20): what reading and writing it costs.

1. ``GET /runs/{run}/history?points=1000`` over a 100,000-step run (its history written straight through the
   storage layer, not 100,000 HTTP steps), through a real server over HTTP: the median of 10, on SQLite and
   PostgreSQL; also one name, and the last 10,000 steps;
2. the commit of a step's record (its event row and run row, as ``journal.commit`` writes them) with and without
   the step's history (9 values), interleaved, median of 300 each;
3. the norms on a 10M-parameter AdamW step in this process (100 tensors of 100,000 float32): ``OPTIM_HISTORY_NORMS``
   off, cheap (gradient and parameter norms) and all (and the update norm), interleaved.

    python -m bench.history [--steps 100000] [--repeats 10] [--only norms|database]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optim_core.norms import measured
from service.allocator import tune
from service.settings import Settings
from service.storage import Database, make_engine
from service.supervisor import ServiceProcess

from .servers import database, pg_available

NAMES = ["loss", "lr/0", "lr/1", "grad_norm", "param_norm", "step_ms", "time", "acc", "val/loss"]


def _stats(times: list[float]) -> str:
    return f"{statistics.median(times):.1f} ({min(times):.1f}–{max(times):.1f})"


def _create_run(base: str) -> None:
    body = {"name": "long", "spec": {"params": [{"name": "w", "shape": [2]}], "optimizer": "adamw"}, "params": {"w": [1.0, 2.0]}}
    conn = http.client.HTTPConnection(base.split("//")[1])
    conn.request("POST", "/runs", json.dumps(body), {"Content-Type": "application/json"})
    assert conn.getresponse().status == 201
    conn.close()


def _write_history(db: Database, steps: int) -> int:
    """``steps`` steps' values of every name in ``NAMES``, in transactions of 1,000 steps; the run's id."""
    rng = np.random.default_rng(0)
    with db.read("bench") as repo:
        row = repo.run("local", "long")
        assert row is not None
        run_id = row.id
    for first in range(0, steps, 1000):
        values = rng.normal(size=(1000, len(NAMES)))
        rows = [(first + i, n, float(values[i, j])) for i in range(1000) for j, n in enumerate(NAMES)]
        with db.write("bench") as repo:
            repo.series.add(run_id, rows)
    with db.write("bench") as repo:
        repo.update_run(run_id, t=steps)
    return run_id


def _get(base: str, path: str, repeats: int) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection(base.split("//")[1])
    times, size = [], 0
    for _ in range(repeats + 1):  # the first warms the connection and the database's cache: not counted
        start = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        times.append((time.perf_counter() - start) * 1e3)
        assert r.status == 200, body[:300]
        size = len(body)
    conn.close()
    return times[1:], size


def _commit_cost(db: Database, run_id: int, repeats: int) -> dict[str, list[float]]:
    """One step's record committed as ``journal.commit`` does, without and with its history, interleaved."""
    out: dict[str, list[float]] = {"without": [], "with": []}
    seq, t = 10_000_000, 10_000_000
    for i in range(2 * repeats):
        kind = "with" if i % 2 else "without"
        seq, t = seq + 1, t + 1
        start = time.perf_counter()
        with db.write("bench") as repo:
            repo.add_event(run_id, seq=seq, kind="step", t=t, k=None, value=1.0, grad_digest="d", checksum="c", blob_key=None)
            if kind == "with":
                repo.series.add(run_id, [(t, n, 0.5) for n in NAMES])
            repo.update_run(run_id, t=t, seq=seq, lrs=[0.1, 0.1])
        out[kind].append((time.perf_counter() - start) * 1e3)
    return out


def section_database(kind: str, steps: int, repeats: int) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="optim-bench-") as tmp, database(kind, Path(tmp)) as url:
        server = ServiceProcess(env={"OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": tmp}, log=Path(tmp) / "server.log").start()
        db = Database(make_engine(Settings(database_url=url, data_dir=Path(tmp))))
        try:
            _create_run(server.base)
            start = time.perf_counter()
            run_id = _write_history(db, steps)
            print(f"[{kind}] wrote {steps:,} steps x {len(NAMES)} names in {time.perf_counter() - start:.1f} s")
            for what, query in (
                ("all names, points=1000", "points=1000"),
                ("loss, points=1000", "points=1000&names=loss"),
                (
                    "all names, last 10,000 steps, points=1000 (bucket 10: from the steps' rows)",
                    f"start={steps - 10_000}&points=1000",
                ),
            ):
                times, size = _get(server.base, f"/runs/long/history?{query}", repeats)
                rows.append([kind, what, _stats(times), f"{size / 1e3:.0f} kB"])
        finally:
            server.stop()
        cost = _commit_cost(db, run_id, 300)
        rows.append([kind, "a step's commit without its history", _stats(cost["without"]), ""])
        rows.append([kind, f"a step's commit with its history ({len(NAMES)} values)", _stats(cost["with"]), ""])
        db.close()
    return rows


def section_norms(rounds: int = 3, each: int = 15) -> list[list[str]]:
    tune()  # as the service does: each step's copies reuse warm memory
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(100_000)) for _ in range(100)]
    grads = [torch.randn(100_000) for _ in range(100)]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    times: dict[str, list[float]] = {"off": [], "cheap": [], "all": []}
    for _ in range(5):
        step()
    for _ in range(rounds):
        for mode in times:
            for _ in range(each):
                start = time.perf_counter()
                measured(step, grads, params, mode)  # type: ignore[arg-type]
                times[mode].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["off"])
    return [
        ["in-process", f"10M AdamW step, norms {mode}", _stats(ts), f"{statistics.median(ts) / base:.2f}x"]
        for mode, ts in times.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", choices=["norms", "database"], default=None)
    args = parser.parse_args(argv)
    rows: list[list[str]] = []
    if args.only != "database":  # first: after the database sections this process's heap slowed its steps 10x
        rows += section_norms()
    if args.only != "norms":
        for kind in ["sqlite"] + (["postgresql"] if pg_available() else []):
            rows += section_database(kind, args.steps, args.repeats)
    _show(["database", "what", "ms, median (min–max)", ""], rows)


def _show(columns: list[str], rows: list[list[str]], out: Callable[[str], Any] = print) -> None:
    out("| " + " | ".join(columns) + " |")
    out("|" + "---|" * len(columns))
    for row in rows:
        out("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
