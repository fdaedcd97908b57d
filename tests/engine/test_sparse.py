"""Sparse gradients (``optim_core.sparse``, ``optim_format.framing.flatten`` / ``unflatten``): an EmbeddingBag's
sparse gradient travels as indices + values, stays sparse, and the optimizers that take sparse gradients
step bitwise as in-process; those that do not are refused before anything changes, wherever torch would
raise (proven here option by option, and over the whole catalogue)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import timm.optim
import torch
from torch import nn

from optim_client.params import gradient_body
from optim_core import GradientError, NonFiniteGradient, RunState, get_optimizer, list_optimizers
from optim_core.catalogue import LOOKAHEAD_PREFIX, PROTOCOLS, TORCH_PREFIX
from optim_format import FormatError, framing

from ..reference import assert_tree_bitwise, bitwise_equal, initial_params, manifest

COVERS = ("torch.SparseAdam",)  # routed here by test_optimizer_parity
STEPS, RESTORE_AT = 5, 2


class BagNet(nn.Module):
    """An EmbeddingBag (sparse gradients) and a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(20, 4, mode="sum", sparse=True)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids, offsets))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # ids from 0..9 only: rows 10..19 are never touched, and bags repeat ids (duplicate coordinates)
    return [
        (torch.randint(0, 10, (12,), generator=g), torch.tensor([0, 3, 7, 9]), torch.randn(4, 2, generator=g))
        for _ in range(steps)
    ]


def _grads(model: nn.Module, batch: tuple[torch.Tensor, ...], *, all_sparse: bool) -> dict[str, torch.Tensor]:
    ids, offsets, y = batch
    model.zero_grad(set_to_none=True)
    ((model(ids, offsets) - y) ** 2).mean().backward()
    out = {}
    for n, p in model.named_parameters():
        assert p.grad is not None
        g = p.grad.detach().clone()
        # SparseAdam takes sparse gradients only: a dense layer's goes as p.grad.to_sparse(), here as in-process
        out[n] = g.to_sparse() if all_sparse and g.layout == torch.strided else g
    return out


