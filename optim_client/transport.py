"""HTTP to optim-service: retries with backoff until a deadline, bodies streamed in chunks.

Retrying a step is safe because the service applies each step exactly once. Bodies are sent as an
iterator of chunks with an explicit Content-Length: httpx re-copies a ``bytes`` body's unsent
remainder after every partial send, which grows with the square of the body (encode/httpcore#1029).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

log = logging.getLogger("optim_client")
CHUNK = 1 << 20
RETRY_STATUSES = {500, 502, 503, 504}


class OptimServiceError(RuntimeError):
    """The service said no: ``status``, ``error`` (its error name) and ``detail`` (what was wrong)."""

    def __init__(self, status: int, error: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.body = status, error, detail, dict(body or {})


def _chunks(data: bytes | memoryview) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), CHUNK):
        yield bytes(view[i : i + CHUNK])


class Transport:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 300.0, retry_deadline: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retry_deadline = retry_deadline

    def close(self) -> None:
        self.client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str = "application/octet-stream",
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
        passthrough: tuple[int, ...] = (),
        retry: bool = True,
    ) -> httpx.Response:
        """Send, retrying connection errors and 5xx with jittered backoff until the deadline
        (only requests that are safe to repeat: ``retry=False`` for the others)."""
        deadline = time.monotonic() + (self.retry_deadline if retry else 0)
        delay = 0.05
        while True:
            try:
                kwargs: dict[str, Any] = {"params": params}
                if body is not None:
                    kwargs["content"] = _chunks(body)
                    kwargs["headers"] = {"Content-Type": content_type, "Content-Length": str(len(body))}
                elif json is not None:
                    kwargs["json"] = json
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("%s %s: %s; retrying in %.2fs", method, path, exc.__class__.__name__, delay)
            else:
                if response.status_code in ok or response.status_code in passthrough:
                    return response
                if response.status_code not in RETRY_STATUSES or time.monotonic() > deadline:
                    raise _error(response)
                log.info("%s %s: %d; retrying in %.2fs", method, path, response.status_code, delay)
                retry_after = response.headers.get("Retry-After")
                if retry_after and retry_after.isdigit():
                    delay = max(delay, float(retry_after))
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


def _error(response: httpx.Response) -> OptimServiceError:
    try:
        body = response.json()
        return OptimServiceError(response.status_code, body.get("error", "Error"), body.get("detail", response.text), body)
    except ValueError:
        return OptimServiceError(response.status_code, "Error", response.text[:500])


def default_url() -> str:
    return os.environ.get("OPTIM_URL", "http://127.0.0.1:8000")
