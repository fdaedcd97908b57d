"""``RunState``: one training run's optimizer-side state, stepped by gradients, carried as bytes.

``apply(grads, t)`` is one iteration of the user's loop after ``loss.backward()``: the optimizer
step, then the LR scheduler when it steps per optimizer step, then SWA and EMA. ``to_bytes`` /
``from_bytes`` carry all of it (parameters, optimizer and scheduler state, averages, counters, the
RNG an algorithm draws from outside its ``state_dict``, the spec) as a safetensors file whose
metadata holds the JSON part; everything is keyed by parameter name. A restored state followed by
the same gradients is bitwise the uninterrupted one (same torch version, same device type).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from optim_format import FormatError, dtypes, framing, snapshot, tree
from optim_format.hessian import HessianRequest

from . import hessian, sparse
from .averaging import Ema, Swa
from .catalogue import get_optimizer
from .errors import (
    GradientError,
    NonFiniteGradient,
    ProtocolRequired,
    SnapshotError,
    SpecError,
    StepFailed,
    StepInProgress,
    StepMismatch,
)
from .params import ParamModule, build_optimizer
from .schedulers import Schedule
from .spec import RunSpec, is_finite_number

if TYPE_CHECKING:
    from .closure import ClosureStep

FORMAT = "optim-run/1"
MAX_T = 2**62  # steps and epochs: far beyond any run, and within every database's BIGINT
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# torch's global generator is process-wide: runs whose optimizer draws from it take turns.
_GLOBAL_RNG_LOCK = threading.Lock()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; the same code path on both."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class StepResult:
    t: int
    lrs: list[float]
    skipped: bool = False


def _check_finite(what: str, value: Any) -> None:
    if value is not None and not is_finite_number(value):
        raise GradientError(f"{what} must be a finite number, got {str(value)[:40]}")


def _describe(t: torch.Tensor) -> str:
    return f"{dtypes.name_of(t.dtype)} {list(t.shape)}"


class RunState:
    def __init__(
        self,
        spec: RunSpec | Mapping[str, Any],
        params: Mapping[str, torch.Tensor],
        *,
        device: str | torch.device | None = None,
        adopt: bool = False,
    ) -> None:
        """``adopt``: the run takes ``params`` as its own parameters where they are already on its device (tensors
        nothing else holds, such as a snapshot's just read), instead of copying them."""
        self.spec = spec if isinstance(spec, RunSpec) else RunSpec.from_dict(spec)
        self.entry = get_optimizer(self.spec.optimizer.name)
        self.entry.require_available()
        self.device = pick_device(device)
        initial = self._check_initial_params(params)
        groups = self.spec.param_groups
        self.module = ParamModule(
            [(p.name, initial[p.name].detach().to(self.device, copy=not adopt)) for p in self.spec.params],
            no_weight_decay=groups.no_weight_decay,
            group_matcher=groups.timm_group_matcher(),
            classifier=groups.classifier,
        )
        self._params = self.module.by_name()
        self._rng: dict[str, torch.Tensor] | None = None
        if self.entry.uses_global_rng:
            self._rng = {"cpu": torch.Generator().manual_seed(self.spec.seed).get_state()}
            if self.device.type == "cuda":
                self._rng["cuda"] = torch.Generator(self.device).manual_seed(self.spec.seed).get_state()
        self.optimizer = build_optimizer(self.entry, self.module, self.spec.optimizer, groups)
        self._names_in_optimizer_order = self._optimizer_order()
        self.schedule = Schedule(self.spec.scheduler, self.optimizer) if self.spec.scheduler else None
        self.swa = Swa(self.spec.swa, self.module, self.optimizer) if self.spec.swa else None
        self.ema = Ema(self.spec.ema, self.module) if self.spec.ema else None
        self.t = 0
        self.epoch = 0
        self.skipped_steps = 0
        self._broken: str | None = None
        self._busy: str | None = None  # a closure step under way (optim_core.closure)
        self._names_by_id: dict[int, str] | None = None

    # ------------------------------------------------------------------ checks
    def _check_initial_params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(params, Mapping):
            raise SpecError(f"initial parameters must map names to tensors, got {type(params).__name__}")
        expected = {p.name for p in self.spec.params}
        missing = sorted(expected - set(params))
        unknown = sorted(set(params) - expected)
        if missing or unknown:
            raise SpecError(f"initial parameters do not match the manifest: missing {missing[:10]}, unknown {unknown[:10]}")
        out = {}
        for info in self.spec.params:
            t = params[info.name]
            if not isinstance(t, torch.Tensor):
                raise SpecError(f"initial value of {info.name!r} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != info.shape or t.dtype != info.torch_dtype:
                raise SpecError(
                    f"initial value of {info.name!r} is {_describe(t)}; the manifest says {info.dtype} {list(info.shape)}"
                )
            out[info.name] = t
        return out

    def check_gradients(self, grads: Mapping[str, torch.Tensor], *, donate: bool = False) -> dict[str, torch.Tensor]:
        """Validate a gradient payload; return it on the run's device in each parameter's dtype.

        A missing name means "no gradient" (``p.grad is None``), as in torch. A sparse COO gradient stays sparse
        (``optim_core.sparse.checked``: its indices are checked, it is always copied). Lower-precision float
        gradients (bf16/fp16 on the wire) are applied in the parameter's dtype. Each gradient is copied (the
        optimizer may change ``.grad`` in place), except with ``donate``: the caller gives its tensors to the
        step and will not read them again, so one already on the device, in the parameter's dtype, contiguous
        and as aligned as torch's own allocations (``framing.ALIGN``) is used as it is; one at another offset is
        copied (some kernels, MKL's among them, may take another path, and round differently, on less aligned memory).
        """
        if not isinstance(grads, Mapping):
            raise GradientError(f"gradients must map parameter names to tensors, got {type(grads).__name__}")
        unknown = sorted(set(grads) - set(self._params))
        if unknown:
            raise GradientError(
                f"unknown parameter name(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''}; "
                f"the run has {len(self._params)} parameters, e.g. {list(self._params)[:5]}"
            )
        out: dict[str, torch.Tensor] = {}
        for name, g in grads.items():
            p = self._params[name]
            if not isinstance(g, torch.Tensor):
                raise GradientError(f"gradient {name!r} is a {type(g).__name__}, not a tensor")
            if g.layout not in (torch.strided, torch.sparse_coo):
                raise GradientError(f"gradient {name!r} is {g.layout}; gradients are dense (strided) or sparse COO")
            if not g.is_floating_point():
                raise GradientError(f"gradient {name!r} has dtype {dtypes.name_of(g.dtype)}; gradients must be floating point")
            if tuple(g.shape) != tuple(p.shape):
                raise GradientError(f"gradient {name!r} has shape {list(g.shape)}; the parameter has shape {list(p.shape)}")
            if g.dtype != p.dtype and torch.finfo(g.dtype).bits >= torch.finfo(p.dtype).bits:
                raise GradientError(
                    f"gradient {name!r} has dtype {dtypes.name_of(g.dtype)}, the parameter {dtypes.name_of(p.dtype)}; "
                    "a gradient must have the parameter's dtype or a narrower float (float16, bfloat16)"
                )
            if g.layout == torch.sparse_coo:
                out[name] = sparse.checked(name, g, p.dtype, self.device)
            elif (
                donate
                and g.device == self.device
                and g.dtype == p.dtype
                and g.is_contiguous()
                and g.data_ptr() % framing.ALIGN == 0
            ):
                out[name] = g.detach()
            else:  # a fresh copy: the optimizer may change .grad in place, and must not change the caller's tensors
                out[name] = g.detach().to(device=self.device, dtype=p.dtype, copy=True)
        return out

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StepFailed(f"this run state failed earlier and must be reloaded from a snapshot: {self._broken}")
        if self._busy is not None:
            raise StepInProgress(
                f"{self._busy} is under way: the state can be stepped, snapshotted or digested only between steps"
            )

    def _schedule_steps_now(self, *, epoch: bool) -> bool:
        """Whether the LR scheduler steps at the end of this step (or epoch), SWA's SWALR not having taken over."""
        if self.schedule is None:
            return False
        if self.swa is not None and self.swa.scheduler is not None:
            count = (self.t + (0 if epoch else 1)) if self.swa.spec.interval == "step" else self.epoch + (1 if epoch else 0)
            if self.swa.active(count):
                return False
        return True

    # ------------------------------------------------------------------ stepping
    @property
    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def apply(
        self,
        grads: Mapping[str, torch.Tensor],
        t: int,
        loss: float | None = None,
        *,
        donate: bool = False,
        hessians: Mapping[str, torch.Tensor] | None = None,
    ) -> StepResult:
        """Apply the gradients computed at step ``t`` (which must be the current step count). ``donate``: the
        caller will not read ``grads`` again, and those that need no conversion are not copied (``check_gradients``).
        ``hessians``: for Adahessian, the Hessian-diagonal estimates that ``hessian_request()`` asked for
        (``optim_core.hessian``); closure optimizers (LBFGS) step through ``begin_closure_step`` instead."""
        self._check_usable()
        if "closure" in self.entry.needs:
            raise ProtocolRequired(
                f"{self.entry.name} steps by closure evaluations, not by one gradient: use begin_closure_step(t) "
                "(optim_core.closure.ClosureStep), then provide(k, loss, gradients) for each evaluation it asks for"
            )
        if isinstance(t, bool) or not isinstance(t, int) or t != self.t:
            raise StepMismatch(f"gradient is for step t={t!r}, the run is at t={self.t}", current_t=self.t)
        _check_finite("loss", loss)
        prepared = self.check_gradients(grads, donate=donate)
        feed = hessian.prepare(self, prepared, hessians)
        refused = sparse.refusal(self.optimizer, self._name_of_param(), prepared)
        if refused is not None:
            raise GradientError(f"{self.entry.name!r} cannot take this step: {refused}")
        steps_schedule = self._schedule_steps_now(epoch=False)
        if steps_schedule:
            assert self.schedule is not None
            self.schedule.check(epoch=False, metric=loss)
        nonfinite = _nonfinite(prepared) + (_nonfinite(feed.estimates, "#hessian") if feed is not None else [])
        if nonfinite and self.spec.nonfinite == "error":
            raise NonFiniteGradient(
                f"gradient(s) {nonfinite[:10]} contain NaN or Inf; the step was not applied "
                '(a run with nonfinite: "skip" skips such steps, as GradScaler does)'
            )
        try:
            for name, p in self._params.items():
                p.grad = prepared.get(name)
            if nonfinite:
                self.skipped_steps += 1
            else:
                with self._rng_scope(), hessian.fed(self.optimizer, feed):
                    self.optimizer.step()
            self._after_step(loss, steps_schedule=steps_schedule)
        except Exception as exc:
            self._broken = f"step t={t} raised {type(exc).__name__}: {exc}"
            raise StepFailed(f"{self.entry.name!r} failed in step t={t}: {type(exc).__name__}: {exc}") from exc
        finally:
            for p in self._params.values():
                p.grad = None
        return StepResult(t=self.t, lrs=self.lrs, skipped=bool(nonfinite))

    def _after_step(self, loss: float | None, *, steps_schedule: bool) -> None:
        """What follows an optimizer step in the user's loop: the count, the per-step scheduler, SWA, EMA."""
        self.t += 1
        if steps_schedule:
            assert self.schedule is not None
            self.schedule.after_step(self.t, loss)
        if self.swa is not None and self.swa.spec.interval == "step" and self.swa.active(self.t):
            self.swa.after(self.module, self.t)
        if self.ema is not None:
            self.ema.update(self.module, self.t)

    def begin_closure_step(self, t: int) -> ClosureStep:
        """Start step ``t`` of a closure optimizer (LBFGS): see ``optim_core.closure.ClosureStep``."""
        from .closure import ClosureStep  # closure builds on this module

        return ClosureStep.begin(self, t)

    def hessian_request(self) -> HessianRequest:
        """What the worker must estimate for the next step of an Adahessian run: see ``optim_core.hessian``."""
        return hessian.request(self)

    def step_epoch(self, metric: float | None = None) -> StepResult:
        """The end of an epoch: epoch-interval schedulers (with the metric for plateau ones) and SWA."""
        self._check_usable()
        _check_finite("metric", metric)
        steps_schedule = self._schedule_steps_now(epoch=True)
        if steps_schedule:
            assert self.schedule is not None
            self.schedule.check(epoch=True, metric=metric)
        try:
            self.epoch += 1
            if steps_schedule:
                assert self.schedule is not None
                self.schedule.after_epoch(self.epoch, metric)
            if self.swa is not None and self.swa.spec.interval == "epoch" and self.swa.active(self.epoch):
                self.swa.after(self.module, self.epoch)
        except Exception as exc:
            self._broken = f"epoch step {self.epoch} raised {type(exc).__name__}: {exc}"
            raise StepFailed(f"epoch step {self.epoch} failed: {type(exc).__name__}: {exc}") from exc
        return StepResult(t=self.t, lrs=self.lrs)

    @contextmanager
    def _rng_scope(self) -> Iterator[None]:
        if self._rng is None:
            yield
            return
        cuda = self.device.type == "cuda"
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self._rng["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self._rng["cuda"], self.device)
            yield
            self._rng = {"cpu": torch.get_rng_state()}
            if cuda:
                self._rng["cuda"] = torch.cuda.get_rng_state(self.device)

    # ------------------------------------------------------------------ views
    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._params.items()}

    def averages(self, kind: str) -> dict[str, torch.Tensor] | None:
        avg = {"ema": self.ema, "swa": self.swa}[kind]
        return {n: t.detach() for n, t in avg.tensors().items()} if avg is not None else None

    # ------------------------------------------------------------------ state
    def _name_of_param(self) -> dict[int, str]:
        """Parameter names by ``id`` of the parameter (the protocols find parameters through the optimizer)."""
        if self._names_by_id is None:
            self._names_by_id = {id(p): n for n, p in self._params.items()}
        return self._names_by_id

    def _optimizer_order(self) -> list[str]:
        name_of = {id(p): n for n, p in self._params.items()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def optimizer_state_by_name(self) -> dict[str, Any]:
        """The optimizer's ``state_dict`` with parameter names instead of positions."""
        sd = dict(self.optimizer.state_dict())
        names = self._names_in_optimizer_order
        sd["state"] = {names[i]: v for i, v in sd["state"].items()}
        sd["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
        return sd

    def _load_optimizer_state(self, named: Mapping[str, Any]) -> None:
        order = self._names_in_optimizer_order
        index = {n: i for i, n in enumerate(order)}
        groups = named["param_groups"]
        mine = [[self._names_in_optimizer_order[i] for i in g["params"]] for g in self.optimizer.state_dict()["param_groups"]]
        theirs = [list(g["params"]) for g in groups]
        if mine != theirs:
            raise SnapshotError("the snapshot's parameter groups differ from the ones this spec builds")
        unknown = sorted(set(named["state"]) - set(index))
        if unknown:
            raise SnapshotError(f"optimizer state for unknown parameter(s) {unknown[:10]}")
        sd = dict(named)
        sd["state"] = {index[n]: v for n, v in named["state"].items()}
        sd["param_groups"] = [{**g, "params": [index[n] for n in g["params"]]} for g in groups]
        self.optimizer.load_state_dict(sd)

    def _tree(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "torch": torch.__version__,
            "device": self.device.type,
            "spec": self.spec.to_dict(),
            "t": self.t,
            "epoch": self.epoch,
            "skipped_steps": self.skipped_steps,
            "params": self.params(),
            "optimizer": self.optimizer_state_by_name(),
            "scheduler": self.schedule.state_dict() if self.schedule else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "swa": self.swa.state_dict() if self.swa else None,
            "rng": self._rng,
        }
        extra = hessian.state_tree(self)  # only where there is one: the digests of other states stay as they were
        if extra is not None:
            out["hessian"] = extra
        return out

    def _encoded(self) -> tuple[Any, dict[str, torch.Tensor]]:
        self._check_usable()
        tensors: dict[str, torch.Tensor] = {}
        try:
            meta = tree.encode_tree(self._tree(), "", tensors)
        except FormatError as exc:  # a state_dict holding what the format cannot carry
            raise SnapshotError(f"the state cannot be stored: {exc}") from None
        return meta, tensors

    def to_bytes(self) -> bytes:
        return snapshot.pack(*self._encoded())

    def parts(self) -> list[memoryview]:
        """The snapshot file of the state as buffers, most of them the live tensors' own memory on the CPU (host
        copies of a GPU's, one per tensor; ``optim_format.snapshot.pack_parts``): to be written before the state changes (under
        the run's lock)."""
        return snapshot.pack_parts(*self._encoded())

    def capture(self) -> Captured:
        """A copy of the whole state, cheap enough for the step's path (a memcpy); serialize it later.

        The copy is in host memory whatever the run's device: on a GPU, a copy beside the state would take
        the device memory the run needs (CheckFreq's snapshot phase copies to the host too); on the CPU it is
        a clone."""
        meta, tensors = self._encoded()
        copies = {k: v.to("cpu", copy=True) for k, v in tensors.items()}
        return Captured(t=self.t, epoch=self.epoch, meta=meta, tensors=copies)

    def checksum(self) -> str:
        """A cheap fingerprint of the parameters: per tensor, the integer sum of its bit patterns.

        Integer sums do not depend on the order of the reduction (threads, kernels), so equal
        parameters always give equal checksums; computing it costs one read of the parameters.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.t}:{self.epoch}".encode())
        for name, p in self._params.items():
            flat = p.detach().reshape(-1)
            as_int = flat.view(_INT_OF_SIZE[flat.element_size()])
            h.update(f"|{name}:{int(as_int.sum(dtype=torch.int64))}".encode())
        return h.hexdigest()

    def export(self) -> dict[str, Any]:
        """A checkpoint for plain torch/timm: ``model``, ``optimizer`` (with ``param_names``), ``lr_scheduler``,
        ``ema`` / ``swa``, ``step``; only tensors and containers, so ``torch.load(weights_only=True)`` reads it."""
        self._check_usable()
        sd = self.optimizer.state_dict()
        names = self._names_in_optimizer_order
        optimizer = {
            **sd,
            "param_groups": [{**g, "param_names": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
        }
        return _plain(
            {
                "model": self.params(),
                "optimizer": optimizer,
                "lr_scheduler": self.schedule.state_dict() if self.schedule else None,
                "swa_scheduler": self.swa.scheduler.state_dict() if self.swa and self.swa.scheduler else None,
                "ema": self.averages("ema"),
                "swa": self.averages("swa"),
                "step": self.t,
                "epoch": self.epoch,
                "spec": self.spec.to_dict(),
            }
        )

    def load_export(self, data: Mapping[str, Any]) -> RunState:
        """A new RunState: this one with the parts of an ``export()``-shaped dict loaded into it.

        ``optimizer`` (a torch ``state_dict`` of this run's optimizer; ``param_names`` are checked when
        present), and optionally ``model``, ``lr_scheduler``, ``swa_scheduler``, ``ema``, ``swa``, ``step``,
        ``epoch``. This state is left untouched; what does not fit raises ``SnapshotError`` naming it.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("optimizer"), Mapping):
            raise SnapshotError("a state to load must be a dict with at least 'optimizer' (a torch optimizer state_dict)")
        new = RunState.from_bytes(self.to_bytes(), device=self.device)
        try:
            new._load_export(data)
            # what loads may still not run (an lr that is a string, moments of the wrong shape): try a step on a copy
            trial = RunState.from_bytes(new.to_bytes(), device=self.device)
            trial._trial_step()
            new.groups()
        except SnapshotError:
            raise
        except Exception as exc:  # a client's state that torch cannot load or step is the client's fault
            raise SnapshotError(f"the state does not fit this run: {type(exc).__name__}: {str(exc)[:300]}") from None
        return new

    def _trial_step(self) -> None:
        """One step of zero gradients, the way this optimizer steps (closure, Hessian estimates, sparse)."""
        zeros = {n: torch.zeros_like(p) for n, p in self._params.items()}
        if "sparse_grad" in self.entry.needs:
            zeros = {n: z.to_sparse(1) for n, z in zeros.items()}
        if "closure" in self.entry.needs:
            step = self.begin_closure_step(self.t)
            while step.waiting_for is not None:
                step.provide(step.waiting_for, 0.0, zeros)
            return
        if "hessian" in self.entry.needs:
            request = self.hessian_request()
            self.apply(zeros, self.t, hessians={n: hessian.zeros_for(self, n) for n in request.params})
            return
        self.apply(zeros, self.t)

    def _load_export(self, data: Mapping[str, Any]) -> None:
        for key, tensors in (("model", self._params), ("ema", self.averages("ema")), ("swa", self.averages("swa"))):
            given = data.get(key)
            if given is None:
                continue
            if tensors is None:
                raise SnapshotError(f"the state has {key!r} but this run keeps no such average")
            for name, value in given.items():
                if name not in tensors:
                    raise SnapshotError(f"{key}: unknown parameter {name!r}")
                target = tensors[name]
                if not isinstance(value, torch.Tensor) or value.shape != target.shape or value.dtype != target.dtype:
                    what = _describe(value) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise SnapshotError(f"{key}: {name!r} is {what}, the run has {_describe(target)}")
                with torch.no_grad():
                    target.copy_(value)
        sd = dict(data["optimizer"])
        groups = []
        for i, g in enumerate(sd.get("param_groups", [])):
            g = dict(g)
            names = g.pop("param_names", None)
            expected = [self._names_in_optimizer_order[j] for j in g.get("params", []) if j < len(self._names_in_optimizer_order)]
            if names is not None and list(names) != expected:
                raise SnapshotError(f"optimizer param_groups[{i}] holds {list(names)[:5]}..., this run has {expected[:5]}...")
            groups.append(g)
        sd["param_groups"] = groups
        self.optimizer.load_state_dict(sd)
        if data.get("lr_scheduler") is not None:
            if self.schedule is None:
                raise SnapshotError("the state has an lr_scheduler but this run has none")
            self.schedule.load_state_dict(data["lr_scheduler"])
        if data.get("swa_scheduler") is not None and self.swa is not None and self.swa.scheduler is not None:
            self.swa.scheduler.load_state_dict(data["swa_scheduler"])
        for key in ("step", "epoch"):
            value = data.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_T:
                    raise SnapshotError(f"{key} must be an integer in [0, {MAX_T}], got {str(value)[:40]}")
                setattr(self, "t" if key == "step" else "epoch", value)

    def groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups by name, with their JSON-able options."""
        names = self._names_in_optimizer_order
        out = []
        for g in self.optimizer.state_dict()["param_groups"]:
            options = {k: v for k, v in g.items() if k != "params" and (v is None or isinstance(v, (bool, int, float, str)))}
            out.append({"params": [names[i] for i in g["params"]], **options})
        return out

    def preview_lrs(self, count: int) -> list[list[float]]:
        """The LR of every group for the next ``count`` intervals of the scheduler, computed on a copy.

        Plateau schedulers are previewed as if the metric never improved or worsened enough to act.
        """
        if self.schedule is None:
            return [self.lrs for _ in range(count)]
        shadow = _ShadowOptimizer(self.optimizer)
        tensors: dict[str, torch.Tensor] = {}
        schedule = Schedule(self.spec.scheduler or {}, shadow)
        schedule.load_state_dict(tree.decode_tree(tree.encode_tree(self.schedule.state_dict(), "", tensors), tensors))
        shadow.load_groups(self.optimizer)
        out = []
        epoch = self.schedule.interval == "epoch"
        for i in range(1, count + 1):
            if epoch:
                schedule.after_epoch(self.epoch + i, None if not schedule.needs_metric else float("inf"))
            else:
                schedule.after_step(self.t + i, None if not schedule.needs_metric else float("inf"))
            out.append([float(g["lr"]) for g in shadow.param_groups])
        return out

    def digest(self) -> str:
        meta, tensors = self._encoded()
        return snapshot.digest(meta, tensors)

    def digest_matches(self, recorded: str) -> bool:
        """Whether ``recorded`` (a digest of this or an earlier format) is this state's."""
        meta, tensors = self._encoded()
        return snapshot.digest_matches(recorded, meta, tensors)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, *, device: str | torch.device | None = None) -> RunState:
        try:
            meta, tensors = snapshot.unpack(data)
        except FormatError as exc:
            raise SnapshotError(str(exc)) from None
        return cls.from_parts(meta, tensors, device=device)

    @classmethod
    def from_parts(
        cls, meta: Any, tensors: Mapping[str, torch.Tensor], *, device: str | torch.device | None = None, adopt: bool = False
    ) -> RunState:
        """The state from a snapshot's JSON part and tensors (``optim_format.snapshot.unpack`` or ``read``). ``adopt``: the
        parameters are the given tensors, not copies of them: for tensors nothing else holds, in memory torch
        allocated (``snapshot.read``'s; safetensors' own are views of a Python buffer, less aligned, and some
        kernels' results depend on alignment)."""
        try:
            saved = tree.decode_tree(meta, tensors)
        except FormatError as exc:
            raise SnapshotError(str(exc)) from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise SnapshotError(f"not a run snapshot of format {FORMAT!r}")
        target = pick_device(device)
        if saved["torch"] != torch.__version__:
            raise SnapshotError(
                f"snapshot was written by torch {saved['torch']}, this process runs {torch.__version__}: "
                "resuming would not be bitwise exact"
            )
        if saved["device"] != target.type:
            raise SnapshotError(
                f"snapshot was written on {saved['device']}, this process steps on {target.type}: "
                "resuming would not be bitwise exact"
            )
        state = cls(RunSpec.from_dict(saved["spec"]), saved["params"], device=target, adopt=adopt)
        state._load_optimizer_state(saved["optimizer"])
        if state.schedule is not None:
            state.schedule.load_state_dict(saved["scheduler"])
        if state.swa is not None:
            state.swa.load_state_dict(saved["swa"])
        if state.ema is not None:
            state.ema.load_state_dict(saved["ema"])
        state.t, state.epoch, state.skipped_steps = saved["t"], saved["epoch"], saved["skipped_steps"]
        state._rng = saved["rng"]
        hessian.load_state_tree(state, saved.get("hessian"))
        return state


@dataclass(frozen=True)
class Captured:
    """A frozen copy of a RunState (see ``RunState.capture``)."""

    t: int
    epoch: int
    meta: Any
    tensors: dict[str, torch.Tensor]

    def parts(self) -> list[memoryview]:
        """The snapshot file of the copy, as buffers of its own memory (``optim_format.snapshot.pack_parts``)."""
        return snapshot.pack_parts(self.meta, self.tensors)

    def digest(self) -> str:
        return snapshot.digest(self.meta, self.tensors)


def _nonfinite(grads: Mapping[str, torch.Tensor], suffix: str = "") -> list[str]:
    """The names of the gradients holding NaN or Inf. A tensor's 2-norm is finite when all of it is
    (NaN and Inf carry through the sum of squares), and costs one vectorized pass, where
    ``isfinite(g).all()`` costs ~10x more on CPU; only a non-finite norm (which a very large but finite
    gradient can give, by overflow) is checked element by element."""
    if not grads:
        return []
    names = list(grads)
    dense = {n: sparse.nonfinite_view(grads[n]) for n in names}  # a sparse gradient's values
    finite = torch.isfinite(torch.stack([torch.linalg.vector_norm(dense[n]).float() for n in names])).tolist()
    return sorted(n + suffix for n, ok in zip(names, finite, strict=True) if not ok and not bool(torch.isfinite(dense[n]).all()))


def _plain(obj: Any) -> Any:
    """Containers and tensors only (weights_only-loadable); tensors cloned to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


class _ShadowOptimizer(torch.optim.Optimizer):
    """An optimizer with the run's param groups (hyper-parameters only) and no real parameters:
    schedulers step it to preview the LR without touching the run."""

    def __init__(self, real: torch.optim.Optimizer) -> None:
        groups = [
            {**copy.deepcopy({k: v for k, v in g.items() if k != "params"}), "params": [torch.zeros(1)]}
            for g in real.param_groups
        ]
        super().__init__(groups, copy.deepcopy(real.defaults))

    def load_groups(self, real: torch.optim.Optimizer) -> None:
        for mine, theirs in zip(self.param_groups, real.param_groups, strict=True):
            mine.update(copy.deepcopy({k: v for k, v in theirs.items() if k != "params"}))
