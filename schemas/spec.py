"""The run spec as the API declares it (pydantic only): the fields ``/docs`` shows and a request is checked
against first. Unknown fields are refused, naming them; the engine (``optim_core.RunSpec``) then checks what
only it can (names in the catalogue, hyper-parameters its library accepts, safe expressions).

Types are strict, as JSON gives them: a number where a number belongs (an integer is a number), ``true`` or
``false`` where a flag belongs; nothing is coerced from a string.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ParamDtype = Literal["float64", "float32", "float16", "bfloat16"]
Interval = Literal["step", "epoch"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """Named fields, and any keyword of the library's constructor beside them."""

    model_config = ConfigDict(extra="allow", strict=True)


class ParamSpec(_Closed):
    name: str = Field(description="The parameter's name, as in model.named_parameters(): letters, digits, '_.:-'.")
    shape: list[int]
    dtype: ParamDtype = "float32"


class OptimizerSpec(_Open):
    """An optimizer of the catalogue (``GET /optimizers``) and its hyper-parameters; any other field is passed to
    its constructor (timm's ``create_optimizer_v2`` or the ``torch.optim`` class) as a keyword."""

    name: str = Field(description="A catalogue name: a timm name (`adamw`, `lamb`, `lookahead_adamw`, ...) or torch.<Class>.")
    lr: float | None = Field(default=None, description="Unset: the library's default.")
    weight_decay: float | None = Field(default=None, description="Unset: the library's default.")
    implementation: Literal["default", "foreach", "fused"] = "default"


class GroupSpec(_Open):
    """Parameters matched by name patterns (fnmatch), with options for their group (lr, weight_decay, ...)."""

    params: list[str] | str


class ParamGroupsSpec(_Closed):
    filter_bias_and_bn: bool | None = Field(
        default=None, description="timm's convention: 1-D tensors and *.bias get no weight decay. Unset: the library's default."
    )
    no_weight_decay: list[str] | str | None = None
    fallback: list[str] | str | None = None
    layer_decay: float | None = Field(default=None, description="timm's layer-wise LR decay.")
    layer_decay_min_scale: float | None = None
    layer_rule: dict[str, Any] | None = Field(default=None, description="name -> layer, as a timm model's group_matcher().")
    classifier: str | None = None
    groups: list[GroupSpec] | None = None


class SchedulerSpec(_Open):
    """A torch.optim.lr_scheduler class or a timm scheduler name (``GET /schedulers``) with its arguments."""

    name: str
    interval: Interval | None = Field(default=None, description="Stepped per optimizer step (default) or per epoch.")


class EmaSpec(_Closed):
    decay: float | None = None
    warmup: bool | None = None
    warmup_gamma: float | None = None
    warmup_power: float | None = None
    min_decay: float | None = None
    update_after_step: int | None = None


class SwaSpec(_Closed):
    start: int
    every: int | None = None
    swa_lr: float | None = None
    anneal_steps: int | None = None
    anneal_strategy: Literal["cos", "linear"] | None = None
    interval: Interval | None = None


class WorkersSpec(_Closed):
    """Several workers (ranks) on one run: data parallel, synchronous or asynchronous."""

    world_size: int = Field(description="How many ranks send gradients (torchrun's WORLD_SIZE).")
    mode: Literal["sync", "async"] = Field(
        default="sync",
        description="sync: one step of the ranks' mean gradient per t; async: each gradient a step as it arrives.",
    )
    quorum: int | None = Field(default=None, description="sync: ranks enough to step once the straggler timeout passed.")
    straggler_timeout_s: float | None = Field(default=None, description="sync: seconds after a step's first gradient.")
    max_staleness: int | None = Field(default=None, description="async: steps a gradient may lag the run (default 4).")


class RunSpecBody(_Closed):
    """What a run is made of: the parameter manifest, the optimizer, its groups, scheduler and averages."""

    params: list[ParamSpec] = Field(description="The parameters in order: names, shapes and dtypes.")
    optimizer: OptimizerSpec | str
    param_groups: ParamGroupsSpec | None = None
    scheduler: SchedulerSpec | None = None
    ema: EmaSpec | None = None
    swa: SwaSpec | None = None
    nonfinite: Literal["error", "skip"] | None = Field(default=None, description="NaN/Inf gradients: refused, or skipped.")
    seed: int | None = None
    workers: WorkersSpec | None = Field(default=None, description="Several workers on the run; unset: one.")

    def to_engine(self) -> dict[str, Any]:
        """The spec as the engine reads it: what the request said, nothing filled in."""
        return self.model_dump(exclude_unset=True)
