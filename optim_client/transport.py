"""HTTP to optim-service: one kept-alive connection, retries with backoff until a deadline.

Retrying a step is safe because the service applies each step exactly once. The standard library's
``http.client`` moves large bodies without extra copies: a request body given as a buffer goes to
``socket.sendall`` as it is, and a response can be read straight into a buffer the caller reuses
from step to step. (httpx re-copies a ``bytes`` body's unsent remainder after every partial send,
encode/httpcore#1029, and builds every response body from chunks: a 40 MB echo through the same
server took 220 ms with httpx and 73 ms with this; see ``bench/``.)
"""

from __future__ import annotations

import http.client
import json as jsonlib
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from email.message import Message
from typing import Any
from urllib.parse import urlencode, urlsplit

log = logging.getLogger("optim_client")
RETRY_STATUSES = {500, 502, 503, 504}
TransportError = (OSError, http.client.HTTPException)


Buffer = bytes | bytearray | memoryview
Body = Buffer | Sequence[Buffer]  # a sequence is sent as the concatenation of its buffers


class OptimServiceError(RuntimeError):
    """The service said no: ``status``, ``error`` (its error name) and ``detail`` (what was wrong)."""

    def __init__(self, status: int, error: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.body = status, error, detail, dict(body or {})


class Response:
    """What came back: ``status_code``, ``headers`` (case-insensitive), ``content``."""

    def __init__(self, status_code: int, headers: Message, content: bytes | bytearray | memoryview) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    def json(self) -> Any:
        return jsonlib.loads(bytes(self.content))

    @property
    def text(self) -> str:
        return bytes(self.content).decode("utf-8", "replace")


class Transport:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 300.0, retry_deadline: float = 600.0) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the service URL must be http(s)://host[:port][/prefix], got {url!r}")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self._conn: http.client.HTTPConnection | None = None
        self._used = False  # the connection has carried a request: the server may have closed it while idle

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
            self._used = False
        return self._conn

    def _exchange(
        self,
        method: str,
        path: str,
        body: memoryview | list[memoryview] | None,
        headers: dict[str, str],
        into: Callable[[int], bytearray] | None,
        sink: Callable[[http.client.HTTPResponse], None] | None,
    ) -> Response:
        """One request on the kept-alive connection; a connection the server closed while idle is
        replaced once, before anything of the request could have been acted on."""
        for attempt in (0, 1):
            conn = self._connection()
            reused = self._used
            try:
                conn.request(method, self._prefix + path, body=body, headers={**self._headers, **headers})
                self._used = True
                r = conn.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            except TransportError:
                self.close()
                raise
            try:
                if sink is not None and r.status == 200:
                    sink(r)
                    content: bytes | bytearray | memoryview = b""
                else:
                    content = _read(r, into if r.status == 200 else None)
            except BaseException:  # the rest of the answer is unread: the connection cannot carry another request
                self.close()
                raise
            if r.will_close:
                self.close()
            return Response(r.status, r.headers, content)
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Body | None = None,
        content_type: str = "application/octet-stream",
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
        passthrough: tuple[int, ...] = (),
        retry: bool = True,
        into: Callable[[int], bytearray] | None = None,
        sink: Callable[[http.client.HTTPResponse], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send, retrying connection errors and 5xx with jittered backoff until the deadline
        (only requests that are safe to repeat: ``retry=False`` for the others).

        ``into(n)`` gives the buffer a 200 answer of ``n`` bytes is read into (reused by the caller);
        ``sink(response)`` consumes a 200 answer as a stream (downloads); ``headers``: the request's own.
        """
        sent_headers: dict[str, str] = dict(headers or {})
        if json is not None:
            body, content_type = jsonlib.dumps(json).encode(), "application/json"
        send: memoryview | list[memoryview] | None = None
        if body is not None:
            # buffers are sent as they are (sendall of each); the length is given, so nothing is chunk-encoded
            send = memoryview(body) if isinstance(body, (bytes, bytearray, memoryview)) else [memoryview(b) for b in body]
            size = sum(b.nbytes for b in send) if isinstance(send, list) else send.nbytes
            sent_headers.update({"Content-Type": content_type, "Content-Length": str(size)})
        if params:
            path += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        deadline = time.monotonic() + (self.retry_deadline if retry else 0)
        delay = 0.05
        while True:
            try:
                response = self._exchange(method, path, send, sent_headers, into, sink)
            except TransportError as exc:
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


def _read(r: http.client.HTTPResponse, into: Callable[[int], bytearray] | None) -> bytes | memoryview:
    length = r.headers.get("Content-Length")
    if into is None or length is None or not length.isdigit():
        return r.read()
    n = int(length)
    view = memoryview(into(n))[:n]
    read_exactly(r, view)
    r.read()  # the end of the message: the connection can carry the next request
    return view


def read_exactly(r: http.client.HTTPResponse, view: memoryview) -> None:
    """Fill ``view`` from the answer's body (``IncompleteRead`` if it ends first)."""
    got, n = 0, view.nbytes
    while got < n:
        k = r.readinto(view[got:])
        if not k:
            raise http.client.IncompleteRead(bytes(view[:got]), n - got)
        got += k


def _error(response: Response) -> OptimServiceError:
    try:
        body = response.json()
        return OptimServiceError(response.status_code, body.get("error", "Error"), body.get("detail", response.text), body)
    except ValueError:
        return OptimServiceError(response.status_code, "Error", response.text[:500])


def default_url() -> str:
    return os.environ.get("OPTIM_URL", "http://127.0.0.1:8000")
