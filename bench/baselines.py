"""Transport and peer baselines for the benchmark: what moving the bytes costs without the service.

    .venv/bin/python bench/baselines.py [--quick] [--tp-probe]

Every function returns raw per-iteration timings in seconds (``list[float]``), warm-up iterations excluded.

* ``tcp_echo``: a raw TCP echo over loopback, the floor for moving ``nbytes`` each way from Python.
* ``rpc_peer``: the parameter server a PyTorch user would write with ``torch.distributed.rpc`` (TensorPipe),
  an optimizer in a server process stepped by ``rpc_sync`` from a worker process.
* ``torch_save_load``: ``torch.save`` (with fsync) and ``torch.load(weights_only=True)`` of a state dict.

Processes: the echo server is a plain ``subprocess`` running this file with ``--echo-server`` (stdlib only, so
it neither imports torch nor re-imports the caller's ``__main__``); the RPC server and the RPC worker are both
``multiprocessing`` spawn children, so the caller never joins an RPC group itself and ``rpc_peer`` can be
called any number of times. Spawn re-imports the caller's main module in the children, as usual: keep the
caller's work under ``if __name__ == "__main__":``. Only 127.0.0.1 is used: the TCPStore, Gloo
(``GLOO_SOCKET_IFNAME=lo``) and TensorPipe's uv listeners (``TP_SOCKET_IFNAME=lo``).

Threads: torch's default intra-op thread count is left alone everywhere (``torch.set_num_threads`` is never
called); ``rpc_peer(..., info={})`` reports what it was in each process and in the RPC thread that ran the step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------------------
# tcp_echo
# ---------------------------------------------------------------------------------------------------------

_HEADER = 8  # little-endian unsigned payload length
_RELAY_CHUNK = 1 << 20  # the echo server forwards at most this much per recv_into/sendall pair


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from a blocking socket; False if the peer closed before the first byte."""
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed mid-frame")
        got += k
    return True


