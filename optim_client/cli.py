"""The client half of the ``optim-service`` command: runs and checkpoints of a running service."""

from __future__ import annotations

import json
from http.client import HTTPResponse
from typing import Any

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
    """Every run: t, epoch, LRs, durability."""
    table = Table("run", "t", "epoch", "lr", "durability", "last snapshot")
    for r in _get(url, token, "/runs")["runs"]:
        table.add_row(
            r["name"],
            str(r["t"]),
            str(r["epoch"]),
            ", ".join(_lr(x) for x in r["lr"] or []),
            r["durability"],
            str(r["last_snapshot_t"]),
        )
    console.print(table)


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
