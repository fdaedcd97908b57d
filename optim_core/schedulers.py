"""LR schedulers: every ``torch.optim.lr_scheduler`` class by class name and every timm scheduler by
its ``create_scheduler_v2`` name, built by torch / timm themselves and stepped the way their own
training loops step them.

Spec: ``{"name": ..., "interval": "step" | "epoch", **kwargs}``; ``SequentialLR`` and
``ChainedScheduler`` take nested specs in ``schedulers``. ``LambdaLR`` / ``MultiplicativeLR`` take
an arithmetic expression of ``step`` (see :class:`SafeExpression`), never code.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import simpleeval
import torch
from timm.scheduler import create_scheduler_v2
from torch.optim import lr_scheduler

from optim_format import tree

from .describe import lrs
from .errors import EngineError, SpecError, UnknownName
from .spec import is_finite_number

TIMM_SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")
TORCH_SCHEDULERS: dict[str, type] = {
    name: getattr(lr_scheduler, name) for name in sorted(lr_scheduler.__all__) if name != "LRScheduler"
}
_NESTED = ("SequentialLR", "ChainedScheduler")
_EXPRESSION = ("LambdaLR", "MultiplicativeLR")
_PLATEAU = ("ReduceLROnPlateau", "plateau")
_RESERVED = ("optimizer", "last_epoch", "verbose", "step_on_epochs")
MAX_EXPRESSION_LENGTH = 1000


class ExpressionError(SpecError):
    """A schedule expression that is unsafe, malformed, or fails for some step."""


class MetricRequired(EngineError):
    """A plateau scheduler was stepped without the metric it decides on."""


def _safe_pow(a: float, b: float) -> float:
    # floats overflow to an error at once; Python ints would compute a number with millions of digits
    return math.pow(a, b)


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _safe_pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Gt: operator.gt,
    ast.Lt: operator.lt,
    ast.GtE: operator.ge,
    ast.LtE: operator.le,
    ast.Not: operator.not_,
}
_FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "exp": math.exp,
    "log": math.log,
    "sqrt": math.sqrt,
    "cos": math.cos,
    "sin": math.sin,
    "tanh": math.tanh,
    "floor": math.floor,
    "ceil": math.ceil,
    "pow": _safe_pow,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# Expression grammar: numbers, the names above, arithmetic, comparisons, and/or, if-else, calls of
# the functions above. No attributes, subscripts, strings, containers or comprehensions.
_ALLOWED_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.IfExp,
    ast.Call,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
)


class SafeExpression:
    """``step -> factor``, from an arithmetic expression, evaluated by simpleeval with a closed grammar."""

    def __init__(self, text: Any, *, where: str) -> None:
        self.where = where
        if not isinstance(text, str) or not text.strip():
            raise ExpressionError(f"{where} must be an arithmetic expression of 'step' as a string, got {text!r}")
        if len(text) > MAX_EXPRESSION_LENGTH:
            raise ExpressionError(f"{where} is {len(text)} characters long; at most {MAX_EXPRESSION_LENGTH} are allowed")
        self.text = text
        try:
            # mode="eval": exactly one expression; statements and assignments are syntax errors
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"{where}: {text!r} is not an expression: {exc.msg}") from None
        except (ValueError, MemoryError, RecursionError) as exc:  # null bytes, nesting too deep
            raise ExpressionError(f"{where}: {text[:80]!r} cannot be parsed: {exc}") from None
        self._tree = tree.body
        for node in ast.walk(tree):
            if not isinstance(node, _ALLOWED_NODES):
                raise ExpressionError(f"{where}: {type(node).__name__} is not allowed in {text!r}")
            if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
                raise ExpressionError(f"{where}: only numbers may appear as literals in {text!r}, got {node.value!r}")
            if isinstance(node, ast.Name) and node.id not in _FUNCTIONS and node.id not in _CONSTANTS and node.id != "step":
                raise ExpressionError(f"{where}: unknown name {node.id!r} in {text!r}; use step, {sorted(_FUNCTIONS)}, pi, e")
            if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.keywords):
                raise ExpressionError(f"{where}: only plain calls of {sorted(_FUNCTIONS)} are allowed in {text!r}")
        self._evaluator = simpleeval.SimpleEval(operators=_OPERATORS, functions=_FUNCTIONS, names=None)
        self(0)  # fail at creation, not at the first step, where it can

    def __call__(self, step: int) -> float:
        self._evaluator.names = {"step": step, **_CONSTANTS}
        try:
            value = self._evaluator.eval(self.text, previously_parsed=self._tree)
        except Exception as exc:
            raise ExpressionError(f"{self.where}: {self.text!r} fails at step={step}: {type(exc).__name__}: {exc}") from None
        if not is_finite_number(value) or value < 0:
            raise ExpressionError(f"{self.where}: {self.text!r} gives {value!r} at step={step}; it must be a finite number >= 0")
        return float(value)


@dataclass
class _Built:
    scheduler: Any
    expressions: list[tuple[Any, list[SafeExpression]]]


def _kwargs(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    reserved = sorted(set(spec) & set(_RESERVED))
    if reserved:
        raise SpecError(f"{where}: {reserved} cannot be set (the run keeps the position itself; use 'interval')")
    return {k: v for k, v in spec.items() if k not in ("name", "interval")}


def _build_torch(spec: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str) -> _Built:
    name = spec["name"]
    cls = TORCH_SCHEDULERS[name]
    kwargs = _kwargs(spec, where)
    expressions: list[tuple[Any, list[SafeExpression]]] = []
    if name in _EXPRESSION:
        raw = kwargs.get("lr_lambda")
        texts = raw if isinstance(raw, list) else [raw]
        exprs = [SafeExpression(t, where=f"{where}.lr_lambda") for t in texts]
        # plain functions, so that torch's state_dict stores None for them rather than their __dict__
        fns = [_as_function(e) for e in exprs]
        kwargs["lr_lambda"] = fns if isinstance(raw, list) else fns[0]
    if name in _NESTED:
        children = kwargs.get("schedulers")
        if not isinstance(children, list) or not children:
            raise SpecError(f"{where}.schedulers must be a non-empty list of scheduler specs")
        built = []
        for i, child in enumerate(children):
            child_where = f"{where}.schedulers[{i}]"
            _check_name(child, child_where)
            if child["name"] not in TORCH_SCHEDULERS or child["name"] in _PLATEAU:
                raise SpecError(
                    f"{child_where}: {name} chains torch schedulers other than ReduceLROnPlateau, got {child['name']!r}"
                )
            if "interval" in child:
                raise SpecError(f"{child_where}: 'interval' belongs to the outer scheduler only")
            b = _build_torch(child, optimizer, child_where)
            built.append(b.scheduler)
            expressions += b.expressions
        kwargs["schedulers"] = built
    try:
        if name == "ChainedScheduler":
            scheduler = cls(optimizer=optimizer, **kwargs)
        else:
            scheduler = cls(optimizer, **kwargs)
    except ExpressionError:
        raise
    except Exception as exc:
        raise SpecError(f"{where}: {name} rejected {_show(kwargs)}: {exc}") from None
    if name in _EXPRESSION:
        expressions.append((scheduler, exprs))
    return _Built(scheduler, expressions)


def _as_function(expr: SafeExpression) -> Any:
    def lr_lambda(step: int) -> float:
        return expr(step)

    return lr_lambda


def _show(kwargs: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v if k != 'schedulers' else '[...]'!r}" for k, v in kwargs.items()) + "}"


_TIMM_PARAMS = set(inspect.signature(create_scheduler_v2).parameters) - {"optimizer", "sched", "step_on_epochs"}


def _build_timm(spec: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str, interval: str) -> _Built:
    kwargs = _kwargs(spec, where)
    unknown = sorted(set(kwargs) - _TIMM_PARAMS)
    if unknown:
        raise SpecError(
            f"{where}: unknown argument(s) {unknown} for timm scheduler {spec['name']!r}; allowed: {sorted(_TIMM_PARAMS)}"
        )
    if interval == "step":
        kwargs.setdefault("updates_per_epoch", 1)  # so that *_epochs count optimizer steps
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=spec["name"], step_on_epochs=interval == "epoch", **kwargs)
    except Exception as exc:
        raise SpecError(
            f"{where}: timm scheduler {spec['name']!r} rejected {_show(kwargs)}: {exc or type(exc).__name__}"
        ) from None
    return _Built(scheduler, [])


def _check_name(spec: Any, where: str) -> None:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise SpecError(f"{where} must be an object with a 'name', got {spec!r}")
    if spec["name"] not in TORCH_SCHEDULERS and spec["name"] not in TIMM_SCHEDULERS:
        raise UnknownName(
            f"{where}: unknown scheduler {spec['name']!r}; torch: {sorted(TORCH_SCHEDULERS)}, timm: {list(TIMM_SCHEDULERS)}"
        )


class Schedule:
    """One configured scheduler and how a training loop steps it."""

    def __init__(self, spec: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
        _check_name(spec, "scheduler")
        self.spec = spec
        self.name: str = spec["name"]
        self.interval: str = spec.get("interval", "step")
        if self.interval not in ("step", "epoch"):
            raise SpecError(f"scheduler.interval must be 'step' or 'epoch', got {self.interval!r}")
        self.is_timm = self.name in TIMM_SCHEDULERS
        self.needs_metric = self.name in _PLATEAU
        if self.is_timm:
            built = _build_timm(spec, optimizer, "scheduler", self.interval)
        else:
            built = _build_torch(spec, optimizer, "scheduler")
        self.scheduler = built.scheduler
        self._expressions = built.expressions

    def check(self, *, epoch: bool, metric: float | None) -> None:
        """Everything that can make the next step of this schedule fail, checked before anything changes."""
        if (self.interval == "epoch") != epoch:
            return
        if self.needs_metric and metric is None:
            what = "an epoch step's 'metric'" if epoch else "the step's 'loss'"
            raise MetricRequired(f"scheduler {self.name!r} decides on a metric: {what} is required")
        if metric is not None and not is_finite_number(metric):
            raise MetricRequired(f"the metric for scheduler {self.name!r} must be finite, got {metric!r}")
        for sched, exprs in self._expressions:
            for expr in exprs:
                expr(sched.last_epoch + 1)

    def after_step(self, t: int, loss: float | None) -> None:
        """Called after optimizer step ``t`` (1-based), as a per-step training loop would."""
        if self.interval != "step":
            return
        if self.is_timm:
            self.scheduler.step_update(num_updates=t, metric=loss)
        elif self.needs_metric:
            self.scheduler.step(loss)
        else:
            self.scheduler.step()

    def after_epoch(self, epoch: int, metric: float | None) -> None:
        """Called at the end of epoch ``epoch`` (1-based: timm's ``step(epoch + 1)``)."""
        if self.interval != "epoch":
            return
        if self.is_timm:
            self.scheduler.step(epoch, metric)
        elif self.needs_metric:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def preview(self, optimizer: torch.optim.Optimizer, *, t: int, epoch: int, count: int) -> list[list[float | None]]:
        """The LR of every group of ``optimizer`` for the next ``count`` intervals, stepped on a copy of this schedule
        over a :class:`ShadowOptimizer`; plateau schedulers as if the metric never improved or worsened enough to act."""
        shadow = ShadowOptimizer(optimizer)
        copied = Schedule(self.spec, shadow)
        tensors: dict[str, torch.Tensor] = {}
        copied.load_state_dict(tree.decode_tree(tree.encode_tree(self.state_dict(), "", tensors), tensors))
        shadow.load_groups(optimizer)
        metric = float("inf") if self.needs_metric else None
        out = []
        for i in range(1, count + 1):
            if self.interval == "epoch":
                copied.after_epoch(epoch + i, metric)
            else:
                copied.after_step(t + i, metric)
            out.append(lrs(shadow.param_groups))
        return out

    def state_dict(self) -> dict[str, Any]:
        if not self.is_timm:
            return self.scheduler.state_dict()
        # timm's Scheduler.state_dict is its __dict__; its plateau scheduler keeps only `best` and
        # `last_epoch` of the torch scheduler it wraps, so a resume would forget patience and cooldown.
        state = {k: v for k, v in vars(self.scheduler).items() if k not in ("optimizer", "lr_scheduler")}
        inner = getattr(self.scheduler, "lr_scheduler", None)
        if inner is not None:
            state["lr_scheduler"] = inner.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.is_timm:
            self.scheduler.load_state_dict(dict(state))
            return
        state = dict(state)
        inner = state.pop("lr_scheduler", None)
        vars(self.scheduler).update(state)
        if inner is not None:
            self.scheduler.lr_scheduler.load_state_dict(inner)


def describe_schedulers() -> list[dict[str, Any]]:
    """The scheduler catalogue, for ``GET /schedulers``."""
    out = []
    for name, cls in TORCH_SCHEDULERS.items():
        params = [p for p in inspect.signature(cls).parameters if p not in ("optimizer", *_RESERVED)]
        out.append(
            {
                "name": name,
                "family": "torch",
                "class": f"torch.optim.lr_scheduler.{name}",
                "arguments": params,
                "needs_metric": name in _PLATEAU,
                "expression": name in _EXPRESSION,
                "nested": name in _NESTED,
            }
        )
    for name in TIMM_SCHEDULERS:
        out.append(
            {
                "name": name,
                "family": "timm",
                "class": "timm.scheduler.create_scheduler_v2",
                "arguments": sorted(_TIMM_PARAMS),
                "needs_metric": name in _PLATEAU,
                "expression": False,
                "nested": False,
            }
        )
    return out


class ShadowOptimizer(torch.optim.Optimizer):
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
