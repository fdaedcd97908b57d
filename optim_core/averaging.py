"""Weight averages kept beside the optimizer: EMA and SWA, by torch's and timm's own classes.

- EMA without warm-up is ``AveragedModel`` with ``get_ema_multi_avg_fn(decay)``; with warm-up it is
  timm's ``ModelEmaV3`` (decay ``1 - (1 + step / gamma) ** -power``, clamped to ``[min_decay, decay]``).
- SWA is ``AveragedModel`` (running mean) from step ``start``, every ``every`` steps, and ``SWALR``
  takes over from the LR scheduler at ``start`` when ``swa_lr`` is set (torch's recipe).
BatchNorm statistics need data, so ``update_bn`` runs on the worker with the averaged weights.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from timm.utils.model_ema import ModelEmaV3
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from .errors import SnapshotError
from .params import ParamModule
from .spec import EmaSpec, SwaSpec


def _averaged_params(model: torch.nn.Module) -> list[torch.Tensor]:
    # AveragedModel / ModelEmaV3 keep a deep copy of the ParamModule in `.module`
    return list(cast(ParamModule, model.module).params)


def _load_params(model: torch.nn.Module, names: list[str], tensors: dict[str, torch.Tensor], what: str) -> None:
    with torch.no_grad():
        for name, p in zip(names, _averaged_params(model), strict=False):
            if name not in tensors:
                raise SnapshotError(f"snapshot has no {what} value for parameter {name!r}")
            src = tensors[name]
            if src.shape != p.shape or src.dtype != p.dtype:
                raise SnapshotError(
                    f"{what} value of {name!r} is {src.dtype} {list(src.shape)}, the run has {p.dtype} {list(p.shape)}"
                )
            p.copy_(src)


class Ema:
    def __init__(self, spec: EmaSpec, module: ParamModule) -> None:
        self.spec = spec
        self.names = list(module.names)
        self.model: ModelEmaV3 | AveragedModel
        if spec.warmup:
            self.model = ModelEmaV3(
                module,
                decay=spec.decay,
                min_decay=spec.min_decay,
                update_after_step=spec.update_after_step,
                use_warmup=True,
                warmup_gamma=spec.warmup_gamma,
                warmup_power=spec.warmup_power,
            )
        else:
            self.model = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(spec.decay))

    def update(self, module: ParamModule, t: int) -> None:
        if isinstance(self.model, ModelEmaV3):
            self.model.update(module, step=t)  # timm's train loop passes the update count
        else:
            self.model.update_parameters(module)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, _averaged_params(self.model), strict=False))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"params": self.tensors()}
        if isinstance(self.model, ModelEmaV3):
            state["sr_generator"] = self.model._sr_generator.get_state()
        else:
            state["n_averaged"] = self.model.n_averaged
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_params(self.model, self.names, state["params"], "EMA")
        if isinstance(self.model, ModelEmaV3):
            self.model._sr_generator.set_state(state["sr_generator"])
        else:
            self.model.n_averaged.copy_(state["n_averaged"])


class Swa:
    def __init__(self, spec: SwaSpec, module: ParamModule, optimizer: torch.optim.Optimizer) -> None:
        self.spec = spec
        self.names = list(module.names)
        self.model = AveragedModel(module)
        self.scheduler = (
            SWALR(optimizer, swa_lr=spec.swa_lr, anneal_epochs=spec.anneal_steps, anneal_strategy=cast(Any, spec.anneal_strategy))
            if spec.swa_lr is not None
            else None
        )

    def active(self, count: int) -> bool:
        return count >= self.spec.start

    def after(self, module: ParamModule, count: int) -> None:
        """At the end of step (or epoch) ``count`` once SWA is active: SWALR, then the average."""
        if self.scheduler is not None:
            self.scheduler.step()
        if (count - self.spec.start) % self.spec.every == 0:
            self.model.update_parameters(module)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, _averaged_params(self.model), strict=False))

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.tensors(),
            "n_averaged": self.model.n_averaged,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_params(self.model, self.names, state["params"], "SWA")
        self.model.n_averaged.copy_(state["n_averaged"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
