"""The web view in a real browser (Debian's chromium driven by Playwright) against a real server on 127.0.0.1.

A worker trains 60 steps with its loss, a scheduler and a checkpoint at t=30; the run's page draws the 60 losses
and the LR ahead of t, rolls back to the checkpoint (after a confirmation), downloads its export and forks it. With
API keys on, the page asks for a key once and no URL it requests carries it. Screenshots go to the test's
``tmp_path`` (the path is printed); ``OPTIM_UI_SCREENSHOT=1`` also writes the README's, ``docs/ui-run.png``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from optim_client import RemoteOptimizer

from ..browser import Watched, chromium, open_page, require_chromium, screenshot
from ..server import Server, database

ROOT = Path(__file__).resolve().parents[2]
STEPS, CHECKPOINT_AT = 60, 30
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with run ``ui-demo``: 60 steps of AdamW (two groups: no weight decay for biases) with their losses and
    a scalar, a cosine schedule, checkpoint ``half`` at t=30."""
    require_chromium()
    tmp = tmp_path_factory.mktemp("ui")
    with database("sqlite", tmp) as url:
        server = Server(url, tmp, blob_store="directory", env={"OPTIM_HISTORY_NORMS": "all"}).start()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = RemoteOptimizer(
            model.named_parameters(),
            url=server.base,
            run="ui-demo",
            optimizer="adamw",
            lr=0.01,
            weight_decay=0.05,
            scheduler={"name": "cosine", "num_epochs": 200, "warmup_epochs": 10, "warmup_lr": 1e-4},
        )
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 6, generator=g), torch.randn(64, 3, generator=g)
        while opt.t < STEPS:
            if opt.t == CHECKPOINT_AT:
                opt.checkpoint("half")
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.log(accuracy=float((model(x).argmax(1) == y.argmax(1)).float().mean()))  # a worker's scalar
            opt.step(loss=loss)
        opt.close()
        yield server
        server.stop()


def _chart(watched: Watched, name: str) -> dict[str, Any]:
    return watched.page.evaluate("name => window.optimUI.charts[name]", name)


def _chart_width(watched: Watched) -> int:
    return int(watched.page.evaluate("Math.floor(document.querySelector('figure[data-chart=loss] .chart-body').clientWidth)"))


def _t_on_page(watched: Watched) -> int:
    return int(watched.page.locator("#run-t").inner_text())


def test_the_run_page_draws_the_run_and_acts_on_its_checkpoints(trained: Server, tmp_path: Path) -> None:
    api = trained.client()
    with chromium() as browser:
        w = open_page(browser)
        page = w.page
        page.goto(f"{trained.base}/ui")
        page.locator('tr[data-run="ui-demo"] a').click()
        page.wait_for_selector(f'figure[data-chart="loss"][data-points="{STEPS}"]', timeout=TIMEOUT_MS)
        assert _t_on_page(w) == STEPS

        # the loss series drawn is the run's 60 recorded losses, as the API tells them
        loss = _chart(w, "loss")
        assert loss["points"] == STEPS
        history = api.get("/runs/ui-demo/history", params={"start": 0, "stop": STEPS, "points": 1000, "names": "loss"}).json()
        assert loss["x"] == history["series"]["loss"]["t"]
        assert loss["lines"]["loss"]["values"] == pytest.approx(history["series"]["loss"]["mean"])
        for norm in ("grad_norm", "update_norm", "param_norm", "step_ms"):
            assert _chart(w, norm)["points"] == STEPS, norm
        scalars = _chart(w, "scalars")
        assert scalars["points"] == STEPS and list(scalars["lines"]) == ["accuracy"]
        # the LR: the past solid, the scheduler's preview dashed from t onwards, past it
        lr = page.locator('figure[data-chart="lr"]')
        assert int(lr.get_attribute("data-points") or 0) == STEPS
        assert int(lr.get_attribute("data-dashed-from") or -1) == STEPS
        assert int(lr.get_attribute("data-dashed-to") or 0) > STEPS
        drawn = _chart(w, "lr")["lines"]
        preview = api.get("/runs/ui-demo/schedule/preview", params={"steps": 5}).json()["lr"]
        for group in (0, 1):  # weight decay on, so biases are a group of their own
            assert drawn[f"group {group} ahead"]["dashed"] and not drawn[f"group {group}"]["dashed"]
            ahead = [v for v in drawn[f"group {group} ahead"]["values"] if v is not None]
            assert ahead[1] == pytest.approx(preview[0][group])
        screenshot(page, tmp_path / "run.png")

        # the history was asked for at the chart's width; polls of a run whose t does not move ask for nothing more
        asked = [r.url for r in w.requests if "/history?" in r.url]
        assert asked and all(f"points={_chart_width(w)}" in u for u in asked), asked
        before, polls = len(w.requests), page.evaluate("window.optimUI.polls")
        page.wait_for_function("n => window.optimUI.polls >= n + 2", arg=polls, timeout=TIMEOUT_MS)
        later = {r.url.removeprefix(trained.base) for r in w.requests[before:]}
        assert later == {"/runs/ui-demo"}, later
        # a hidden tab asks nothing; shown again, it polls at once
        page.evaluate("Object.defineProperty(document, 'hidden', {value: true, configurable: true})")
        before, polls = len(w.requests), page.evaluate("window.optimUI.polls")
        page.wait_for_timeout(4500)  # two poll intervals
        assert len(w.requests) == before and page.evaluate("window.optimUI.polls") == polls
        page.evaluate("delete document.hidden; document.dispatchEvent(new Event('visibilitychange'))")
        page.wait_for_function("n => window.optimUI.polls > n", arg=polls, timeout=500)
        if os.environ.get("OPTIM_UI_SCREENSHOT") == "1":
            page.screenshot(path=str(ROOT / "docs" / "ui-run.png"))
            print(f"screenshot: {ROOT / 'docs' / 'ui-run.png'}")

        row = page.locator('tr[data-checkpoint="half"]')
        # roll back: cancelled first (nothing changes), then confirmed
        row.locator('button[data-action="rollback"]').click()
        dialog = page.locator("#confirm-dialog")
        assert dialog.is_visible() and "t=30" in dialog.inner_text()
        page.locator("#confirm-cancel").click()
        assert not dialog.is_visible()
        assert api.get("/runs/ui-demo").json()["t"] == STEPS
        row.locator('button[data-action="rollback"]').click()
        page.locator("#confirm-ok").click()
        page.wait_for_function("t => document.querySelector('#run-t').textContent === String(t)", arg=CHECKPOINT_AT)
        assert api.get("/runs/ui-demo").json()["t"] == CHECKPOINT_AT
        page.wait_for_selector(f'figure[data-chart="loss"][data-points="{CHECKPOINT_AT}"]', timeout=TIMEOUT_MS)
        screenshot(page, tmp_path / "rolled-back.png")

        # export: a download of the checkpoint's .pt, the same bytes as the API's
        row.locator('button[data-action="export"]').click()
        with page.expect_download() as download:
            page.locator("#confirm-ok").click()
        got = Path(download.value.path()).read_bytes()
        assert download.value.suggested_filename == "ui-demo-half.pt"
        assert got == api.get("/runs/ui-demo/checkpoints/half/export").content

        # fork: a new run at the checkpoint, named in the dialog
        row.locator('button[data-action="fork"]').click()
        page.locator("#confirm-input").fill("ui-demo-forked")
        page.locator("#confirm-ok").click()
        page.locator("#fork-link").click()
        page.wait_for_function("() => document.querySelector('#run-name')?.textContent === 'ui-demo-forked'")
        page.wait_for_function("t => document.querySelector('#run-t')?.textContent === String(t)", arg=CHECKPOINT_AT)
        forked = api.get("/runs/ui-demo-forked").json()
        assert forked["t"] == CHECKPOINT_AT and forked["spec"] == api.get("/runs/ui-demo").json()["spec"]
        screenshot(page, tmp_path / "forked.png")

        page.goto(f"{trained.base}/ui")
        page.wait_for_selector('tr[data-run="ui-demo-forked"]')
        assert page.locator('tr[data-run="ui-demo"] td[data-field="t"]').inner_text() == str(CHECKPOINT_AT)
        screenshot(page, tmp_path / "runs.png")
        assert not w.errors, w.errors  # no script error, no request the policy refused