def _over_the_wire(grads: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """What the service reads from the worker's body: views of the buffer, sparse pairs gathered."""
    entries = framing.flatten(grads)
    views, _ = framing.views(framing.encode(framing.aligned_first(entries)))
    received, hessians = framing.unflatten(views, {n: p.shape for n, p in model.named_parameters()})
    assert not hessians
    return received


def _reference_optimizer(name: str, model: nn.Module, options: dict[str, Any]) -> torch.optim.Optimizer:
    options = dict(options)
    lookahead = {k.removeprefix("lookahead_"): options.pop(k) for k in ("lookahead_k", "lookahead_alpha") if k in options}
    implementation = options.pop("implementation", "default")
    if implementation != "default":
        options[implementation] = True
    if name.startswith(TORCH_PREFIX):
        # a torch.* entry is exactly torch's class over the model's parameters (issue 19)
        return getattr(torch.optim, name.removeprefix(TORCH_PREFIX))(model.parameters(), **options)
    opt = timm.optim.create_optimizer_v2(model, opt=name.removeprefix(LOOKAHEAD_PREFIX), **options)
    return timm.optim.Lookahead(opt, **lookahead) if name.startswith(LOOKAHEAD_PREFIX) else opt


def _set(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None


PARITY = [
    ("torch.SparseAdam", {"lr": 0.05}),
    ("torch.SGD", {"lr": 0.1}),
    ("torch.SGD", {"lr": 0.1, "momentum": 0.9}),
    ("torch.SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "implementation": "foreach"}),
    ("torch.SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "maximize": True}),
    ("torch.Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("torch.Adagrad", {"lr": 0.1, "implementation": "foreach"}),
    ("adagrad", {"lr": 0.1}),
    ("sgdw", {"lr": 0.1, "weight_decay": 0.05, "momentum": 0.9}),
    ("lookahead_sgd", {"lr": 0.1, "lookahead_k": 2}),
]


@pytest.mark.parametrize(
    ("name", "options"), PARITY, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in PARITY]
)
def test_sparse_steps_bitwise_equal_to_in_process(name: str, options: dict[str, Any]) -> None:
    all_sparse = "sparse_grad" in get_optimizer(name).needs
    ref_model, model, worker = BagNet(), BagNet(), BagNet()
    ref = _reference_optimizer(name, ref_model, options)
    spec = {"params": manifest(model), "optimizer": {"name": name, **options}}
    run, straight = RunState(spec, initial_params(model)), RunState(spec, initial_params(model))
    for t, batch in enumerate(_batches(STEPS)):
        grads = _grads(ref_model, batch, all_sparse=all_sparse)
        assert grads["bag.weight"].layout == torch.sparse_coo and not grads["bag.weight"].is_coalesced()
        _set(ref_model, grads)
        ref.step()
        with torch.no_grad():
            for n, p in worker.named_parameters():
                p.copy_(run.params()[n])
        sent = _grads(worker, batch, all_sparse=all_sparse)
        if t == RESTORE_AT:
            run = RunState.from_bytes(run.to_bytes())
        run.apply(_over_the_wire(sent, worker), t)
        straight.apply(sent, t)
        for n, p in ref_model.named_parameters():
            assert bitwise_equal(p, run.params()[n]), f"{name} step {t}: {n!r} differs"
    assert_tree_bitwise(ref.state_dict()["state"], run.optimizer.state_dict()["state"], name)
    assert run.digest() == straight.digest()


def test_sgd_momentum_buffers_stay_sparse_and_survive_a_snapshot() -> None:
    model = BagNet()
    run = RunState(
        {"params": manifest(model), "optimizer": {"name": "torch.SGD", "lr": 0.1, "momentum": 0.9}}, initial_params(model)
    )
    for t, batch in enumerate(_batches(2)):
        run.apply(_grads(model, batch, all_sparse=False), t)
    buf = run.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert buf.layout == torch.sparse_coo and not buf.is_coalesced()
    restored = RunState.from_bytes(run.to_bytes())
    assert bitwise_equal(restored.optimizer.state_dict()["state"][0]["momentum_buffer"], buf)
    exported = run.export()["optimizer"]["state"][0]["momentum_buffer"]
    assert bitwise_equal(exported, buf)


# ---------------------------------------------------------------------- the framing
def test_flatten_sends_sparse_tensors_as_indices_and_values_and_dense_ones_as_they_are() -> None:
    model = BagNet()
    grads = _grads(model, _batches(1)[0], all_sparse=False)
    entries = framing.flatten(grads, {"head.weight": torch.ones(2, 4)})
    assert entries["head.weight"] is grads["head.weight"] and entries["head.bias"] is grads["head.bias"]  # no copy
    bag = grads["bag.weight"]
    assert entries["bag.weight#indices"].shape == (1, 12) and entries["bag.weight#values"].shape == (12, 4)
    assert entries["bag.weight#values"].data_ptr() == bag._values().data_ptr()
    assert "head.weight#hessian" in entries and "bag.weight" not in entries
    body = framing.encode(entries)
    assert body.nbytes < 8 * 20 * 4 + 1024  # rows touched, not the table (the indices are int64)
    back, hessians = framing.unflatten(framing.views(body)[0], {n: p.shape for n, p in model.named_parameters()})
    assert bitwise_equal(back["bag.weight"], bag) and not back["bag.weight"].is_coalesced()
    assert bitwise_equal(hessians["head.weight"], torch.ones(2, 4))


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ({"w#indices": torch.zeros(1, 2, dtype=torch.int64)}, r"lacks \['w#values'\]"),
        ({"w#values": torch.zeros(2, 4)}, r"lacks \['w#indices'\]"),
        ({"w#weights": torch.zeros(2)}, "unknown part 'weights'"),
        ({"w#indices": torch.zeros(1, 2, dtype=torch.int32), "w#values": torch.zeros(2, 4)}, "must be int64"),
        ({"w#indices": torch.zeros(3, 2, dtype=torch.int64), "w#values": torch.zeros(2)}, "sparse_dim <= 2"),
        ({"w#indices": torch.zeros(1, 2, dtype=torch.int64), "w#values": torch.zeros(2, 5)}, r"must be \[2, 4\]"),
        ({"v#indices": torch.zeros(1, 2, dtype=torch.int64), "v#values": torch.zeros(2, 4)}, "no parameter of that name"),
        ({"w": torch.zeros(10, 4), "w#indices": torch.zeros(1, 0, dtype=torch.int64), "w#values": torch.zeros(0, 4)}, "both"),
    ],
)
def test_unflatten_refuses_malformed_parts(entries: dict[str, torch.Tensor], words: str) -> None:
    with pytest.raises(FormatError, match=words):
        framing.unflatten(entries, {"w": (10, 4)})


# ---------------------------------------------------------------------- bad input changes nothing
def _run(name: str = "torch.SGD", **options: Any) -> tuple[RunState, dict[str, torch.Tensor]]:
    model = BagNet()
    run = RunState({"params": manifest(model), "optimizer": {"name": name, "lr": 0.1, **options}}, initial_params(model))
    return run, _grads(model, _batches(1)[0], all_sparse=False)


def _sparse(indices: list[list[int]], values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor(indices), values, shape, check_invariants=False)


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (_sparse([[3, 20]], torch.ones(2, 4), (20, 4)), GradientError, r"index 20 in dim 0 is out of range for .* \[20, 4\]"),
        (_sparse([[-1, 3]], torch.ones(2, 4), (20, 4)), GradientError, "index -1 in dim 0"),
        (_sparse([[3, 4]], torch.ones(2, 5), (20, 5)), GradientError, r"has shape \[20, 5\]; the parameter has shape \[20, 4\]"),
        (_sparse([[3, 4]], torch.ones(2, 4, dtype=torch.float64), (20, 4)), GradientError, "float64"),
        (_sparse([[3, 4]], torch.ones(2, 4, dtype=torch.int64), (20, 4)), GradientError, "floating point"),
        (_sparse([[3, 4]], torch.tensor([[1.0, 2, 3, float("nan")], [0, 0, 0, 0]]), (20, 4)), NonFiniteGradient, "bag.weight"),
        (torch.ones(20, 4).to_sparse_csr(), GradientError, "sparse_csr"),
    ],
    ids=["index-past-the-end", "negative-index", "wrong-dense-dims", "wider-dtype", "integer-values", "nan", "csr"],
)
def test_bad_sparse_gradients_are_refused_and_change_nothing(bad: torch.Tensor, error: type[Exception], words: str) -> None:
    run, grads = _run(momentum=0.9)
    before = run.digest()
    with pytest.raises(error, match=words):
        run.apply({**grads, "bag.weight": bad}, 0)
    assert run.digest() == before
    run.apply(grads, 0)  # and the run goes on


