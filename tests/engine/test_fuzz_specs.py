"""Every spec is answered (issue 22): every catalogue entry, each of its hyper-parameters set to odd values, either
creates a run that steps and describes itself in JSON, or is refused with an ``EngineError`` — never anything else.

Measured before the fix (RunState(...), then lrs / groups / digest / preview / export, one step, and lrs / groups /
digest again; all 11 odd values but False for every available entry and hyper-parameter), 2,720 of 22,876 cases
raised something else:
2,332 ``StepFailed`` at the first step (TypeError 1,266, AssertionError 621 — ``capturable=True`` on a CPU —,
RuntimeError 317, ValueError 82, OverflowError 20, TorchRuntimeError 12, MemoryError 8 — Muon's ``ns_steps`` —,
ZeroDivisionError 6) across 170 entries, and 388 ``TypeError``s (``float(None)``) describing a new
relative-step Adafactor (adafactor, cadafactor and their lookahead_ forms).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from optim_core import EngineError, RunState, SpecError, get_optimizer, list_optimizers

from ..reference import initial_params, make_grads, make_model, manifest

# JSON's odd values: wrong types, null and booleans, signs, zero, the largest and smallest finite doubles, an integer
# past float precision (NaN and Infinity are not JSON).
WRONG_TYPES: list[Any] = ["odd", [0.5, 0.5], {"k": 1}]
NULL_AND_BOOLS: list[Any] = [None, True, False]
NUMBERS: list[Any] = [-1, 0, -1e308, 1e308, 5e-324, 2**53]
ODD_VALUES = WRONG_TYPES + NULL_AND_BOOLS + NUMBERS
# OPTIM_FUZZ_FULL=1: every odd value for every (entry, hyper-parameter): 24,939 cases, ~70 s on one core.
FULL = os.environ.get("OPTIM_FUZZ_FULL") == "1"
ENTRIES = [e.name for e in list_optimizers() if e.available]


def _values(entry_name: str, hyperparameter: str, index: int) -> list[Any]:
    """The odd values tried for the ``index``-th hyper-parameter of an entry.

    Every value costs a build and a trial step, so by default each hyper-parameter gets one of each kind (a wrong
    type, null or a boolean, two numbers), rotating with ``index`` so that an entry's hyper-parameters together
    get all of them. lookahead_X passes X's hyper-parameters through the same code, so those get two values
    each; its own lookahead_alpha / lookahead_k get all of them.
    """
    if FULL or hyperparameter.startswith("lookahead_"):
        return ODD_VALUES
    picked = [WRONG_TYPES[index % 3], NULL_AND_BOOLS[index % 3], NUMBERS[index % 6], NUMBERS[(index + 3) % 6]]
    return picked[index % 2 :: 2] if get_optimizer(entry_name).lookahead else picked


def _answered(run: RunState) -> None:
    """What a service reads off a run to answer, as JSON."""
    json.dumps({**run.describe(), "preview": run.preview_lrs(2)}, allow_nan=False)
    run.export()


def _case(model: torch.nn.Module, grads: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> str:
    """``"ok"``, or the name of the EngineError that refused the spec; anything else propagates."""
    spec = {"params": manifest(model), "optimizer": optimizer}
    try:
        run, facts = RunState.create(spec, initial_params(model))
    except EngineError as exc:
        return type(exc).__name__
    json.dumps(facts, allow_nan=False)
    try:
        run.trial_step(grads)  # the way the entry steps: its closure, its Hessian estimates, sparse gradients
    except EngineError as exc:  # a gradient refused (none here is non-finite or of the wrong shape)
        return type(exc).__name__
    _answered(run)
    return "ok"


@pytest.mark.parametrize("name", ENTRIES)
def test_odd_hyperparameters_are_answered(name: str) -> None:
    # Kron compiles its preconditioner functions (torch.compile, dynamic=False) and recompiles for every new odd
    # value: a minute of this test's time. Eager runs the same Python, which is where options are checked; the
    # parity tests step the compiled Kron. One thread: torch.triu splits even an 8x8 matrix between OpenMP threads,
    # ~1 ms a call on a busy 2-core machine instead of ~1 us.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.compiler.set_stance("force_eager"):
            _odd_hyperparameters_are_answered(name)
    finally:
        torch.set_num_threads(threads)


def _odd_hyperparameters_are_answered(name: str) -> None:
    entry = get_optimizer(name)
    model = make_model(only_2d="2d_params" in entry.needs)
    grads = make_grads(model, 1)[0]
    # the library's defaults alone: a run, unless the library has no default for something (timm's SGDP: lr)
    if entry.required:
        with pytest.raises(SpecError, match="lr"):
            RunState.create({"params": manifest(model), "optimizer": {"name": name}}, initial_params(model))
    else:
        assert _case(model, grads, {"name": name}) == "ok"
    unexpected = []
    outcomes: dict[str, int] = {}
    for index, hyperparameter in enumerate(entry.hyperparameters):
        for value in _values(name, hyperparameter, index):
            options = {"name": name, hyperparameter: value}
            if entry.required and hyperparameter not in entry.required:
                options.update({r: 0.01 for r in entry.required})
            try:
                outcome = _case(model, grads, options)
            except Exception as exc:
                unexpected.append(f"{hyperparameter}={value!r}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not unexpected, f"{name}: {len(unexpected)} case(s) raised outside EngineError:\n" + "\n".join(unexpected[:20])
    # the cases exercised both answers: some odd values are accepted (0, large numbers), some refused (strings)
    assert outcomes.get("ok", 0) > 0 and sum(n for k, n in outcomes.items() if k != "ok") > 0, outcomes