def _tune(sock: socket.socket, bufsize: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


def _echo_server(bufsize: int, store: bool = False) -> None:
    """Serve one connection: for each frame, echo the header, then forward every received chunk at once
    (``store``: receive the whole frame first, then send it back, as a request/response server must)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if bufsize:  # before listen(), so that the window scale is negotiated for it
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    listener.close()
    _tune(conn, bufsize)
    header = memoryview(bytearray(_HEADER))
    chunk = memoryview(bytearray(_RELAY_CHUNK))
    with conn:
        whole = memoryview(bytearray(0))
        while _recv_exact(conn, header):
            remaining = int.from_bytes(header, "little")
            if store:
                if len(whole) != remaining:
                    whole = memoryview(bytearray(remaining))
                if not _recv_exact(conn, whole):
                    return
                conn.sendall(header)
                conn.sendall(whole)
                continue
            conn.sendall(header)
            while remaining:
                k = conn.recv_into(chunk[: min(remaining, _RELAY_CHUNK)])
                if k == 0:
                    return
                conn.sendall(chunk[:k])
                remaining -= k


def _echo_round(sock: socket.socket, sel: selectors.BaseSelector, out: memoryview, into: memoryview) -> None:
    """Send ``out`` and receive as many bytes into ``into``, both at once, on a non-blocking socket."""
    total = len(out)
    sent = got = 0
    while got < total:
        if sent < total:
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(out[sent:])
        try:
            k = sock.recv_into(into[got:])
        except BlockingIOError:
            sel.modify(sock, selectors.EVENT_READ if sent >= total else selectors.EVENT_READ | selectors.EVENT_WRITE)
            sel.select()
            continue
        if k == 0:
            raise ConnectionError("the echo server closed the connection")
        got += k


def tcp_echo(
    nbytes: int, repeats: int, warmup: int = 2, *, check: bool = True, bufsize: int = 0, store: bool = False
) -> list[float]:
    """Round trips of ``nbytes`` echoed over one loopback TCP connection: the floor for moving the bytes.

    A frame is an 8-byte little-endian length then the payload; the reply is the same frame. One iteration is
    the client sending the frame and receiving the whole echo back (``nbytes + 8`` each way).

    Streaming, not store-and-forward: the server (a ``subprocess``) echoes the header at once and forwards each
    chunk as soon as it arrives (``recv_into`` a preallocated 1 MiB buffer, ``sendall`` of a memoryview of it),
    while the client sends and receives concurrently on a non-blocking socket (``send``/``recv_into`` of
    memoryviews over preallocated bytearrays, a selector when neither can progress). Measured on a 2-core VM,
    streaming took 0.55-0.6x the time of receive-all-then-send at 40 and 200 MB and tied at 1-10 MB; the
    server's 1 MiB chunk was the best of 256 KiB/1 MiB/4 MiB/whole-frame, within noise. TCP_NODELAY on both
    ends. ``bufsize`` (SO_SNDBUF/SO_RCVBUF on both ends) is 0 by default, i.e. the kernel's autotuning: setting
    4 MiB (net.core.[rw]mem_max here) was no faster at 1-10 MB and 5-10 % slower at 40-200 MB.

    ``store``: the server receives the whole frame before sending it back, as any request/response
    server must (an optimizer step needs every gradient before it can answer): the like-for-like floor
    for the service's step and HTTP echo.

    The payload is random bytes (never untouched calloc pages, which all alias the zero page). With ``check``,
    one extra untimed round with a fresh payload is compared byte for byte with what came back.
    """
    if nbytes < 1 or repeats < 1 or warmup < 0:
        raise ValueError("nbytes and repeats must be positive, warmup non-negative")
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--echo-server", "--bufsize", str(bufsize)]
        + (["--store"] if store else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(sock, bufsize)  # before connect(), like the server's before listen()
        sock.connect(("127.0.0.1", port))
        _tune(sock, bufsize)
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        out = bytearray(_HEADER + nbytes)
        out[:_HEADER] = nbytes.to_bytes(_HEADER, "little")
        out[_HEADER:] = _random_bytes(nbytes, seed=0)
        into = bytearray(_HEADER + nbytes)
        out_view, into_view = memoryview(out), memoryview(into)
        times: list[float] = []
        with sock, sel:
            for k in range(warmup + repeats):
                start = time.perf_counter()
                _echo_round(sock, sel, out_view, into_view)
                if k >= warmup:
                    times.append(time.perf_counter() - start)
            if check:
                out[_HEADER:] = _random_bytes(nbytes, seed=1)
                into_view[:] = bytes(len(into))
                _echo_round(sock, sel, out_view, into_view)
                if into != out:
                    raise AssertionError(f"tcp_echo: the {nbytes} bytes echoed back differ from the bytes sent")
            out_view.release()
            into_view.release()
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
    return times


def _random_bytes(n: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).bytes(n)


# ---------------------------------------------------------------------------------------------------------
# rpc_peer
# ---------------------------------------------------------------------------------------------------------

OPTIMIZERS = ("adamw", "sgd", "lamb", "adafactor", "lion")
IMPLS = ("default", "foreach", "fused")
TRANSPORTS = ("tcp", "shm")
LR = 1e-3
RPC_TIMEOUT_S = 300.0
RPC_WORKER_THREADS = 16  # torch's default for TensorPipeRpcBackendOptions


@dataclasses.dataclass(frozen=True)
class _RpcConfig:
    port: int
    numel_millions: int
    tensors: int
    optimizer: str
    impl: str
    transport: str
    repeats: int
    warmup: int
    check: bool
    tp_log_dir: str | None


def _sizes(numel_millions: int, tensors: int) -> list[int]:
    total = numel_millions * 1_000_000
    base, rest = divmod(total, tensors)
    return [base + (1 if i < rest else 0) for i in range(tensors)]


def make_params(numel_millions: int, tensors: int = 100) -> list[torch.nn.Parameter]:
    """1-D float32 parameters totalling ``numel_millions * 1e6``, ``randn * 0.02`` from seed 0 (bench/run.py's too)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g) * 0.02) for n in _sizes(numel_millions, tensors)]


def make_grads(numel_millions: int, tensors: int = 100) -> list[torch.Tensor]:
    """The gradients, ``randn`` from seed 1, one per parameter (bench/run.py's too); the same ones every step."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=g) for n in _sizes(numel_millions, tensors)]


def make_optimizer(params: list[torch.nn.Parameter], optimizer: str, impl: str = "default") -> torch.optim.Optimizer:
    """``adamw``: torch.optim.AdamW (weight_decay 0.01, torch's own default); ``sgd``: torch.optim.SGD with
    momentum 0.9; both take ``impl`` as ``foreach=True`` / ``fused=True`` (``default``: neither passed, which
    is the single-tensor loop on CPU). ``lamb``, ``adafactor``, ``lion``: ``timm.optim.create_optimizer_v2``
    with timm's defaults (weight decay 0), ``default`` impl only. Learning rate 1e-3 for all."""
    import torch

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    flags: dict[str, Any] = {} if impl == "default" else {impl: True}
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=LR, **flags)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.9, **flags)
    if optimizer in OPTIMIZERS:
        if impl != "default":
            raise ValueError(f"{optimizer!r} (timm) has only the 'default' impl, got {impl!r}")
        import timm.optim

        return timm.optim.create_optimizer_v2(params, opt=optimizer, lr=LR)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup(cfg: _RpcConfig, role: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(cfg.port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # the store at MASTER_ADDR:MASTER_PORT is hosted for us
    os.environ["TP_SOCKET_IFNAME"] = "lo"
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # init_rpc's internal Gloo group warns about its own use of a deprecated API
    warnings.filterwarnings("ignore", message=r"You are using a Backend .* as a ProcessGroup")
    if cfg.tp_log_dir is not None:
        # TensorPipe reads TP_VERBOSE_LOGGING when its first context is created and logs to fd 2
        os.environ["TP_VERBOSE_LOGGING"] = "4"
        log = os.open(os.path.join(cfg.tp_log_dir, f"{role}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 2)
        os.close(log)


def _rpc_options(cfg: _RpcConfig) -> Any:
    import torch.distributed.rpc as rpc

    if cfg.transport == "tcp":
        transports: list[str] | None = ["uv"]
        channels: list[str] | None = ["basic"]
    else:  # TensorPipe's defaults: every viable transport (shm, uv) and channel (cma, mpt_uv, basic), best first
        transports = channels = None
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{cfg.port}",
        num_worker_threads=RPC_WORKER_THREADS,
        rpc_timeout=RPC_TIMEOUT_S,
        _transports=transports,
        _channels=channels,
    )


_server_state: dict[str, Any] = {}


def _server_step(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Runs on the server, in a TensorPipe agent thread: set the grads, step, return the live parameters."""
    params: list[torch.nn.Parameter] = _server_state["params"]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    start = time.perf_counter()
    _server_state["optimizer"].step()
    _server_state.setdefault("step_s", []).append(time.perf_counter() - start)
    _server_state.setdefault("step_thread_ids", set()).add(threading.get_ident())
    _server_state["step_threads"] = _torch_threads()
    return params  # the live nn.Parameters, no clone: RPC pickles them, TensorPipe sends their storage


def _server_info() -> dict[str, Any]:
    info = {k: v for k, v in _server_state.items() if k not in ("params", "optimizer", "step_thread_ids")}
    info["rpc_threads_used"] = len(_server_state.get("step_thread_ids", ()))
    return info


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _rpc_server_main(cfg: _RpcConfig, worker_gone: Any) -> None:
    _child_setup(cfg, "server")
    import torch.distributed.rpc as rpc

    params = make_params(cfg.numel_millions, cfg.tensors)
    _server_state.update(
        params=params,
        optimizer=make_optimizer(params, cfg.optimizer, cfg.impl),
        main_threads=_torch_threads(),
        pid=os.getpid(),
    )
    store = _loopback_store(cfg.port)
    rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=_rpc_options(cfg))
    rpc.shutdown()  # graceful, but it can return while the worker's own shutdown still reads the store:
    worker_gone.wait(RPC_TIMEOUT_S)  # so the store outlives the worker (set by rpc_peer once the worker exited)
    del store


def _loopback_store(port: int) -> Any:
    """The rendezvous TCPStore, listening on 127.0.0.1 only.

    With a ``tcp://`` init_method, rank 0 would host the store itself and bind it to every interface (``*:port``,
    whatever the host in the URL). Instead the server process hosts it on a socket bound to 127.0.0.1 (handed
    over as ``master_listen_fd``) and both ranks' rendezvous join it as clients: torch does that when
    ``TORCHELASTIC_USE_AGENT_STORE=True`` and the URL is ``MASTER_ADDR:MASTER_PORT`` (set by ``_child_setup``).
    """
    import datetime

    import torch.distributed as dist

    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        2,
        True,
        timeout=datetime.timedelta(seconds=RPC_TIMEOUT_S),
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
        use_libuv=True,
    )
    listener.detach()  # the store owns the descriptor now
    return store


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def _rpc_worker_main(cfg: _RpcConfig, conn: mp_connection.Connection) -> None:
    try:
        _child_setup(cfg, "worker")
        import torch.distributed.rpc as rpc

        grads = make_grads(cfg.numel_millions, cfg.tensors)
        rpc.init_rpc("worker", rank=1, world_size=2, rpc_backend_options=_rpc_options(cfg))
        times: list[float] = []
        try:
            returned: list[torch.Tensor] = []
            for k in range(cfg.warmup + cfg.repeats):
                start = time.perf_counter()
                returned = rpc.rpc_sync("server", _server_step, args=(grads,))
                elapsed = time.perf_counter() - start
                if k >= cfg.warmup:
                    times.append(elapsed)
            info = rpc.rpc_sync("server", _server_info)
        finally:
            rpc.shutdown()
        info.update(
            worker_threads=_torch_threads(),
            returned_type=type(returned[0]).__name__ if returned else None,
        )
        if cfg.check:
            reference = make_params(cfg.numel_millions, cfg.tensors)
            opt = make_optimizer(reference, cfg.optimizer, cfg.impl)
            for _ in range(cfg.warmup + cfg.repeats):
                for p, g in zip(reference, grads, strict=True):
                    p.grad = g
                opt.step()
            if len(returned) != len(reference):
                raise AssertionError(f"rpc_peer: the server returned {len(returned)} tensors, expected {len(reference)}")
            bad = [i for i, (r, p) in enumerate(zip(returned, reference, strict=True)) if not _bitwise_equal(r, p)]
            if bad:
                raise AssertionError(
                    f"rpc_peer: {len(bad)} of {len(reference)} parameters differ bitwise from the in-process "
                    f"{cfg.optimizer}/{cfg.impl} reference after {cfg.warmup + cfg.repeats} steps (first: #{bad[0]})"
                )
            info["checked"] = True
        conn.send(("ok", times, info))
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        conn.close()


def rpc_peer(
    numel_millions: int,
    tensors: int = 100,
    optimizer: str = "adamw",
    impl: str = "default",
    transport: str = "tcp",
    repeats: int = 5,
    warmup: int = 2,
    *,
    check: bool = False,
    info: dict[str, Any] | None = None,
    tp_log_dir: str | None = None,
) -> list[float]:
    """``rpc_sync`` round trips to a ``torch.distributed.rpc`` parameter server, as a PyTorch user would write it.

    A server process (rank 0, "server") holds ``tensors`` 1-D float32 parameters totalling ``numel_millions``
    million elements and the optimizer (see ``make_optimizer``). A worker process (rank 1, "worker"; a spawn
    child too, not this process) sends the list of gradients with ``rpc.rpc_sync("server", _server_step,
    args=(grads,))``; the server sets ``.grad``, calls ``optimizer.step()`` and returns the live parameters
    (no clones: what a naive user returns). One iteration is one ``rpc_sync`` round trip timed in the worker:
    pickling, the gradients over, the step, the parameters back, unpickling into ``nn.Parameter``. The same
    gradient tensors are sent every step.

    ``transport``: ``"tcp"`` is TensorPipe with ``_transports=["uv"], _channels=["basic"]`` (libuv TCP for the
    control messages and the tensors, like for like with ``tcp_echo``); ``"shm"`` leaves both unset, TensorPipe's
    own choice for two processes on one host, which is the shm transport (ring buffers in shared memory) for
    messages and the cma channel (process_vm_readv, one copy) for tensors, when viable: ``tp_log_dir`` runs both
    processes with ``TP_VERBOSE_LOGGING=4`` logging into ``<tp_log_dir>/{server,worker}.log`` to see it
    (``tensorpipe_usage`` summarises them; logging slows the run, don't time it). ``num_worker_threads=16``
    (torch's default), ``rpc_timeout`` 300 s, rendezvous ``tcp://127.0.0.1:<free port>`` with its TCPStore
    listening on 127.0.0.1 only (see ``_loopback_store``).

    Two things a user of this setup pays for, seen on a 2-CPU VM: TensorPipe's shm transport busy-polls (each
    process burnt ~0.5 CPU while idle with ``"shm"``, ~0 with ``"tcp"``), and the step runs in one of the
    agent's threads, not the main thread, where torch's OpenMP regions are slower (the for-loop AdamW at 10M took
    ~2x its in-process time there; ``info["step_s"]`` has the server-side figure).

    ``check``: after the timed steps the worker builds the same parameters, optimizer and impl in-process,
    applies the same gradients ``warmup + repeats`` times and asserts the parameters last returned by the server
    are bitwise equal (AssertionError otherwise). ``info``, if given, is filled with: ``step_s``, the duration
    of every ``optimizer.step()`` inside the server (warm-up included), to tell the step from the transport;
    torch's thread counts (``main_threads`` in the server, ``step_threads`` in the RPC thread that stepped,
    ``worker_threads``); ``rpc_threads_used``, how many agent threads ran a step; ``returned_type``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if impl not in IMPLS or (optimizer not in ("adamw", "sgd") and impl != "default"):
        raise ValueError(f"impl {impl!r} is not available for {optimizer!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if numel_millions < 1 or tensors < 1 or repeats < 1 or warmup < 0:
        raise ValueError("numel_millions, tensors and repeats must be positive, warmup non-negative")
    cfg = _RpcConfig(_free_port(), numel_millions, tensors, optimizer, impl, transport, repeats, warmup, check, tp_log_dir)
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    worker_gone = ctx.Event()
    server = ctx.Process(target=_rpc_server_main, args=(cfg, worker_gone), name="rpc-peer-server")
    worker = ctx.Process(target=_rpc_worker_main, args=(cfg, sender), name="rpc-peer-worker")
    procs = (server, worker)
    try:
        for p in procs:
            p.start()
        sender.close()
        message: tuple[Any, ...] | None = None
        while message is None:
            if receiver.poll(0.2):
                try:
                    message = receiver.recv()
                except EOFError:
                    worker.join(timeout=10)
                    raise RuntimeError(f"rpc_peer: the worker exited with {worker.exitcode} without a result") from None
            elif (not worker.is_alive() or server.exitcode not in (None, 0)) and not receiver.poll(1.0):
                raise RuntimeError(f"rpc_peer: a process died (server exit {server.exitcode}, worker exit {worker.exitcode})")
        worker.join(timeout=RPC_TIMEOUT_S)
        worker_gone.set()
        server.join(timeout=RPC_TIMEOUT_S)
        if message[0] == "error":
            _, name, text = message
            raise (AssertionError if name == "AssertionError" else RuntimeError)(f"rpc_peer worker failed:\n{text}")
        _, times, details = message
        if server.exitcode != 0:
            raise RuntimeError(f"rpc_peer: the server exited with {server.exitcode}")
        if info is not None:
            info.update(details)
        return times
    finally:
        worker_gone.set()
        receiver.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


_TP_TRANSPORT = re.compile(r"is accepting connection on transport (\w+)")
_TP_CHANNEL = re.compile(r"Channel \S+?\.ch_(\w+) received a send request")


def tensorpipe_usage(tp_log_dir: str) -> dict[str, dict[str, int]]:
    """From the logs of ``rpc_peer(..., tp_log_dir=...)``: connections accepted per transport and tensor sends
    per channel, both processes together. A pipe's first connection is made on uv to the peer's published
    address and TensorPipe then moves it to the best transport both ends can use (hence a few uv accepts even
    when shm carries everything); the channel counts say what carried the tensors."""
    transports: Counter[str] = Counter()
    channels: Counter[str] = Counter()
    for name in ("server.log", "worker.log"):
        text = Path(tp_log_dir, name).read_text(errors="replace")
        transports.update(_TP_TRANSPORT.findall(text))
        channels.update(_TP_CHANNEL.findall(text))
    return {"transport_accepts": dict(transports), "channel_sends": dict(channels)}


# ---------------------------------------------------------------------------------------------------------
# torch_save_load
# ---------------------------------------------------------------------------------------------------------


def torch_save_load(
    tensors: dict[str, torch.Tensor], path: str, repeats: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Times of ``torch.save(tensors, f)`` and of ``torch.load(path, weights_only=True)``.

    A save is open + ``torch.save`` + ``flush`` + ``os.fsync`` + close, so it includes getting the bytes to the
    disk (a real device here: /tmp is on the root block device of the VM, not tmpfs; on tmpfs fsync is a
    no-op). A load reads the file just written, so from the page cache, and is not mmap'd. After the timed
    loads the last loaded dict is checked bitwise against ``tensors`` (outside the timing). The file is left
    at ``path``.
    """
    import torch

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be positive, warmup non-negative")
    saves: list[float] = []
    loads: list[float] = []
    loaded: dict[str, torch.Tensor] = {}
    for k in range(warmup + repeats):
        start = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - start
        if k >= warmup:
            saves.append(elapsed)
    for k in range(warmup + repeats):
        start = time.perf_counter()
        loaded = torch.load(path, weights_only=True)
        elapsed = time.perf_counter() - start
        if k >= warmup:
            loads.append(elapsed)
    if loaded.keys() != tensors.keys() or not all(_bitwise_equal(loaded[k], v) for k, v in tensors.items()):
        raise AssertionError("torch_save_load: the loaded tensors differ from the saved ones")
    return saves, loads


def adamw_state(numel_millions: int, tensors: int = 100) -> dict[str, torch.Tensor]:
    """An AdamW-sized state: params, exp_avg, exp_avg_sq, each ``numel_millions`` million float32 over ``tensors``."""
    import torch

    g = torch.Generator().manual_seed(2)
    state: dict[str, torch.Tensor] = {}
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        for i, n in enumerate(_sizes(numel_millions, tensors)):
            t = torch.randn(n, generator=g)
            state[f"{kind}.{i}"] = t.square_() if kind == "exp_avg_sq" else t
    return state


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _fmt(times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"{statistics.median(ms):9.2f} ms  (min {min(ms):8.2f}, max {max(ms):8.2f}, n={len(ms)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--tp-probe", action="store_true", help="also log which TensorPipe transport/channel each mode used")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bufsize", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        _echo_server(args.bufsize, args.store)
        return
    import torch

    began = time.perf_counter()
    reps = 3 if args.quick else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads (torch's default), {os.cpu_count()} CPUs")
    print("tcp_echo: nbytes each way over loopback TCP (MB = 1e6 bytes; 40 MB = 10M float32)")
    for mb, r in ((1, 10), (10, 10), (40, 10), (200, 5)):
        print(f"  {f'{mb} MB':28s}{_fmt(tcp_echo(mb * 1_000_000, repeats=reps or r))}", flush=True)
    print("rpc_peer: torch.distributed.rpc rpc_sync round trip, AdamW 10M float32 / 100 tensors, grads over, params back")
    print("  (step in server: optimizer.step() alone, median; threads: torch threads in server main / RPC thread / worker)")
    for transport in TRANSPORTS:
        for impl in ("default", "fused"):
            info: dict[str, Any] = {}
            times = rpc_peer(10, optimizer="adamw", impl=impl, transport=transport, repeats=reps or 8, info=info)
            step = statistics.median(info["step_s"][-len(times) :]) * 1e3
            threads = f"threads {info['main_threads']}/{info['step_threads']}/{info['worker_threads']}"
            label = f"{transport} {impl}"
            print(f"  {label:28s}{_fmt(times)}  [step in server {step:6.2f} ms; {threads}]", flush=True)
    print("torch_save_load: 10M AdamW state (param + exp_avg + exp_avg_sq = 3 x 10M float32, 300 tensors, 120 MB)")
    state = adamw_state(10)
    with tempfile.TemporaryDirectory(prefix="bench-baselines-") as tmp:
        saves, loads = torch_save_load(state, os.path.join(tmp, "state.pt"), repeats=reps or 5)
    print(f"  {'save + fsync':28s}{_fmt(saves)}")
    print(f"  {'load (page cache)':28s}{_fmt(loads)}")
    if args.tp_probe:
        print("TensorPipe probe (1M / 10 tensors, TP_VERBOSE_LOGGING=4, untimed):")
        for transport in TRANSPORTS:
            with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
                rpc_peer(1, tensors=10, transport=transport, repeats=2, tp_log_dir=tmp)
                print(f"  {transport:3s} {tensorpipe_usage(tmp)}")
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