def test_duplicate_coordinates_reach_the_optimizer_as_torch_gives_them() -> None:
    """Each optimizer coalesces (or not) as it does in-process: the bits match torch fed the same duplicates, and
    differ from those of the gradient coalesced beforehand (for SGD, which adds duplicates one by one)."""
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1e8, 1e8, 1e8, 1e8], [-1e8, -1e8, -1e8, -1e8]])
    dup = _sparse([[5, 5, 5]], values, (20, 4))
    for name in ("torch.SGD", "torch.Adagrad"):
        run, grads = _run(name)
        ref_model = BagNet()
        ref = _reference_optimizer(name, ref_model, {"lr": 0.1})
        _set(ref_model, {**grads, "bag.weight": dup})
        ref.step()
        run.apply({**grads, "bag.weight": dup}, 0)
        assert bitwise_equal(ref_model.bag.weight, run.params()["bag.weight"]), name
    sgd, _ = _run("torch.SGD")
    sgd.apply({**grads, "bag.weight": dup}, 0)
    coalesced, _ = _run("torch.SGD")
    coalesced.apply({**grads, "bag.weight": dup.coalesce()}, 0)
    assert not bitwise_equal(coalesced.params()["bag.weight"], sgd.params()["bag.weight"])  # the duplicates mattered


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("adamw", {}, r"are sparse; timm.optim.adamw.AdamW|are sparse; torch.optim.adamw.AdamW"),
        ("torch.Adagrad", {"weight_decay": 0.1}, "weight_decay=0.1"),
        ("torch.SGD", {"weight_decay": 0.1}, "weight_decay=0.1"),
        ("torch.SGD", {"implementation": "fused"}, "fused implementation"),
        ("lars", {}, "timm.optim.lars.Lars does not take sparse gradients"),
    ],
)
def test_optimizers_that_cannot_take_a_sparse_gradient_refuse_it_before_anything_changes(
    name: str, options: dict[str, Any], words: str
) -> None:
    run, grads = _run(name, **options)
    before = run.digest()
    with pytest.raises(GradientError, match=words):
        run.apply(grads, 0)
    assert run.digest() == before


