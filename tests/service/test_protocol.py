"""service.protocol.BodyProtocol: the app gets every request body byte, in order, whether each piece is
taken as it was parsed or pieces wait for the app and are joined (a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from service.protocol import BodyProtocol

from ..server import free_port

received: list[tuple[str, int]] = []  # (type of each body message, its length)
gate = threading.Event()


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    while not gate.is_set():  # pieces arrive (and wait for the app) until the test opens the gate
        await asyncio.sleep(0.005)
    digest = hashlib.sha256()
    more = True
    while more:
        message = await receive()
        received.append((type(message["body"]).__name__, len(message["body"])))
        digest.update(message["body"])
        more = message.get("more_body", False)
    body = digest.hexdigest().encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http=BodyProtocol, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(10)


def post(port: int, pieces: list[bytes], pause: float) -> bytes:
    """POST the pieces as one body, each in its own write ``pause`` seconds apart; the answer's body."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        size = sum(len(p) for p in pieces)
        sock.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        gate.set()
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return answer.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "sizes, pause, joined",
    [
        ([1, 7, 4000, 9000, 3], 0.05, True),  # all arrive before the app reads: joined into one message
        ([300_000, 5_000_000, 1, 2_000_000], 0.0, False),  # the app reads as they arrive: pieces passed on as parsed
    ],
)
def test_every_body_byte_reaches_the_app_in_order(port: int, sizes: list[int], pause: float, joined: bool) -> None:
    gate.clear()
    received.clear()
    if not joined:
        gate.set()
    pieces = [os.urandom(n) for n in sizes]
    answer = post(port, pieces, pause)
    assert answer.decode() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert sum(n for _, n in received) == sum(sizes)
    assert {kind for kind, _ in received} <= {"bytes"}  # what ASGI promises the app
    if joined:
        assert received[0][1] == sum(sizes), f"the waiting pieces were not joined: {received}"
    else:
        assert len(received) > 2, f"a 7 MB body came in {len(received)} messages"
