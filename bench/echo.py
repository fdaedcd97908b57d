"""A bare HTTP echo through the service's own stack: uvicorn with the same loop and parser, the same
body reader, the same allocator settings, and the client's transport reading into a reused buffer."""

from __future__ import annotations

import atexit
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, Request, Response  # noqa: E402

from optim_client.transport import Transport, TransportError  # noqa: E402
from service import allocator  # noqa: E402
from service.bodies import read_body  # noqa: E402
from service.protocol import BodyProtocol  # noqa: E402

app = FastAPI()


@app.post("/echo")
async def echo(request: Request) -> Response:
    return Response(await read_body(request, 1 << 31), media_type="application/octet-stream")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


class EchoServer:
    def __init__(self) -> None:
        from service.supervisor import free_port

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.port)], cwd=ROOT)
        self.transport = Transport(f"http://127.0.0.1:{self.port}", retry_deadline=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.transport.request("GET", "/healthz", retry=False)
                break
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        atexit.register(self.stop)

    def stop(self) -> None:
        self.transport.close()
        self.proc.terminate()
        self.proc.wait()


_server: EchoServer | None = None


def http_echo(nbytes: int, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per echo of ``nbytes`` each way (after ``warmup``), the answer checked once."""
    global _server
    if _server is None:
        _server = EchoServer()
    payload = bytearray(nbytes)
    payload[:: max(1, nbytes // 1000)] = b"\x07" * len(payload[:: max(1, nbytes // 1000)])
    buffer = bytearray()

    def into(n: int) -> bytearray:
        nonlocal buffer
        if len(buffer) != n:
            buffer = bytearray(n)
        return buffer

    times = []
    for k in range(repeats + warmup):
        start = time.perf_counter()
        r = _server.transport.request("POST", "/echo", body=payload, into=into, retry=False)
        elapsed = time.perf_counter() - start
        if k == 0 and bytes(r.content) != bytes(payload):
            raise AssertionError("the echo changed the body")
        if k >= warmup:
            times.append(elapsed)
    return times


if __name__ == "__main__":
    import uvicorn

    allocator.tune()
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="uvloop", http=BodyProtocol)
