"""The web view without a browser: /ui and its files served from the package with their content types and the
Content-Security-Policy, unknown paths 404, the files shipped as package data; the runs list's steps/s."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.routes.ui import CSP, static_files
from service.runs.live import Pace

from .. import browser
from ..server import database
from .inprocess import InProcessClient, InProcessServer

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "ui" / "static"
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("ui")
    with database("sqlite", tmp) as url, InProcessServer(url, tmp) as srv:
        yield srv


@pytest.fixture
def client(server: InProcessServer) -> Iterator[InProcessClient]:
    with server.client() as c:
        yield c


def _csp(value: str) -> dict[str, str]:
    return {part.split()[0]: part.strip() for part in value.split(";") if part.strip()}


def test_the_page_is_served_with_a_policy_that_allows_no_inline_script(client: InProcessClient) -> None:
    r = client.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    policy = _csp(r.headers["content-security-policy"])
    assert policy["script-src"] == "script-src 'self'" and policy["default-src"] == "default-src 'none'"
    assert not {"'unsafe-inline'", "'unsafe-eval'"} & set(r.headers["content-security-policy"].replace(";", " ").split())
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler would be refused by the policy"
    assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui"


def _references(client: InProcessClient) -> set[str]:
    """Every file the page loads: from index.html, then the modules' imports, transitively."""
    html = client.get("/ui").text
    todo = [u.removeprefix("/ui/static/") for u in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', html)]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.endswith(".js") and not path.startswith("vendor/"):
            source = client.get(f"/ui/static/{path}").text
            todo += [str(Path(path).parent / m).removeprefix("./") for m in re.findall(r'from "\./([^"]+)"', source)]
    return seen


def test_every_file_the_page_loads_is_served_with_its_type_and_the_policy(client: InProcessClient) -> None:
    loaded = _references(client)
    assert {"app.js", "api.js", "run.js", "runs.js", "charts.js", "style.css", "vendor/uplot/uPlot.iife.min.js"} <= loaded
    for path in sorted(loaded):
        r = client.get(f"/ui/static/{path}")
        assert r.status_code == 200, path
        assert r.headers["content-type"].split(";")[0] == TYPES[Path(path).suffix], path
        assert r.headers["content-security-policy"] == CSP
        assert r.content == (STATIC / path).read_bytes()
        again = client.get(f"/ui/static/{path}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content


@pytest.mark.parametrize(
    "path",
    ["nope.js", "../routes/ui.py", "..%2F__init__.py", "%2e%2e/%2e%2e/app.py", "vendor", "vendor/uplot", "APP.JS", "app.js/"],
)
def test_unknown_static_paths_are_404(client: InProcessClient, path: str) -> None:
    r = client.get(f"/ui/static/{path}")
    assert r.status_code == 404, (path, r.status_code)
    assert r.json()["error"] in {"StaticNotFound", "HTTPError"}


def test_the_files_are_package_data(tmp_path: Path) -> None:
    """A wheel of the project (what a non-editable install unpacks) holds every file of the view."""
    on_disk = {str(p.relative_to(STATIC)) for p in STATIC.rglob("*") if p.is_file()}
    assert set(static_files()) == on_disk
    # built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    source = tmp_path / "source"
    caches = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("optim_format", "optim_core", "schemas", "service", "optim_client"):
        shutil.copytree(ROOT / package, source / package, ignore=caches)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("optim_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = {p for p in on_disk if f"service/ui/static/{p}" not in names}
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "service/routes/ui.py" in names


def test_pace_counts_the_steps_of_the_last_window() -> None:
    pace = Pace(window=10.0)
    assert pace.rate(now=100.0) == 0.0
    for i in range(11):
        pace.tick(now=100.0 + i * 0.5)  # 2 steps/s for 5 s
    assert pace.rate(now=105.0) == pytest.approx(2.0)
    assert pace.rate(now=110.0) == pytest.approx(1.0)  # no step for 5 s: half the rate
    assert pace.rate(now=115.5) == 0.0  # all older than the window


def test_the_runs_list_says_steps_per_second_of_live_runs(tmp_path: Path) -> None:
    run = {
        "name": "paced",
        "params": {"w": [1.0, 2.0]},
        "spec": {"params": [{"name": "w", "shape": [2]}], "optimizer": {"name": "sgd", "lr": 0.1}},
    }
    with database("sqlite", tmp_path) as url:
        with InProcessServer(url, tmp_path) as srv, srv.client() as c:
            assert c.post("/runs", json=run).status_code == 201
            assert c.get("/runs").json()["runs"][0]["steps_per_s"] == 0.0  # in memory, not stepped yet
            for t in range(5):
                assert c.post("/runs/paced/step", params={"t": t, "return": "none"}, json={"grads": {"w": [1.0, 1.0]}}).is_success
            (listed,) = c.get("/runs").json()["runs"]
            assert listed["live"] and listed["steps_per_s"] > 0
            assert c.get("/runs/paced").json()["steps_per_s"] > 0
        with InProcessServer(url, tmp_path) as srv, srv.client() as c:
            (listed,) = c.get("/runs").json()["runs"]
            assert not listed["live"] and listed["steps_per_s"] is None and listed["t"] == 5


@pytest.mark.parametrize(
    ("env", "outcome"),
    [
        ({"CI": "true", "OPTIM_SKIP_BROWSER": "1"}, pytest.fail.Exception),  # CI: never skipped
        ({"OPTIM_SKIP_BROWSER": "1"}, pytest.skip.Exception),  # a developer who said so
        ({}, pytest.fail.Exception),  # nobody said so
    ],
)
def test_the_browser_tests_fail_without_chromium_unless_told_to_skip_outside_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    for name in ("CI", "OPTIM_SKIP_BROWSER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(outcome, match="apt-get install -y chromium"):
        browser.require_chromium()
