"""The client half of the ``optim-service`` command: runs and checkpoints of a running service."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from http.client import HTTPResponse
from typing import Any

import plotext
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from .transport import OptimServiceError, Transport, default_url

console = Console()
runs_app = typer.Typer(help="Runs of a running service.", no_args_is_help=True)
checkpoints_app = typer.Typer(help="Checkpoints of a run.", no_args_is_help=True)
URL = typer.Option(None, "--url", envvar="OPTIM_URL", help="The service (default http://127.0.0.1:8000).")
TOKEN = typer.Option(None, "--token", envvar="OPTIM_TOKEN", help="API key.")
SPARK = "▁▂▃▄▅▆▇█"


def _http(url: str | None, token: str | None) -> Transport:
    return Transport(url or default_url(), token=token, retry_deadline=5)


def _fail(exc: OptimServiceError) -> None:
    console.print(f"[red]{exc.error}[/red]: {exc.detail}")
    raise typer.Exit(1)


def _get(url: str | None, token: str | None, path: str, **params: Any) -> Any:
    try:
        return _http(url, token).request("GET", path, params=params or None).json()
    except OptimServiceError as exc:
        _fail(exc)


@runs_app.command("list")
def runs_list(url: str = URL, token: str = TOKEN) -> None:
    """Every run: t, epoch, LRs, steps/s (over its last 100 steps, from its history), durability, last snapshot."""
    table = Table("run", "t", "epoch", "lr", "steps/s", "durability", "last snapshot", "live")
    for r in _get(url, token, "/runs")["runs"]:
        snapshot = "none" if r["last_snapshot_t"] is None else f"t={r['last_snapshot_t']}"
        if r.get("last_snapshot_at"):
            snapshot += f", {_ago(r['last_snapshot_at'])}"
        table.add_row(
            r["name"],
            str(r["t"]),
            str(r["epoch"]),
            ", ".join(_lr(x) for x in r["lr"] or []),
            _rate(url, token, r["name"], r["t"]),
            r["durability"],
            snapshot,
            "yes" if r["live"] else "no",
        )
    console.print(table)


def _rate(url: str | None, token: str | None, run: str, t: int, last: int = 100) -> str:
    """Steps per second over the run's last ``last`` recorded steps (their wall times); "idle" when the last one is a
    minute old."""
    times = _get(url, token, f"/runs/{run}/history", start=max(0, t - last), names="time", points=last)["series"]["time"]
    if len(times["t"]) < 2:
        return "-"
    first, newest = times["min"][0], times["max"][-1]
    if first is None or newest is None or newest <= first:
        return "-"
    if time.time() - newest > 60:
        return "idle"
    return f"{(sum(times['count']) - 1) / (newest - first):.1f}"


def _ago(stamp: str) -> str:
    when = datetime.fromisoformat(stamp)
    if when.tzinfo is None:  # SQLite keeps no time zone: the service writes UTC
        when = when.replace(tzinfo=UTC)
    seconds = (datetime.now(UTC) - when).total_seconds()
    return (
        f"{seconds:.0f} s ago"
        if seconds < 120
        else f"{seconds / 60:.0f} min ago"
        if seconds < 7200
        else f"{seconds / 3600:.0f} h ago"
    )


@runs_app.command("history")
def runs_history(
    run: str,
    start: int = typer.Option(0, help="The first step."),
    stop: int = typer.Option(None, help="The step after the last (default: the run's t)."),
    width: int = typer.Option(80, help="Characters across."),
    height: int = typer.Option(15, help="Lines of each plot."),
    url: str = URL,
    token: str = TOKEN,
) -> None:
    """The run's loss and LR per group over its steps, drawn in the terminal (min and max of each bucket)."""
    params: dict[str, Any] = {"start": start, "points": max(10, width - 10)}
    if stop is not None:
        params["stop"] = stop
    answer = _get(url, token, f"/runs/{run}/history", **params)
    series = answer["series"]
    console.print(f"run {run} at t={answer['t']}: steps {answer['start']}..{answer['stop']}, {answer['bucket']} per point")
    for title, names in (("loss", ["loss"]), ("lr", sorted((n for n in series if n.startswith("lr/")), key=_group))):
        shown = [n for n in names if n in series and series[n]["t"]]
        if not shown:
            console.print(f"{title}: nothing recorded" + (" (send it: opt.step(loss=loss))" if title == "loss" else ""))
            continue
        typer.echo(curves(title, {n: series[n] for n in shown}, width, height))
    table = Table("series", "last", "min", "max")
    for name, s in series.items():
        values = [v for v in s["mean"] if v is not None]
        if values:
            low = min(v for v in s["min"] if v is not None)
            high = max(v for v in s["max"] if v is not None)
            table.add_row(name, f"{values[-1]:.4g}", f"{low:.4g}", f"{high:.4g}")
    console.print(table)


