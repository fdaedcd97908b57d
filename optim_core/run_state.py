"""``RunState``: one training run's optimizer-side state, stepped by gradients, carried as bytes.

``apply(grads, t)`` is one iteration of the user's loop after ``loss.backward()``: the optimizer
step, then the LR scheduler when it steps per optimizer step, then SWA and EMA. ``to_bytes`` /
``from_bytes`` carry all of it (parameters, optimizer and scheduler state, averages, counters, the
RNG an algorithm draws from outside its ``state_dict``, the spec) as a safetensors file whose
metadata holds the JSON part; everything is keyed by parameter name. A restored state followed by
the same gradients is bitwise the uninterrupted one (same torch version, same device type).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from optim_format import FormatError, snapshot
from optim_format.hessian import HessianRequest

from . import creation, describe, export, hessian, inputs, norms, persist, sparse
from .averaging import Ema, Swa
from .catalogue import get_optimizer
from .closure import ClosureStep
from .devices import pick_device
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
from .export import MAX_T
from .norms import NormsMode
from .params import ParamModule, build_optimizer
from .persist import Captured
from .results import StepResult
from .schedulers import Schedule
from .spec import RunSpec

# torch's global generator is process-wide: runs whose optimizer draws from it take turns.
_GLOBAL_RNG_LOCK = threading.Lock()
__all__ = ["MAX_T", "Captured", "RunState", "StepResult", "pick_device"]


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
        initial = inputs.check_initial_params(self.spec, params)
        groups = self.spec.param_groups
        self.module = ParamModule(
            [(p.name, initial[p.name].detach().to(self.device, copy=not adopt)) for p in self.spec.params],
            no_weight_decay=groups.no_weight_decay,
            group_matcher=groups.timm_group_matcher(),
            classifier=groups.classifier,
        )
        self._params = self.module.by_name()
        self.rng: dict[str, torch.Tensor] | None = None  # the global generator's state, for optimizers that draw from it
        if self.entry.uses_global_rng:
            self.rng = {"cpu": torch.Generator().manual_seed(self.spec.seed).get_state()}
            if self.device.type == "cuda":
                self.rng["cuda"] = torch.Generator(self.device).manual_seed(self.spec.seed).get_state()
        self.optimizer = build_optimizer(self.entry, self.module, self.spec.optimizer, groups, device_type=self.device.type)
        self.names_in_optimizer_order = self._optimizer_order()
        # schedulers and SWALR scale every group's LR: one without (timm's Adafactor, lr=None) cannot be scheduled
        describe.require_numeric_lrs(self.spec, self.optimizer.param_groups, self.entry.class_path)
        self.schedule = Schedule(self.spec.scheduler, self.optimizer) if self.spec.scheduler else None
        try:
            self.swa = Swa(self.spec.swa, self.module, self.optimizer) if self.spec.swa else None
            self.ema = Ema(self.spec.ema, self.module) if self.spec.ema else None
        except Exception as exc:  # torch's SWALR / AveragedModel or timm's ModelEmaV3 refusing the spec's values
            raise SpecError(f"averaging {self._averaging_shown()} rejected: {type(exc).__name__}: {exc}") from None
        self.t = 0
        self.epoch = 0
        self.skipped_steps = 0
        self._broken: str | None = None
        self._busy: str | None = None  # a closure step under way (optim_core.closure)
        self._names_by_id: dict[int, str] | None = None

    @classmethod
    def create(
        cls, spec: RunSpec | Mapping[str, Any], params: Mapping[str, torch.Tensor], *, device: str | torch.device | None = None
    ) -> tuple[RunState, dict[str, Any]]:
        """A new run from a user's spec, and its :meth:`describe`: the one entry point before anything is stored.

        Everything torch or timm refuse while the run is built, takes its first step, or is described is a
        :class:`SpecError` naming the entry and the options, in the library's words (``optim_core.creation``)."""
        return creation.create(cls, spec, params, device=device)

    def _averaging_shown(self) -> str:
        shown = [f"{name} {avg.to_dict()}" for name, avg in (("ema", self.spec.ema), ("swa", self.spec.swa)) if avg is not None]
        return ", ".join(shown)

    # ------------------------------------------------------------------ checks
    def check_gradients(self, grads: Mapping[str, torch.Tensor], *, donate: bool = False) -> dict[str, torch.Tensor]:
        """Validate a gradient payload; return it on the run's device in each parameter's dtype (``inputs.check_gradients``:
        a missing name means no gradient; ``donate``: aligned tensors needing no conversion are used in place)."""
        return inputs.check_gradients(self._params, grads, device=self.device, entry_name=self.entry.name, donate=donate)

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
    def lrs(self) -> list[float | None]:
        """The LR each param group steps with; None where the optimizer has no one number (see :meth:`lr_notes`)."""
        return describe.lrs(self.optimizer.param_groups)

    def lr_notes(self) -> list[str | None]:
        """For each group, why its entry in :attr:`lrs` is None (None where it is a number), e.g.
        ``"relative step size (timm Adafactor, lr=None): computed per parameter at every step"``."""
        return describe.lr_notes(self.optimizer.param_groups, self.entry.class_path)

    def apply(
        self,
        grads: Mapping[str, torch.Tensor],
        t: int,
        loss: float | None = None,
        *,
        donate: bool = False,
        hessians: Mapping[str, torch.Tensor] | None = None,
        measure: NormsMode = "off",
    ) -> StepResult:
        """Apply the gradients computed at step ``t`` (which must be the current step count). ``donate``: the
        caller will not read ``grads`` again, and those that need no conversion are not copied (``check_gradients``).
        ``hessians``: for Adahessian, the Hessian-diagonal estimates that ``hessian_request()`` asked for
        (``optim_core.hessian``); closure optimizers (LBFGS) step through ``begin_closure_step`` instead. ``measure``:
        the norms of the checked gradients, the update and the parameters the result carries (``optim_core.norms``)."""
        self._check_usable()
        if "closure" in self.entry.needs:
            raise ProtocolRequired(
                f"{self.entry.name} steps by closure evaluations, not by one gradient: use begin_closure_step(t) "
                "(optim_core.closure.ClosureStep), then provide(k, loss, gradients) for each evaluation it asks for"
            )
        if isinstance(t, bool) or not isinstance(t, int) or t != self.t:
            raise StepMismatch(f"gradient is for step t={t!r}, the run is at t={self.t}", current_t=self.t)
        inputs.check_finite("loss", loss)
        prepared = self.check_gradients(grads, donate=donate)
        feed = hessian.prepare(self, prepared, hessians)
        refused = sparse.refusal(self.optimizer, self._name_of_param(), prepared)
        if refused is not None:
            raise GradientError(f"{self.entry.name!r} cannot take this step: {refused}")
        steps_schedule = self._schedule_steps_now(epoch=False)
        if steps_schedule:
            assert self.schedule is not None
            self.schedule.check(epoch=False, metric=loss)
        nonfinite = inputs.nonfinite(prepared) + (inputs.nonfinite(feed.estimates, "#hessian") if feed is not None else [])
        if nonfinite and self.spec.nonfinite == "error":
            raise NonFiniteGradient(
                f"gradient(s) {nonfinite[:10]} contain NaN or Inf; the step was not applied "
                '(a run with nonfinite: "skip" skips such steps, as GradScaler does)'
            )

        def step() -> None:
            if nonfinite:
                self.skipped_steps += 1
            else:
                with self._rng_scope(), hessian.fed(self.optimizer, feed):
                    self.optimizer.step()

        try:
            for name, p in self._params.items():
                p.grad = prepared.get(name)
            _, measured = norms.measured(step, list(prepared.values()), list(self._params.values()), measure)
            self._after_step(loss, steps_schedule=steps_schedule)
        except Exception as exc:
            self._broken = f"step t={t} raised {type(exc).__name__}: {exc}"
            raise StepFailed(f"{self.entry.name!r} failed in step t={t}: {type(exc).__name__}: {exc}") from exc
        finally:
            for p in self._params.values():
                p.grad = None
        return StepResult(t=self.t, lrs=self.lrs, skipped=bool(nonfinite), norms=measured)

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
        return ClosureStep.begin(self, t)

    def hessian_request(self) -> HessianRequest:
        """What the worker must estimate for the next step of an Adahessian run: see ``optim_core.hessian``."""
        return hessian.request(self)

    def step_epoch(self, metric: float | None = None) -> StepResult:
        """The end of an epoch: epoch-interval schedulers (with the metric for plateau ones) and SWA."""
        self._check_usable()
        inputs.check_finite("metric", metric)
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
        if self.rng is None:
            yield
            return
        cuda = self.device.type == "cuda"
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self.rng["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self.rng["cuda"], self.device)
            yield
            self.rng = {"cpu": torch.get_rng_state()}
            if cuda:
                self.rng["cuda"] = torch.cuda.get_rng_state(self.device)

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
        return persist.optimizer_state_by_name(self)

    def _encoded(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """The state as a snapshot's JSON part and named tensors (``optim_core.persist``)."""
        self._check_usable()
        return persist.encoded(self)

    def to_bytes(self) -> bytes:
        return snapshot.pack(*self._encoded())

    def parts(self) -> list[memoryview]:
        """The snapshot file of the state as buffers, most of them the live tensors' own memory on the CPU (host
        copies of a GPU's, one per tensor; ``optim_format.snapshot.pack_parts``): to be written before the state changes (under
        the run's lock)."""
        return snapshot.pack_parts(*self._encoded())

    def capture(self, *, copy: bool = True) -> Captured:
        """A copy of the whole state, cheap enough for the step's path (a memcpy); serialize it later.

        The copy is in host memory whatever the run's device: on a GPU, a copy beside the state would take
        the device memory the run needs (CheckFreq's snapshot phase copies to the host too); on the CPU it is
        a clone. ``copy=False``: the state's own tensors, to be written out before anything steps it again."""
        meta, tensors = self._encoded()
        if copy:
            tensors = {k: v.to("cpu", copy=True) for k, v in tensors.items()}
        return Captured(t=self.t, epoch=self.epoch, meta=meta, tensors=tensors)

    def checksum(self) -> str:
        """A cheap fingerprint of the parameters, checked at every replayed step (``persist.checksum``)."""
        return persist.checksum(self)

    def nbytes(self) -> int:
        """The bytes of every tensor the state holds: parameters, optimizer state, averages (``persist.nbytes``)."""
        return persist.nbytes(self)

    def export(self) -> dict[str, Any]:
        """A checkpoint for plain torch/timm: ``model``, ``optimizer`` (with ``param_names``), ``lr_scheduler``,
        ``ema`` / ``swa``, ``step``; only tensors and containers, so ``torch.load(weights_only=True)`` reads it."""
        self._check_usable()
        return export.export(self)

    def load_export(self, data: Mapping[str, Any]) -> RunState:
        """A new RunState: this one with the parts of an ``export()``-shaped dict loaded into it (``optim_core.export``);
        this state is left untouched; what does not fit raises ``SnapshotError`` naming it."""
        return export.load_export(self, data)

    def trial_step(self, grads: Mapping[str, torch.Tensor] | None = None, *, loss: float | None = None) -> None:
        """One step with ``grads`` (zeros by default), the way this optimizer steps (``optim_core.creation``):
        through its closure protocol, with Hessian estimates of zero, with sparse gradients where it takes only
        those. For trials on copies (creation, loading a state)."""
        creation.trial_step(self, grads, loss=loss)

    def groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups by name, with every option they hold, as JSON (``betas`` as a list)."""
        return describe.named_groups(self.optimizer.state_dict()["param_groups"], self.names_in_optimizer_order)

    def describe(self) -> dict[str, Any]:
        """The JSON-able facts a service answers about the run: ``t``, ``epoch``, ``lr`` (per group, None where
        there is none), ``lr_notes`` (why), ``groups``, ``skipped_steps``, ``device`` and ``digest``."""
        return {
            "t": self.t,
            "epoch": self.epoch,
            "lr": self.lrs,
            "lr_notes": self.lr_notes(),
            "groups": self.groups(),
            "skipped_steps": self.skipped_steps,
            "device": self.device.type,
            "digest": self.digest(),
        }

    def preview_lrs(self, count: int) -> list[list[float | None]]:
        """The LR of every group for the next ``count`` intervals of the scheduler, computed on a copy.

        Plateau schedulers are previewed as if the metric never improved or worsened enough to act.
        """
        if self.schedule is None:
            return [self.lrs for _ in range(count)]
        return self.schedule.preview(self.optimizer, t=self.t, epoch=self.epoch, count=count)

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
        return persist.load(cls, meta, tensors, device=device, adopt=adopt)
