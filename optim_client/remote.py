"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose state and step live in optim-service.

One line changes in a training loop::

    opt = RemoteOptimizer(model.named_parameters(), url="http://127.0.0.1:8000", run="exp-1",
                          optimizer="adamw", lr=1e-3, weight_decay=0.05,
                          scheduler={"name": "cosine", "num_epochs": 10_000, "warmup_epochs": 500})

``step()`` sends every parameter's ``.grad`` and writes the service's answer into the parameters in
place. A worker restarted with the same code *resumes*: the run exists with the same spec, so the
service's parameters are loaded into the local ones and ``t`` is where the run is.
"""

from __future__ import annotations

import copy
import http.client
import io
import json
import logging
import math
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load

from optim_format import dtypes, framing

from . import protocols
from .params import as_torch, gradient_body, names_and_groups, rank_and_world, server_timing
from .transport import OptimServiceError, Transport, default_url, read_exactly

log = logging.getLogger("optim_client")


class RemoteScheduler:
    """The run's LR scheduler, as a worker sees it: epoch steps (with a metric for plateau schedulers)."""

    def __init__(self, optimizer: RemoteOptimizer) -> None:
        self._opt = optimizer

    def step(self, metric: float | None = None) -> list[float]:
        # not retried: an epoch step whose answer was lost may have been applied
        r = self._opt._http.request("POST", f"/runs/{self._opt.run}/schedule/step", json={"metric": metric}, retry=False)
        lrs = r.json()["lr"]
        self._opt._set_lrs(lrs)
        return lrs

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self._opt.param_groups]

    def preview(self, steps: int = 100) -> list[list[float]]:
        return self._opt._http.request("GET", f"/runs/{self._opt.run}/schedule/preview", params={"steps": steps}).json()["lr"]


class RemoteOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        named_params: Iterable[Any],
        *,
        url: str | None = None,
        run: str,
        optimizer: str = "adamw",
        scheduler: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        swa: Mapping[str, Any] | None = None,
        groups: Mapping[str, Any] | None = None,
        token: str | None = None,
        wire_dtype: torch.dtype | None = None,
        durability: str = "log",
        snapshot_every: int | None = None,
        nonfinite: str = "error",
        seed: int = 0,
        retry_deadline: float = 600.0,
        workers: Mapping[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **hyperparams: Any,
    ) -> None:
        named, explicit = names_and_groups(named_params)
        self.run = run
        # several workers: this process's rank and world size, as torchrun sets them (RANK, WORLD_SIZE) unless given
        self.rank: int | None = None
        self.world_size: int | None = None
        if workers is not None:
            self.rank, self.world_size = rank_and_world(rank, world_size)
        self.wire_dtype = wire_dtype
        self._by_name = dict(named)
        self._http = Transport(url or default_url(), token=token, retry_deadline=retry_deadline)
        # the step's answer is read into the parameters; a buffer (reused) only for those it cannot go into directly
        self._answer = bytearray()
        self._partial = False  # a step's answer was cut off while it was written into the parameters
        self._write_ms = 0.0
        param_groups = dict(groups or {})
        if explicit is not None:
            # the groups as given, like torch.optim.X([{"params": ...}, ...]): no bias/norm split
            param_groups.setdefault("filter_bias_and_bn", False)
            param_groups["groups"] = explicit
        spec = {
            "params": [{"name": n, "shape": list(p.shape), "dtype": dtypes.name_of(p.dtype)} for n, p in named],
            "optimizer": {"name": optimizer, **{k: list(v) if isinstance(v, tuple) else v for k, v in hyperparams.items()}},
            "param_groups": param_groups or None,
            "scheduler": dict(scheduler) if scheduler else None,
            "ema": dict(ema) if ema else None,
            "swa": dict(swa) if swa else None,
            "nonfinite": nonfinite,
            "seed": seed,
        }
        if workers is not None:
            spec["workers"] = dict(workers)
        body: dict[str, Any] = {"name": run, "spec": spec, "durability": durability}
        if snapshot_every is not None:
            body["snapshot_every"] = snapshot_every
        initial = framing.encode({n: p for n, p in named}, metadata={"run": json.dumps(body)})
        response = self._http.request("POST", "/runs", body=initial)
        info = response.json()
        self.resumed = response.status_code == 200
        super().__init__(
            [
                {**{k: as_torch(v) for k, v in g.items() if k != "params"}, "params": [self._by_name[n] for n in g["params"]]}
                for g in info["groups"]
            ],
            {},
        )
        self.t: int = info["t"]
        # what the optimizer takes beyond one gradient per step: closure evaluations, Hessian estimates, sparse gradients
        self.needs: list[str] = list(info.get("needs", []))
        # where the run stands, as the service's last answer said (t, lr, the evaluation a closure step waits for,
        # the Hessian request of the next Adahessian step)
        self.position: dict[str, str] = {}
        # of the last step, in ms: here (encode, round_trip, write) and the service's Server-Timing
        self.last_timings: dict[str, Any] = {}
        self.scheduler = RemoteScheduler(self)
        self._scalars: dict[str, float] = {}  # opt.log(...): sent with the next step, for the run's history
        if self.resumed or self.needs:
            self.resync()  # even at t=0: the run's initial parameters, not this process's (and what its next step needs)
            log.info("resumed run %r at t=%d", run, self.t)

    # ------------------------------------------------------------------ the loop
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._by_name.values():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:  # as torch.optim.Optimizer.zero_grad does
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def log(self, scalars: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        """Scalars for the run's history, sent with the next step (``opt.log(acc=0.9)``, ``opt.log({"val/loss": 1.2})``,
        as ``wandb.log``): at most 32 names of ``[A-Za-z0-9_./-]``, finite numbers or one-element tensors; a
        later value of the same name before the step replaces it."""
        for name, value in {**(scalars or {}), **named}.items():
            self._scalars[name] = protocols.scalar(value)

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimizer step: ``.grad`` of every parameter to the service, its answer into the parameters.

        ``closure`` as in torch: called once first (its loss is returned and sent), except for closure optimizers
        (``torch.LBFGS``), where the service calls for it as often as torch's step does (``protocols.closure_step``).
        ``loss`` (a tensor or a float): sent for the run's history (and plateau schedulers) when there is no closure.
        An Adahessian run sends the Hessian estimates of ``loss.backward(create_graph=True)`` beside the gradients."""
        if "closure" in self.needs:
            return protocols.closure_step(self, closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hessians = protocols.hessian_estimates(self) if "hessian" in self.needs else None
        query: dict[str, Any] = {"t": self.t}
        if loss is not None:
            query["loss"] = protocols.scalar(loss)
        if self.rank is not None:  # a sync step is answered once the ranks' mean gradient has been applied
            query.update(rank=self.rank, world_size=self.world_size)
        self._send_step(query, hessians)
        return loss

    def _send_step(self, params: dict[str, Any], hessians: Mapping[str, torch.Tensor] | None = None) -> bool:
        """POST the gradients (query ``params``); the answer is written into the parameters. False when the service
        refused them as stale (the run moved on: this worker resynced to it instead)."""
        start = time.perf_counter()
        body = gradient_body(self._by_name, self.wire_dtype, hessians)
        sent = time.perf_counter()
        headers = {"Optim-Scalars": json.dumps(self._scalars)} if self._scalars else None
        if self._partial:
            log.warning(
                "the answer to step t=%d was cut off while it was written into the parameters; resyncing to the run "
                "(this step's gradient, computed on those parameters, is not sent)",
                self.t,
            )
            self.resync()
            return False
        r = self._http.request(
            "POST",
            f"/runs/{self.run}/step",
            body=body,
            params=params,
            passthrough=(409,),
            sink=self._receive_params,
            headers=headers,
        )
        answered = time.perf_counter()
        if r.status_code == 409:
            info = r.json()
            if "current_t" not in info or info.get("reason") == "other_gradient":
                raise OptimServiceError(409, info.get("error", "Conflict"), info.get("detail", ""), info)
            log.warning("step t=%d refused (%s); resyncing to the run at t=%d", self.t, info["detail"], info["current_t"])
            self.resync()
            return False
        self.t = int(r.headers["Optim-T"])
        self._set_lrs(json.loads(r.headers["Optim-LR"]))
        if "evaluate" not in self.position:  # the step is done (a closure step's evaluations each carry them)
            self._scalars = {}
        self.last_timings = {
            "encode": (sent - start) * 1e3,
            "round_trip": (answered - sent) * 1e3,
            "write": self._write_ms,
            "server": server_timing(r.headers.get("Server-Timing", "")),
        }
        return True

    def _receive_params(self, r: http.client.HTTPResponse) -> None:
        """Read a step's answer (safetensors) straight into the parameters: a CPU parameter of the answer's dtype
        gets its bytes from the socket, with no copy in between; any other goes through a reused buffer.

        The header is checked first (names, shapes). A read that fails part way leaves parameters half
        written: the transport retries the step, whose answer (the step is applied once, then replayed)
        writes them all again; if the retries give up, ``_partial`` stays set and the next step resyncs.
        """
        length = r.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise OptimServiceError(200, "BadAnswer", "the step's answer has no Content-Length")
        size = int(length)
        head = memoryview(bytearray(8))
        read_exactly(r, head)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise OptimServiceError(200, "BadAnswer", f"the step's answer has a header of {header_len} bytes in {size}")
        header = memoryview(bytearray(header_len))
        read_exactly(r, header)
        try:
            entries, self.position = framing.parse_header(header, size - 8 - header_len)
        except ValueError as exc:
            raise OptimServiceError(200, "BadAnswer", f"the step's answer is not a safetensors file: {exc}") from None
        for _, _, name, _, shape in entries:
            p = self._by_name.get(name)
            if p is None or list(p.shape) != shape:
                raise OptimServiceError(200, "BadAnswer", f"the step's answer has {name!r} {shape}, not a parameter of this run")
        self._write_ms = 0.0  # the copies of what could not be read into place (the reads are the round trip's)
        self._partial = True
        with torch.no_grad():
            for begin, end, name, dtype, shape in entries:
                p = self._by_name[name]
                if p.device.type == "cpu" and p.dtype == dtype and p.is_contiguous():
                    read_exactly(r, framing.tensor_bytes(p))
                    torch.autograd.graph.increment_version(p)  # as an in-place write does
                else:
                    if len(self._answer) < end - begin:
                        self._answer = bytearray(end - begin)
                    view = memoryview(self._answer)[: end - begin]
                    read_exactly(r, view)
                    start = time.perf_counter()
                    p.copy_(torch.frombuffer(view, dtype=dtype, count=math.prod(shape)).view(shape))
                    self._write_ms += (time.perf_counter() - start) * 1e3
        r.read()  # the end of the message: the connection can carry the next request
        self._partial = False

    def resync(self) -> None:
        """Load the service's current parameters into the local ones, and its t and LRs (and, for a closure step
        under way, the evaluation it waits for: the parameters are those to evaluate at)."""
        r = self._http.request("GET", f"/runs/{self.run}/params")
        values, self.position = framing.views(bytes(r.content))
        self._write_params(values)
        self._partial = False
        self.t = int(r.headers["Optim-T"])
        self._set_lrs(json.loads(r.headers["Optim-LR"]))

    def _write_params(self, values: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                self._by_name[name].copy_(value)

    def _set_lrs(self, lrs: list[float]) -> None:
        for g, lr in zip(self.param_groups, lrs, strict=True):
            g["lr"] = lr

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's torch-format ``state_dict`` from the service, plus ``optim_service``: the run's
        ``t``, epoch and scheduler state, so that ``load_state_dict`` puts the whole run back."""
        exported = self._load_pt(self._http.request("GET", f"/runs/{self.run}/state").content)
        sd = exported["optimizer"]
        sd["optim_service"] = {
            "run": self.run,
            "step": exported["step"],
            "epoch": exported["epoch"],
            "lr_scheduler": exported["lr_scheduler"],
            "swa_scheduler": exported["swa_scheduler"],
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Send a ``state_dict`` (and the local parameters, which a checkpoint loader restored) to the service."""
        sd = dict(copy.copy(state_dict))
        extra = dict(sd.pop("optim_service", None) or {})
        extra.pop("run", None)
        payload = {"optimizer": sd, "model": {n: p.detach().to("cpu") for n, p in self._by_name.items()}, **extra}
        buf = io.BytesIO()
        torch.save(payload, buf)
        info = self._http.request("PUT", f"/runs/{self.run}/state", body=buf.getvalue()).json()
        self.t = info["t"]
        self._set_lrs(info["lr"])

    @staticmethod
    def _load_pt(data: bytes | bytearray | memoryview) -> Any:
        return torch.load(io.BytesIO(data), weights_only=True)

    # ------------------------------------------------------------------ averages and checkpoints
    def fetch_average(self, kind: str = "ema") -> dict[str, torch.Tensor]:
        return st_load(bytes(self._http.request("GET", f"/runs/{self.run}/averages/{kind}").content))

    def averaged_model(self, model: torch.nn.Module, kind: str = "swa", loader: Iterable[Any] | None = None) -> torch.nn.Module:
        """A copy of ``model`` holding the average; with a loader, its BatchNorm statistics are recomputed
        (``torch.optim.swa_utils.update_bn``), which needs data and so runs here, on the worker."""
        averaged = copy.deepcopy(model)
        position = {id(p): i for i, p in enumerate(model.parameters())}
        targets = list(averaged.parameters())
        with torch.no_grad():
            for name, value in self.fetch_average(kind).items():
                targets[position[id(self._by_name[name])]].copy_(value)
        if loader is not None:
            torch.optim.swa_utils.update_bn(loader, averaged)
        return averaged

    def checkpoint(self, name: str) -> dict[str, Any]:
        return self._http.request("POST", f"/runs/{self.run}/checkpoints", json={"name": name}, retry=False).json()

    def export_checkpoint(self, path: str, name: str | None = None) -> str:
        """Write a torch checkpoint (``model``, ``optimizer``, ``lr_scheduler``, ``ema``/``swa``, ``step``) to ``path``;
        of the named checkpoint, or of the current state."""
        where = f"/runs/{self.run}/checkpoints/{name}/export" if name else f"/runs/{self.run}/state"
        with open(path, "wb") as f:
            f.write(self._http.request("GET", where).content)
        return path

    def close(self) -> None:
        self._http.close()
