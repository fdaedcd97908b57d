"""Implementations per device: the catalogue says which of default / foreach / fused each entry runs on CPU and on
CUDA by torch's own rules, refuses the others before torch is asked (issue 22), and those it offers step exactly as
the same implementation in-process."""

from __future__ import annotations

import ast
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import timm.optim
import torch

from optim_core import RunState, SpecError, get_optimizer, list_optimizers, pick_device
from optim_core.catalogue import TORCH_PREFIX
from optim_core.devices import DEVICE_TYPES, IMPLEMENTATIONS, source_refuses_fused_on_cuda

from ..reference import DEVICES, assert_tree_bitwise, bitwise_equal, initial_params, make_grads, make_model, manifest, set_grads

ENTRIES = list_optimizers()
TORCH_ENTRIES = [e for e in ENTRIES if e.family == "torch"]

# torch 2.11's Adagrad._init_group, as it shipped: fused Adagrad was CPU-only and said so to its parameter check.
TORCH_2_11_ADAGRAD = """
def _init_group(self, group, params_with_grad, grads, state_sums, state_steps):
    for p in group["params"]:
        if p.grad is not None:
            if group["fused"] and getattr(self, "_need_device_dtype_check_for_fused", True):
                _device_dtype_check_for_fused(p, cuda_unsupported=True)
                self._need_device_dtype_check_for_fused = False
"""


def _torch_declarations() -> dict[str, dict[str, tuple[str, ...]]]:
    """torch's own table of its optimizers (``torch.testing._internal.common_optimizers.optim_db``), read as source:
    importing it needs torch's test dependencies. Class name -> supported_impls, supports_fused_on."""
    path = Path(torch.__file__).parent / "testing" / "_internal" / "common_optimizers.py"
    tree = ast.parse(path.read_text())
    found: dict[str, dict[str, tuple[str, ...]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "OptimizerInfo" and node.args:
            assert isinstance(node.args[0], ast.Name)
            keywords = {kw.arg: kw.value for kw in node.keywords}
            found[node.args[0].id] = {
                key: tuple(ast.literal_eval(keywords[key])) if key in keywords else ()
                for key in ("supported_impls", "supports_fused_on")
            }
    return found


def test_torch_entries_follow_torch_s_own_table() -> None:
    declared = _torch_declarations()
    assert {e.name.removeprefix(TORCH_PREFIX) for e in TORCH_ENTRIES} <= set(declared)
    for entry in TORCH_ENTRIES:
        own = declared[entry.name.removeprefix(TORCH_PREFIX)]
        for device in DEVICE_TYPES:
            expected = ["default"]
            if "foreach" in own["supported_impls"]:
                expected.append("foreach")
            if "fused" in own["supported_impls"] and device in own["supports_fused_on"]:
                expected.append("fused")
            assert list(entry.implementations_on(device)) == expected, (entry.name, device)


def test_timm_entries_follow_the_class_they_build() -> None:
    for entry in ENTRIES:
        if entry.family != "timm" or not entry.class_path.startswith("torch.optim."):
            continue
        twin = get_optimizer(TORCH_PREFIX + entry.class_path.rsplit(".", 1)[1])
        assert dict(entry.by_device) == dict(twin.by_device), entry.name
    # timm's own classes: foreach where they take it, fused nowhere
    for name in ("lion", "lamb", "adan", "kron", "adafactor"):
        entry = get_optimizer(name)
        takes_foreach = "foreach" in entry.hyperparameters
        for device in DEVICE_TYPES:
            assert entry.implementations_on(device) == (("default", "foreach") if takes_foreach else ("default",)), name


def test_fused_adagrad_on_cuda_follows_the_installed_torch() -> None:
    assert source_refuses_fused_on_cuda(TORCH_2_11_ADAGRAD)
    assert not source_refuses_fused_on_cuda(TORCH_2_11_ADAGRAD.replace("p, cuda_unsupported=True", "p"))
    refuses = source_refuses_fused_on_cuda(inspect.getsource(sys.modules[torch.optim.Adagrad.__module__]))
    for name in ("adagrad", "lookahead_adagrad", "torch.Adagrad"):
        entry = get_optimizer(name)
        assert "fused" in entry.implementations_on("cpu")
        assert ("fused" in entry.implementations_on("cuda")) is not refuses, name


def test_describe_says_what_runs_where() -> None:
    here = pick_device().type
    for entry in ENTRIES:
        plain = entry.describe()
        assert plain["device"] == here and plain["implementations"] == list(entry.implementations_on(here))
        for device in DEVICE_TYPES:
            d = json.loads(json.dumps(entry.describe(device=device), allow_nan=False))
            assert d["implementations"] == list(entry.implementations_on(device)) == d["implementations_by_device"][device]
            assert d["implementations"][0] == "default" and set(d["implementations"]) <= set(entry.implementations)


def _spec(model: torch.nn.Module, name: str, **optimizer: Any) -> dict[str, Any]:
    return {"params": manifest(model), "optimizer": {"name": name, "lr": 0.01, **optimizer}}


@pytest.mark.parametrize(
    ("optimizer", "device", "message"),
    [
        (
            {"name": "lion", "implementation": "fused"},
            "cpu",
            r"'lion' has no 'fused' implementation; it has: \['default', 'foreach'\]",
        ),
        ({"name": "lion", "fused": True}, "cpu", "'lion' has no 'fused' implementation"),
        ({"name": "adafactor", "foreach": True}, "cpu", "'adafactor' has no 'foreach' implementation"),
        # a device type torch has no fused kernels for: refused by the engine, before torch is asked
        ({"name": "adagrad", "implementation": "fused"}, "meta", "'adagrad' has no 'fused' implementation on 'meta'"),
        ({"name": "torch.Adagrad", "fused": True}, "meta", "'torch.Adagrad' has no 'fused' implementation on 'meta'"),
        ({"name": "adamw", "foreach": "yes"}, "cpu", "optimizer.foreach must be true, false or null, got 'yes'"),
    ],
)
def test_an_implementation_the_device_lacks_is_refused(optimizer: dict[str, Any], device: str, message: str) -> None:
    model = make_model()
    with pytest.raises(SpecError, match=message):
        RunState({"params": manifest(model), "optimizer": optimizer}, initial_params(model), device=device)


AVAILABLE = [e.name for e in ENTRIES if e.available and set(e.implementations) - {"default"}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", AVAILABLE)
def test_each_implementation_matches_like_with_like(name: str, device: str) -> None:
    """Every implementation offered on this device steps bitwise as the same implementation in-process."""
    offered = [i for i in get_optimizer(name).implementations_on(device) if i != "default"]
    assert set(offered) <= set(IMPLEMENTATIONS)
    for implementation in offered:
        model = make_model(only_2d="2d_params" in get_optimizer(name).needs).to(device)
        spec = _spec(model, name, implementation=implementation)
        if name.startswith(TORCH_PREFIX):
            ref = getattr(torch.optim, name.removeprefix(TORCH_PREFIX))(model.parameters(), lr=0.01, **{implementation: True})
        else:
            ref = timm.optim.create_optimizer_v2(model, opt=name, lr=0.01, **{implementation: True})
        run, _ = RunState.create(spec, initial_params(model), device=device)
        for k, g in enumerate(make_grads(model, 3)):
            set_grads(model, g)
            ref.step()
            run.apply(g, k)
        params = run.params()
        assert all(bitwise_equal(p, params[n]) for n, p in model.named_parameters()), (name, implementation)
        assert_tree_bitwise(ref.state_dict()["state"], run.optimizer.state_dict()["state"], f"{name} {implementation}")