def test_sparse_adam_refuses_a_dense_gradient_before_anything_changes() -> None:
    run, grads = _run("torch.SparseAdam")
    before = run.digest()
    with pytest.raises(GradientError, match=r"\['head.weight', 'head.bias'\] are dense; torch.optim.SparseAdam"):
        run.apply(grads, 0)  # the head's are dense
    assert run.digest() == before
    model = BagNet()
    ref = torch.optim.SparseAdam(model.parameters(), lr=0.1)
    _set(model, grads)
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        ref.step()  # torch refuses too, but after changing the state of the parameters before
    assert ref.state_dict()["state"]


# ---------------------------------------------------------------------- the rules, option by option, against torch
def _grid() -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = []
    for wd in (0.0, 0.1):
        for impl in ("default", "foreach", "fused"):
            for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
                cases.append(
                    ("torch.SGD", {"weight_decay": wd, "momentum": momentum, "nesterov": nesterov, "implementation": impl})
                )
            cases.append(("torch.Adagrad", {"weight_decay": wd, "implementation": impl}))
        for timm_name in ("sgdw", "nesterovw", "csgdw"):
            cases.append((timm_name, {"weight_decay": wd, "momentum": 0.9}))
    cases.append(("momentum", {"weight_decay": 0.0, "momentum": 0.9}))
    cases.append(("torch.SparseAdam", {}))
    return cases


def _kinds_of(kind: str, step: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """The embedding's gradient sparse ('s') or dense ('d'); the head's dense (sparse for SparseAdam's 'S')."""
    g = torch.Generator().manual_seed(10 + step)
    bag = _sparse([[1, 4, 1, 7]], torch.randn(4, 4, generator=g), (20, 4))
    out = {"bag.weight": bag if kind in "sS" else torch.randn(20, 4, generator=g)}
    for n, p in model.named_parameters():
        if n != "bag.weight":
            d = torch.randn(p.shape, generator=g)
            out[n] = d.to_sparse() if kind.isupper() else d
    return out


@pytest.mark.parametrize(
    ("name", "options"), _grid(), ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in _grid()]
)
def test_the_engine_refuses_exactly_where_torch_raises(name: str, options: dict[str, Any]) -> None:
    histories = ["SS", "SD", "DS"] if name == "torch.SparseAdam" else ["ss", "sd", "ds", "dd"]
    for history in histories:
        ref_model, model = BagNet(), BagNet()
        ref = _reference_optimizer(name, ref_model, {"lr": 0.1, **options})
        run = RunState({"params": manifest(model), "optimizer": {"name": name, "lr": 0.1, **options}}, initial_params(model))
        for t, kind in enumerate(history):
            grads = _kinds_of(kind, t, model)
            _set(ref_model, grads)
            try:
                ref.step()
                torch_took_it = True
            except (RuntimeError, NotImplementedError):
                torch_took_it = False
            before = run.digest()
            try:
                run.apply(grads, t)
                engine_took_it = True
            except GradientError:
                engine_took_it = False
                assert run.digest() == before
            assert engine_took_it == torch_took_it, f"{name} {options} history {history!r} step {t}"
            if not torch_took_it:
                break
            for n, p in ref_model.named_parameters():
                assert bitwise_equal(p, run.params()[n]), f"{name} {options} history {history!r} step {t}: {n!r}"


