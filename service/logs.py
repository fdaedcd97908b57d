"""Logs a machine can read (issue 20): the standard library's logging, one JSON object a line
(``OPTIM_LOG_FORMAT=json``, the default) or text, at ``OPTIM_LOG_LEVEL``.

Every request is one line (``RequestLog``, an ASGI middleware: method, path, status, ms, bytes in and out, and
what the route added: tenant, run, t, the step's phases); every background event (snapshot, recovery, eviction,
garbage collection of blobs) is one line with ``event`` and its figures, passed as ``extra``. Headers are never
logged, so neither are API keys.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("optim_service.requests")
# the attributes every LogRecord has: anything else on a record came from ``extra``
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the extra fields after the message as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_"))
        line = super().format(record)
        return f"{line} {extra}" if extra else line


def configure(level: str, fmt: str) -> None:
    """The root logger writes to stderr in ``fmt`` at ``level`` (uvicorn's loggers too: they propagate)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def note(scope: Scope, **fields: Any) -> None:
    """What a route adds to its request's line (``request.state`` is ``scope["state"]``)."""
    state: MutableMapping[str, Any] = scope.setdefault("state", {})
    state.setdefault("log", {}).update(fields)


class RequestLog:
    """One line per HTTP request, written once the answer is sent (or the request failed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent = {"status": 500, "bytes": 0}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._line(scope, sent, (time.perf_counter() - start) * 1e3)

    @staticmethod
    def _line(scope: Scope, sent: dict[str, int], ms: float) -> None:
        status = sent["status"]
        if not log.isEnabledFor(logging.INFO if status < 500 else logging.WARNING):
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        fields: dict[str, Any] = {
            "event": "request",
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(ms, 2),
            "bytes_in": int(length) if length.isdigit() else None,
            "bytes_out": sent["bytes"],
        }
        run = (scope.get("path_params") or {}).get("run")
        if run is not None:
            fields["run"] = run
        fields.update((scope.get("state") or {}).get("log", {}))
        level = logging.INFO if status < 500 else logging.WARNING
        log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra=fields)