def _group(name: str) -> int:
    return int(name.split("/", 1)[1]) if name.split("/", 1)[1].isdigit() else 0


def curves(title: str, series: dict[str, dict[str, list[Any]]], width: int, height: int) -> str:
    """A plot of each series' mean (and, where buckets hold several steps, their min and max), without colours."""
    fig = plotext.figure
    fig.clear()
    plotext.terminal.limit(False, False)
    fig.plot_size(width, height)
    for name, s in series.items():
        points = [(t, v) for t, v in zip(s["t"], s["mean"], strict=True) if v is not None]
        if not points:
            continue
        fig.draw(fig.signal([t for t, _ in points], [v for _, v in points]).label(name))
        if any(c > 1 for c in s["count"]):
            for stat in ("min", "max"):
                kept = [(t, v) for t, v in zip(s["t"], s[stat], strict=True) if v is not None]
                fig.draw(fig.signal([t for t, _ in kept], [v for _, v in kept]).label(f"{name} {stat}"))
    fig.title(title)
    return str(fig.build().string(colorless=True))


@runs_app.command("show")
def runs_show(run: str, url: str = URL, token: str = TOKEN) -> None:
    """One run, with its spec."""
    console.print_json(json.dumps(_get(url, token, f"/runs/{run}")))


@runs_app.command("delete")
def runs_delete(run: str, url: str = URL, token: str = TOKEN, yes: bool = typer.Option(False, "--yes")) -> None:
    """Delete a run with its log, snapshots and checkpoints."""
    if not yes:
        typer.confirm(f"delete run {run!r} and its checkpoints?", abort=True)
    try:
        _http(url, token).request("DELETE", f"/runs/{run}")
    except OptimServiceError as exc:
        _fail(exc)
    console.print(f"deleted {run}")


def _lr(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    if hi == lo:
        return SPARK[3] * len(values)
    return "".join(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in values)


@runs_app.command("schedule")
def runs_schedule(
    run: str,
    steps: int = typer.Option(200, help="How far ahead."),
    width: int = typer.Option(60),
    url: str = URL,
    token: str = TOKEN,
) -> None:
    """The LR of each group now, and a small plot of the curve ahead."""
    now = _get(url, token, f"/runs/{run}/schedule")
    ahead = _get(url, token, f"/runs/{run}/schedule/preview", steps=steps)
    unit = "epoch" if ahead["interval"] == "epoch" else "step"
    table = Table("group", "lr now", f"next {steps} {unit}s (min … max)", "curve")
    every = max(1, len(ahead["lr"]) // width)
    for g, lr in enumerate(now["lr"]):
        curve = [row[g] for row in ahead["lr"] if row[g] is not None]
        if lr is None or not curve:  # an optimizer without one LR (timm's relative-step Adafactor)
            table.add_row(str(g), _lr(lr), "none: the optimizer sets its own step size", "")
            continue
        table.add_row(str(g), f"{lr:.4g}", f"{min(curve):.3g} … {max(curve):.3g}", sparkline(curve[::every]))
    console.print(f"run {run} at t={now['t']}, epoch {now['epoch']}")
    console.print(table)


@checkpoints_app.command("list")
def checkpoints_list(run: str, url: str = URL, token: str = TOKEN) -> None:
    table = Table("checkpoint", "t", "epoch", "size", "created")
    for c in _get(url, token, f"/runs/{run}/checkpoints")["checkpoints"]:
        table.add_row(c["name"], str(c["t"]), str(c["epoch"]), f"{c['size'] / 1e6:.1f} MB", str(c["created_at"]))
    console.print(table)


@checkpoints_app.command("export")
def checkpoints_export(run: str, name: str, path: str, url: str = URL, token: str = TOKEN) -> None:
    """Download a checkpoint as a .pt file for plain torch/timm, with a progress bar."""
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())

    def sink(r: HTTPResponse) -> None:
        total = int(r.headers.get("Content-Length", 0)) or None
        with Progress(*columns, console=console) as progress, open(path, "wb") as f:
            task = progress.add_task(name, total=total)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                progress.update(task, advance=len(chunk))

    try:
        _http(url, token).request("GET", f"/runs/{run}/checkpoints/{name}/export", sink=sink)
    except OptimServiceError as exc:
        _fail(exc)
    console.print(f"wrote {path}")