def _key(url: str, tmp: Path, tenant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", tenant],
        env={"OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": str(tmp), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_with_keys_on_the_page_asks_once_and_keeps_the_key_out_of_urls(tmp_path: Path) -> None:
    require_chromium()
    with database("sqlite", tmp_path) as url:
        key = _key(url, tmp_path, "alice")
        server = Server(url, tmp_path, env={"OPTIM_AUTH": "required"}).start()
        try:
            run = {
                "name": "alice-run",
                "params": {"w": [1.0, 2.0]},
                "spec": {"params": [{"name": "w", "shape": [2]}], "optimizer": {"name": "sgd", "lr": 0.1}},
            }
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.post(f"{server.base}/runs", json=run, headers=headers).status_code == 201
            with chromium() as browser:
                w = open_page(browser)
                page = w.page
                page.goto(f"{server.base}/ui")
                page.wait_for_selector("#key-dialog[open]")
                # a wrong key is refused and asked for again, with the service's reason
                page.locator("#key-input").fill("osk_wrong")
                page.locator("#key-submit").click()
                page.wait_for_selector("#key-error:not([hidden])")
                assert "unknown or revoked" in page.locator("#key-error").inner_text()
                page.locator("#key-input").fill(key)
                page.locator("#key-submit").click()
                page.wait_for_selector('tr[data-run="alice-run"]')
                assert not page.locator("#key-dialog").is_visible()
                # asked once: the page goes on polling, to another view and back, without asking again
                page.locator('tr[data-run="alice-run"] a').click()
                page.wait_for_function("() => document.querySelector('#run-t')?.textContent === '0'")
                page.reload()
                page.wait_for_function("() => document.querySelector('#run-t')?.textContent === '0'")
                assert not page.locator("#key-dialog").is_visible()
                assert page.evaluate("sessionStorage.getItem('optim-service-key')") == key
                assert page.evaluate("localStorage.length") == 0
                screenshot(page, tmp_path / "with-key.png")

            urls = [r.url for r in w.requests]
            assert not [u for u in urls if key in u or key[4:16] in u], urls
            api_calls = [r for r in w.requests if "/runs" in r.url and "/ui" not in r.url]
            assert api_calls, urls
            sent = [r.headers.get("authorization") for r in api_calls]
            assert f"Bearer {key}" in sent
            # the only errors: the two 401s that made the page ask (none of a script or the policy)
            assert all("401" in e for e in w.errors), w.errors
        finally:
            server.stop()
