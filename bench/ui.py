"""What the web view's polling costs the server, with ~50 runs.

    .venv/bin/python bench/ui.py                 # 50 runs, the watched one at 1000 steps, 20 polls of each kind (~3 min)
    .venv/bin/python bench/ui.py --runs 10 --steps 10 --watched-steps 200 --polls 5

A real server on a fresh SQLite database (blobs in files beside it) gets ``--runs`` runs (AdamW, a cosine
schedule, ``--steps`` steps with their loss, a checkpoint each); one of them, the page's, has ``--watched-steps``
and is stepped on between polls, as a live run is (its step's background work is let settle for 0.2 s first: the
page polls every 2 s). Then each kind of poll the page makes is repeated ``--polls`` times, as the page sends it
(``service/ui/static/run.js``, ``runs.js``): its requests' median wall time on this machine's loopback, min and
max, and the server process's CPU time per poll (``/proc/PID/stat``: what the poll costs the service, whatever
else the machine does).

- the runs list: ``GET /runs`` (every run, from the database);
- a run's page, nothing new: ``GET /runs/{run}`` (t did not move: the page asks nothing more);
- a run's page after a step: that, and the history downsampled to the charts' width (``points``);
- at most every 10 s, and after an action: also the LR ahead (``schedule/preview``) and the checkpoints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from servers import service  # noqa: E402

POINTS = 640  # the loss chart's width in CSS pixels at a 1360 px wide window: the page's points=
SCHEDULE_END = 5000  # the cosine's num_epochs: the page previews to the schedule's end (at most 5000 steps)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def create(client: httpx.Client, name: str) -> None:
    width = 64
    run = {
        "name": name,
        "params": {"w": [[0.01 * (i + j) for j in range(width)] for i in range(width)], "b": [0.0] * width},
        "spec": {
            "params": [{"name": "w", "shape": [width, width]}, {"name": "b", "shape": [width]}],
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
            "param_groups": {"filter_bias_and_bn": True},
            "scheduler": {"name": "cosine", "num_epochs": SCHEDULE_END, "warmup_epochs": 50},
        },
    }
    r = client.post("/runs", json=run)
    r.raise_for_status()


def step(client: httpx.Client, name: str, t: int) -> None:
    grads = {"w": [[((i * 7 + j + t) % 13 - 6) * 1e-2 for j in range(64)] for i in range(64)], "b": [1e-3 * t] * 64}
    loss = 1.0 / (1 + 0.01 * t)
    r = client.post(f"/runs/{name}/step", params={"t": t, "loss": loss, "return": "none"}, json={"grads": grads})
    r.raise_for_status()


def measure(pid: int, polls: int, poll: Callable[[], list[float]], between: Callable[[], None] | None = None) -> dict[str, Any]:
    """``poll()`` ``polls`` times: each request's wall times, the whole poll's, and the server's CPU per poll."""
    per_request: list[list[float]] = []
    totals, cpu = [], 0.0
    for _ in range(polls):
        if between is not None:
            between()
        before = cpu_seconds(pid)
        start = time.perf_counter()
        times = poll()
        totals.append(time.perf_counter() - start)
        cpu += cpu_seconds(pid) - before
        per_request.append(times)
    columns = list(zip(*per_request, strict=True))
    return {
        "requests": [statistics.median(c) * 1e3 for c in columns],
        "median_ms": statistics.median(totals) * 1e3,
        "min_ms": min(totals) * 1e3,
        "max_ms": max(totals) * 1e3,
        "server_cpu_ms": cpu / polls * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20, help="steps of each run (history rows)")
    parser.add_argument("--watched-steps", type=int, default=1000, help="steps of the run whose page polls")
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()

    with service("sqlite", "directory") as server, httpx.Client(base_url=server.base, timeout=120) as client:
        assert server.proc is not None
        pid = server.serving_pid
        names = [f"run-{i:03d}" for i in range(args.runs)]
        setup = time.perf_counter()
        for i, name in enumerate(names):
            create(client, name)
            for t in range(args.watched_steps if i == 0 else args.steps):
                step(client, name, t)
            client.post(f"/runs/{name}/checkpoints", json={"name": "ckpt"}).raise_for_status()
        print(f"{args.runs} runs set up in {time.perf_counter() - setup:.0f} s")
        watched = names[0]
        t = client.get(f"/runs/{watched}").json()["t"]

        def timed(method: str, path: str, **params: Any) -> float:
            start = time.perf_counter()
            r = client.request(method, path, params=params or None)
            r.raise_for_status()
            return time.perf_counter() - start

        def one_step() -> None:
            nonlocal t
            step(client, watched, t)
            t += 1
            time.sleep(0.2)

        def history() -> float:
            return timed("GET", f"/runs/{watched}/history", start=0, stop=t, points=POINTS)

        ahead = min(5000, max(50, SCHEDULE_END - t))
        kinds = {
            "runs list (GET /runs)": (lambda: [timed("GET", "/runs")], None, ["GET /runs"]),
            "run page, t unchanged": (lambda: [timed("GET", f"/runs/{watched}")], None, ["GET /runs/{run}"]),
            "run page, after a step": (
                lambda: [timed("GET", f"/runs/{watched}"), history()],
                one_step,
                ["GET /runs/{run}", f"history points={POINTS}"],
            ),
            "run page, after a step, with preview and checkpoints (every 10 s)": (
                lambda: [
                    timed("GET", f"/runs/{watched}"),
                    history(),
                    timed("GET", f"/runs/{watched}/schedule/preview", steps=ahead),
                    timed("GET", f"/runs/{watched}/checkpoints"),
                ],
                one_step,
                ["GET /runs/{run}", "history", f"preview steps={ahead}", "checkpoints"],
            ),
        }
        print(f"\n{args.polls} polls of each kind; {args.runs} runs; the watched run at t≈{t}; wall ms on loopback (median)")
        print("| poll | requests (median ms each) | poll, ms (min–max) | server CPU per poll, ms |\n|---|---|---|---|")
        for title, (poll, between, labels) in kinds.items():
            got = measure(pid, args.polls, poll, between)
            each = ", ".join(f"{label} {ms:.1f}" for label, ms in zip(labels, got["requests"], strict=True))
            spread = f"{got['median_ms']:.1f} ({got['min_ms']:.1f}–{got['max_ms']:.1f})"
            print(f"| {title} | {each} | {spread} | {got['server_cpu_ms']:.1f} |")


if __name__ == "__main__":
    main()
