"""Every catalogue entry, stepped through RunState, is bitwise the optimizer timm / torch builds in-process:
with options, and with none at all (a name means its library's behaviour, issue 19)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import timm.optim
import torch

from optim_client.params import as_torch as _as_torch
from optim_core import EngineError, RunState, SpecError, Unavailable, get_optimizer, list_optimizers
from optim_core.catalogue import LOOKAHEAD_PREFIX, PROTOCOLS, TORCH_PREFIX
from optim_format import framing

from ..reference import (
    DEVICES,
    assert_params_bitwise,
    assert_tree_bitwise,
    initial_params,
    make_grads,
    make_model,
    manifest,
    set_grads,
)
from . import test_closure, test_hessian, test_sparse

ENTRIES = list_optimizers()
# entries that step by a protocol of their own (closure, Hessian estimates, sparse gradients only) are proven
# bitwise in that protocol's module, which lists them in COVERS; every other available entry is proven here
PROTOCOL_TESTS = {"closure": test_closure, "hessian": test_hessian, "sparse_grad": test_sparse}
PROTOCOL_ENTRIES = {e.name for e in ENTRIES if e.available and set(e.needs) & set(PROTOCOLS)}
AVAILABLE = [e.name for e in ENTRIES if e.available and e.name not in PROTOCOL_ENTRIES]
UNAVAILABLE = [e.name for e in ENTRIES if not e.available]
LR, WD, STEPS, SEED = 0.01, 0.05, 4, 7


def test_catalogue_holds_every_timm_and_torch_optimizer() -> None:
    names = {e.name for e in ENTRIES}
    timm_names = set(timm.optim.list_optimizers())
    assert timm_names <= names
    assert {LOOKAHEAD_PREFIX + n for n in timm_names} <= names
    torch_classes = {
        n
        for n in torch.optim.__all__
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    }
    assert {TORCH_PREFIX + n for n in torch_classes} <= names
    assert len(names) == len(timm_names) * 2 + len(torch_classes)


def test_every_entry_describes_itself_as_json() -> None:
    for e in ENTRIES:
        d = json.loads(json.dumps(e.describe(), allow_nan=False))
        assert d["name"] == e.name and d["description"], e.name
        assert d["available"] == (d["reason"] is None), e.name
        assert "default" in d["implementations"]


def test_protocol_entries_say_what_they_need() -> None:
    assert "closure" in get_optimizer("torch.LBFGS").needs
    assert "hessian" in get_optimizer("adahessian").needs
    assert "hessian" in get_optimizer("lookahead_adahessian").needs
    assert "sparse_grad" in get_optimizer("torch.SparseAdam").needs
    assert get_optimizer("adamw").implementations == ("default", "foreach", "fused")


def test_every_protocol_entry_is_available_and_proven_by_its_protocol_s_tests() -> None:
    for need, module in PROTOCOL_TESTS.items():
        entries = {e.name for e in ENTRIES if need in e.needs}
        assert entries and all(get_optimizer(n).available for n in entries), need
        assert set(module.COVERS) == entries, (
            f"{module.__name__} proves {module.COVERS}, the catalogue needs {need} for {entries}"
        )
    assert PROTOCOL_ENTRIES == {n for m in PROTOCOL_TESTS.values() for n in m.COVERS}


@pytest.mark.parametrize("name", sorted(PROTOCOL_ENTRIES))
def test_a_protocol_entry_stepped_by_plain_gradients_names_its_protocol(name: str) -> None:
    entry = get_optimizer(name)
    model = make_model()
    run = RunState({"params": manifest(model), "optimizer": {"name": name}}, initial_params(model))
    before = run.digest()
    with pytest.raises(EngineError) as info:
        run.apply(make_grads(model, 1)[0], 0)
    words = {"closure": "begin_closure_step", "hessian": "hessian_request", "sparse_grad": "sparse"}
    assert all(words[n] in str(info.value) for n in entry.needs if n in words), str(info.value)
    assert run.digest() == before


def _weight_decay(name: str) -> float | None:
    entry = get_optimizer(name)
    return WD if entry.family == "timm" or "weight_decay" in entry.hyperparameters else None


def _reference(name: str, model: torch.nn.Module, **options: Any) -> torch.optim.Optimizer:
    """What a user writes in-process for this catalogue name: ``torch.optim.X(model.parameters(), **options)`` or
    ``timm.optim.create_optimizer_v2(model, name, **options)``."""
    if name.startswith(TORCH_PREFIX):
        return getattr(torch.optim, name.removeprefix(TORCH_PREFIX))(model.parameters(), **options)
    return timm.optim.create_optimizer_v2(model, name, **options)


def _as_received(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients as the service decodes a client's body: views of one writable buffer torch allocated,
    the client's order (``aligned_first``) putting most of them at multiples of 64 bytes, the rest not."""
    return framing.views(framing.encode(framing.aligned_first(grads)))[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("donate", [False, True], ids=["copied", "donated"])
@pytest.mark.parametrize("name", AVAILABLE)
def test_steps_bitwise_equal_to_in_process(name: str, donate: bool, device: str) -> None:
    only_2d = "2d_params" in get_optimizer(name).needs
    model = make_model(only_2d=only_2d).to(device)
    options = {"lr": LR} if _weight_decay(name) is None else {"lr": LR, "weight_decay": WD}
    spec = {"params": manifest(model), "optimizer": {"name": name, **options}, "seed": SEED}
    run = RunState(spec, initial_params(model), device=device)
    # the last weight gets no gradient at step 2: a missing name means p.grad is None, as in torch
    grads = make_grads(model, STEPS, drop=(2, "head.weight"))

    torch.manual_seed(SEED)  # what the run's seed stands for: the global RNG at the start of the loop
    if device == "cuda":
        torch.cuda.manual_seed(SEED)
    ref = _reference(name, model, **options)
    for g in grads:
        set_grads(model, g)
        ref.step()

    torch.manual_seed(12345)  # the engine must not depend on (or consume) this process's global RNG
    global_rng = torch.get_rng_state()
    for k, g in enumerate(grads):
        result = run.apply(_as_received(g) if donate else g, k, donate=donate)
        assert result.t == k + 1
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert_params_bitwise(model, run.params(), name)
    assert_tree_bitwise(ref.state_dict()["state"], run.optimizer.state_dict()["state"], name)
    assert run.lrs == [g["lr"] for g in ref.param_groups]


def _as_json(value: Any) -> Any:
    """A param-group option as JSON says it (tuples as lists, dtypes by name): what ``RunState.groups()`` answers."""
    return json.loads(json.dumps(value, allow_nan=False, default=lambda v: str(v).removeprefix("torch.")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", AVAILABLE)
def test_defaults_alone_are_the_library_s(name: str, device: str) -> None:
    """``{"name": name}`` and nothing else steps exactly as ``torch.optim.X(model.parameters())`` or
    ``create_optimizer_v2(model, name)``: the same groups (every key, ``betas`` included), LRs and bits."""
    model = make_model(only_2d="2d_params" in get_optimizer(name).needs).to(device)
    spec = {"params": manifest(model), "optimizer": {"name": name}, "seed": SEED}
    torch.manual_seed(SEED)
    if device == "cuda":
        torch.cuda.manual_seed(SEED)
    try:
        ref = _reference(name, model)
    except (ValueError, TypeError) as exc:  # timm's SGDP has no default lr: the library itself refuses
        with pytest.raises(SpecError) as info:
            RunState.create(spec, initial_params(model), device=device)
        assert name in str(info.value) and str(exc) in str(info.value)
        return
    run, facts = RunState.create(spec, initial_params(model), device=device)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in ref.param_groups for p in g["params"]]
    expected_groups = [
        {"params": [order[i] for i in g["params"]], **{k: _as_json(v) for k, v in g.items() if k != "params"}}
        for g in ref.state_dict()["param_groups"]
    ]
    assert run.groups() == expected_groups == facts["groups"]
    for k, g in enumerate(make_grads(model, STEPS)):
        set_grads(model, g)
        ref.step()
        run.apply(g, k)
    assert_params_bitwise(model, run.params(), name)
    assert_tree_bitwise(ref.state_dict()["state"], run.optimizer.state_dict()["state"], name)
    # timm's relative-step Adafactor has no one LR per group: None, and a note that says why
    expected_lrs = [None if g.get("relative_step") else g["lr"] for g in ref.param_groups]
    assert run.lrs == expected_lrs and facts["lr"] == [
        None if g.get("relative_step") else g["lr"] for g in run.optimizer.param_groups
    ]
    notes = run.lr_notes()
    assert [n is None for n in notes] == [lr is not None for lr in expected_lrs]
    assert all("relative step" in n for n in notes if n is not None)
    json.dumps(facts, allow_nan=False)


def test_a_torch_name_decays_every_tensor_as_torch_does() -> None:
    """Issue 19: torch.AdamW with lr alone is torch.optim.AdamW(params, lr=...): 1-D tensors decay too (0.01)."""
    model = make_model()
    run = RunState({"params": manifest(model), "optimizer": {"name": "torch.AdamW", "lr": 1e-3}}, initial_params(model))
    assert [g["weight_decay"] for g in run.groups()] == [0.01] and len(run.groups()[0]["params"]) == len(manifest(model))
    assert run.spec.to_dict()["param_groups"]["filter_bias_and_bn"] is False  # stored explicitly, decided once
    timm_run = RunState({"params": manifest(model), "optimizer": {"name": "adamw", "weight_decay": 0.05}}, initial_params(model))
    assert timm_run.spec.to_dict()["param_groups"]["filter_bias_and_bn"] is True  # create_optimizer_v2's default


def test_a_stored_torch_spec_that_filters_keeps_filtering() -> None:
    """Runs stored before issue 19 say ``filter_bias_and_bn: true`` explicitly: they build what they built then."""
    model = make_model()
    spec = {
        "params": manifest(model),
        "optimizer": {"name": "torch.AdamW", "lr": LR, "weight_decay": WD},
        "param_groups": {"filter_bias_and_bn": True},
    }
    run = RunState(spec, initial_params(model))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    ref = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=LR, weight_decay=WD)
    for k, g in enumerate(make_grads(model, STEPS)):
        set_grads(model, g)
        ref.step()
        run.apply(g, k)
    assert_params_bitwise(model, run.params(), "filtered torch.AdamW")
    assert [g["weight_decay"] for g in run.groups()] == [0.0, WD]


@pytest.mark.parametrize("name", ["torch.AdamW", "adamw", "torch.Rprop", "lamb", "lookahead_adan"])
def test_groups_read_back_by_the_client_are_torch_s(name: str) -> None:
    """RemoteOptimizer builds its param_groups from the service's JSON ``groups``: the options come back as torch
    holds them, tuples included (``betas``, Rprop's ``etas`` and ``step_sizes``)."""
    model = make_model()
    run = RunState({"params": manifest(model), "optimizer": {"name": name}}, initial_params(model))
    received = json.loads(json.dumps(run.groups()))
    ref = _reference(name, model)
    for mine, theirs in zip(received, ref.param_groups, strict=True):
        options = {k: _as_torch(v) for k, v in mine.items() if k != "params"}
        expected = {k: v for k, v in theirs.items() if k != "params"}
        assert options == expected and {k: type(v) for k, v in options.items()} == {k: type(v) for k, v in expected.items()}
    assert any(isinstance(v, tuple) for g in ref.param_groups for v in g.values())  # the case has tuples to restore


@pytest.mark.parametrize("name", UNAVAILABLE)
def test_unavailable_entries_refuse_with_their_reason(name: str) -> None:
    entry = get_optimizer(name)
    model = make_model()
    with pytest.raises(Unavailable) as info:
        RunState({"params": manifest(model), "optimizer": {"name": name}}, initial_params(model))
    assert name in str(info.value) and entry.reason is not None and entry.reason in str(info.value)


def test_donated_gradients_are_used_in_place_only_when_aligned_and_in_the_parameter_s_dtype() -> None:
    model = make_model()
    run = RunState({"params": manifest(model), "optimizer": {"name": "adamw"}}, initial_params(model))
    grads = make_grads(model, 1)[0]
    received = _as_received(grads)
    used = run.check_gradients(received, donate=True)
    in_place = {n for n, g in used.items() if g.data_ptr() == received[n].data_ptr()}
    aligned = {n for n, g in received.items() if g.data_ptr() % 64 == 0 and g.numel()}
    assert in_place == aligned and 0 < len(aligned) < len(grads)
    assert all(g.data_ptr() % 64 == 0 for g in used.values())
    copied = run.check_gradients(received)  # without donate: always copies
    assert not any(g.data_ptr() == received[n].data_ptr() for n, g in copied.items())
    half = run.check_gradients({n: g.to(torch.bfloat16) for n, g in received.items()}, donate=True)
    assert all(g.dtype == torch.float32 for g in half.values())  # converted, so copied
