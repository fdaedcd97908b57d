"""Every catalogue entry, stepped through RunState, is bitwise the optimizer timm / torch builds in-process."""

from __future__ import annotations

import json

import pytest
import timm.optim
import torch

from optim_core import EngineError, RunState, Unavailable, get_optimizer, list_optimizers
from optim_core.catalogue import LOOKAHEAD_PREFIX, PROTOCOLS, TORCH_PREFIX
from optim_format import framing

from ..reference import (
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


def _reference(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """What a user writes in-process for this catalogue name."""
    if name.startswith(TORCH_PREFIX):
        cls = getattr(torch.optim, name.removeprefix(TORCH_PREFIX))
        if _weight_decay(name) is None:
            return cls(model.parameters(), lr=LR)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
        groups = [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
        groups.append({"params": decay, "weight_decay": WD})
        return cls(groups, lr=LR, weight_decay=WD)
    return timm.optim.create_optimizer_v2(model, opt=name, lr=LR, weight_decay=WD)


def _as_received(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients as the service decodes a client's body: views of one writable buffer torch allocated,
    the client's order (``aligned_first``) putting most of them at multiples of 64 bytes, the rest not."""
    return framing.views(framing.encode(framing.aligned_first(grads)))[0]


@pytest.mark.parametrize("donate", [False, True], ids=["copied", "donated"])
@pytest.mark.parametrize("name", AVAILABLE)
def test_steps_bitwise_equal_to_in_process(name: str, donate: bool) -> None:
    only_2d = "2d_params" in get_optimizer(name).needs
    model = make_model(only_2d=only_2d)
    options = {"lr": LR} if _weight_decay(name) is None else {"lr": LR, "weight_decay": WD}
    spec = {"params": manifest(model), "optimizer": {"name": name, **options}, "seed": SEED}
    run = RunState(spec, initial_params(model))
    # the last weight gets no gradient at step 2: a missing name means p.grad is None, as in torch
    grads = make_grads(model, STEPS, drop=(2, "head.weight"))

    torch.manual_seed(SEED)  # what the run's seed stands for: the global RNG at the start of the loop
    ref = _reference(name, model)
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
