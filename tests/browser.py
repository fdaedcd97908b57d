"""A real browser for the web view's tests: Playwright for Python driving Debian's ``chromium`` package.

Playwright's own browser download cannot be had here, so the browser is ``/usr/bin/chromium`` (``apt-get install
chromium``; ``.ci/run`` installs it when it is missing). Without it a test fails and says how to get it; only
outside CI, and only when ``OPTIM_SKIP_BROWSER=1`` says so, is it skipped instead (with that reason).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")


def require_chromium() -> Path:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it when it is missing)"
    if os.environ.get("OPTIM_SKIP_BROWSER") == "1" and os.environ.get("CI", "").lower() not in ("1", "true"):
        pytest.skip(f"{reason}; skipped because OPTIM_SKIP_BROWSER=1")
    pytest.fail(reason + " (set OPTIM_SKIP_BROWSER=1 to skip these tests outside CI)", pytrace=False)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    path = require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(path))
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watched:
    """A page, and what it did: every request (URL and headers), console errors, uncaught exceptions."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location.get('url', '')})")


def open_page(browser: Browser, *, width: int = 1360, height: int = 1000) -> Watched:
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    watched = Watched(page)
    page.on("request", lambda request: watched.requests.append(request))
    page.on("console", watched.console)
    page.on("pageerror", lambda exc: watched.errors.append(f"uncaught: {exc}"))
    return watched


def screenshot(page: Page, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