# ---------------------------------------------------------------------- the whole catalogue
class TwoTables(nn.Module):
    """Two 2-D parameters (Muon's kind too): a table with a sparse gradient and a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(20, 4))
        self.proj = nn.Parameter(torch.randn(3, 4))


# timm classes that run on a sparse gradient by accident, with these options (Lars computes norms, and adds weight
# decay as add(sparse, dense), which raises): the engine refuses them, as it refuses every class not made for it
ACCIDENTAL = {"lars", "larc", "nlars", "nlarc"}
CATALOGUE = [e.name for e in list_optimizers() if e.available and not set(e.needs) & set(PROTOCOLS) and "cuda" not in e.needs]


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_optimizer_takes_a_sparse_gradient_exactly_when_torch_does(name: str) -> None:
    entry = get_optimizer(name)
    options: dict[str, Any] = {"lr": 0.01}
    if entry.family == "timm" or "weight_decay" in entry.hyperparameters:
        options["weight_decay"] = 0.0  # weight decay is a refusal of its own (SGD, Adagrad): tested above
    ref_model, model = TwoTables(), TwoTables()
    torch.manual_seed(3)  # the run's seed, for the optimizers that draw from the global generator
    ref = _reference_optimizer(name, ref_model, options)
    run = RunState({"params": manifest(model), "optimizer": {"name": name, **options}, "seed": 3}, initial_params(model))
    g = torch.Generator().manual_seed(5)
    grads = {"table": _sparse([[2, 9, 2]], torch.randn(3, 4, generator=g), (20, 4)), "proj": torch.randn(3, 4, generator=g)}
    _set(ref_model, grads)
    try:
        ref.step()
        torch_took_it = True
    except Exception:
        torch_took_it = False
    before = run.digest()
    try:
        run.apply(grads, 0)
        engine_took_it = True
    except GradientError as exc:
        engine_took_it = False
        assert run.digest() == before and "sparse" in str(exc)
    base = name.removeprefix(LOOKAHEAD_PREFIX)
    if base in ACCIDENTAL:
        assert torch_took_it and not engine_took_it, name
        return
    assert engine_took_it == torch_took_it, name
    if engine_took_it:
        for n, p in ref_model.named_parameters():
            assert bitwise_equal(p, run.params()[n]), f"{name}: {n!r}"


def test_the_client_sends_dense_gradients_from_their_own_memory_and_sparse_ones_as_their_parts() -> None:
    model = BagNet()
    ids, offsets, y = _batches(1)[0]
    ((model(ids, offsets) - y) ** 2).mean().backward()
    body = gradient_body(dict(model.named_parameters()))
    head = model.head.weight.grad
    assert head is not None and any(_address(part) == head.data_ptr() for part in body)  # sent from where it is
    received, _ = framing.unflatten(framing.views(b"".join(body))[0], {n: p.shape for n, p in model.named_parameters()})
    for n, p in model.named_parameters():
        assert p.grad is not None and bitwise_equal(received[n], p.grad), n
    assert received["bag.weight"].layout == torch.sparse_coo


def _address(part: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(part)) if part.nbytes and not part.readonly else -1


def test_an_exported_sparse_adam_state_loads_back() -> None:
    run, grads = _run("torch.SparseAdam")
    run.apply({n: g if g.layout == torch.sparse_coo else g.to_sparse() for n, g in grads.items()}, 0)
    loaded = run.load_export(run.export())  # its trial step sends empty sparse gradients
    assert loaded.digest() == run.digest()
