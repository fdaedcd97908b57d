"""The app in this process: its lifespan and requests run on an event loop in a thread of their own (an anyio
portal), requests go through ``httpx.ASGITransport``, and tests call it like a server (``client().post(...)``).

Fast (no process to start, no port), and the same app: settings, a real database, the run registry, the threads.
What needs the real server stays in ``tests/api``: uvicorn's flow control (answers sent from the live
parameters), kill -9, the command line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from service.app import create_app
from service.runs import RunRegistry
from service.settings import Settings


class InProcessClient:
    """The part of ``httpx.Client`` the tests use, over the app's ASGI interface."""

    def __init__(self, portal: BlockingPortal, app: FastAPI, headers: dict[str, str] | None = None) -> None:
        self._portal = portal
        transport = httpx.ASGITransport(app=app)
        self._client = portal.call(lambda: _async_client(transport, headers))

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._portal.call(lambda: self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self._portal.call(self._client.aclose)

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _async_client(transport: httpx.ASGITransport, headers: dict[str, str] | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url="http://inprocess", headers=headers, timeout=60)


class InProcessServer:
    """``with InProcessServer(url, tmp, env) as server: server.client().get(...)``."""

    def __init__(self, url: str, data_dir: Path, *, host: str = "127.0.0.1", **settings: Any) -> None:
        self.settings = Settings(database_url=url, data_dir=data_dir, **settings)
        self.app = create_app(self.settings, host=host)
        self._stack = contextlib.ExitStack()
        self.portal: BlockingPortal | None = None

    def __enter__(self) -> InProcessServer:
        self.portal = self._stack.enter_context(start_blocking_portal())
        self._stack.enter_context(self.portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def registry(self) -> RunRegistry:
        return self.app.state.registry

    def client(self, headers: dict[str, str] | None = None) -> InProcessClient:
        assert self.portal is not None, "use the server as a context manager"
        return InProcessClient(self.portal, self.app, headers)


@contextlib.contextmanager
def serving(url: str, data_dir: Path, **settings: Any) -> Iterator[InProcessServer]:
    with InProcessServer(url, data_dir, **settings) as server:
        yield server
