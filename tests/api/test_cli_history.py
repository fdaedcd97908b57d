"""The terminal's view of a run (issue 20) against a real server: ``runs history`` draws the loss and the LRs,
``runs list`` shows steps/s and the last snapshot."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from optim_client import RemoteOptimizer
from service.cli import cli

from ..reference import make_model
from ..server import Server, database


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli-history")
    with database("sqlite", tmp) as url:
        srv = Server(url, tmp).start()
        yield srv
        srv.stop()


def test_history_and_list_in_the_terminal(server: Server) -> None:
    run = f"cli-{uuid.uuid4().hex[:8]}"
    model = make_model()
    scheduler = {"name": "cosine", "num_epochs": 30, "warmup_epochs": 3}
    opt = RemoteOptimizer(
        model.named_parameters(), url=server.base, run=run, lr=0.1, weight_decay=0.05, scheduler=scheduler, snapshot_every=10
    )
    losses = [10.0 - 0.25 * k for k in range(30)]
    for loss in losses:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(loss=loss)
    opt.close()
    runner = CliRunner()
    env = {"OPTIM_URL": server.base, "COLUMNS": "200"}
    drawn = runner.invoke(cli, ["runs", "history", run, "--width", "90"], env=env)
    assert drawn.exit_code == 0, drawn.output
    out = drawn.output
    assert f"run {run} at t=30" in out and "1 per point" in out
    assert "lr/0" in out and "lr/1" in out and "▚" in out  # the legend of the LR plot, and points drawn
    row = next(line for line in out.splitlines() if re.match(r"\s*│\s*loss\s*│", line))
    assert [float(x) for x in re.findall(r"-?\d+\.?\d*", row)[:3]] == [losses[-1], min(losses), max(losses)]

    listed = runner.invoke(cli, ["runs", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    line = next(line for line in listed.output.splitlines() if run in line)
    rate = re.search(r"│\s*(\d+\.\d)\s*│\s*log", line)
    assert rate is not None and float(rate.group(1)) > 0, line  # steps/s over its last steps
    assert "t=30" in line or "t=20" in line  # its last snapshot (the one at t=30 may still be being written)

    missing = runner.invoke(cli, ["runs", "history", "no-such-run"], env=env)
    assert missing.exit_code == 1 and "RunNotFound" in missing.output
