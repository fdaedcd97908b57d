"""State at step k -> bytes -> a new RunState -> continue to 2k: bitwise the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from optim_core import RunState, SnapshotError, get_optimizer
from optim_format import snapshot

from ..reference import (
    assert_tree_bitwise,
    bitwise_equal,
    initial_params,
    make_grads,
    make_model,
    manifest,
)

REPRESENTATIVE = [
    "sgd",
    "adamw",
    "lamb",
    "adafactor",
    "lion",
    "kron",
    "muon",
    "lookahead_adamw",
    "torch.Adafactor",
    "torch.Muon",
    "torch.ASGD",
    "adan",
    "madgrad",
]
K = 6


def _spec(model: torch.nn.Module, name: str, **extra: object) -> dict:
    return {
        "params": manifest(model),
        "optimizer": {"name": name, "lr": 0.01, "weight_decay": 0.05},
        "scheduler": {"name": "cosine", "num_epochs": 3 * K, "warmup_epochs": 3, "warmup_lr": 1e-4, "min_lr": 1e-4},
        "ema": {"decay": 0.9, "warmup": True},
        "swa": {"start": K - 2, "every": 2},
        "seed": 3,
        **extra,
    }


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_resume_from_bytes_is_bitwise(name: str) -> None:
    model = make_model(only_2d="2d_params" in get_optimizer(name).needs)
    grads = make_grads(model, 2 * K)
    straight = RunState(_spec(model, name), initial_params(model))
    for k, g in enumerate(grads):
        straight.apply(g, k, loss=1.0)

    first = RunState(_spec(model, name), initial_params(model))
    for k in range(K):
        first.apply(grads[k], k, loss=1.0)
    snapshot = first.to_bytes()
    torch.manual_seed(999)  # the restored run must carry its own RNG, not use this process's
    resumed = RunState.from_bytes(snapshot)
    assert resumed.t == K and resumed.digest() == first.digest()
    for k in range(K, 2 * K):
        resumed.apply(grads[k], k, loss=1.0)

    assert resumed.digest() == straight.digest()
    a_params, b_params = straight.params(), resumed.params()
    assert all(bitwise_equal(a_params[n], b_params[n]) for n in a_params)
    for kind in ("ema", "swa"):
        a, b = straight.averages(kind), resumed.averages(kind)
        assert a is not None and b is not None and all(bitwise_equal(a[n], b[n]) for n in a), kind
    assert_tree_bitwise(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), name)
    assert resumed.lrs == straight.lrs


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_a_capture_writes_the_state_it_was_taken_at(name: str) -> None:
    """A background snapshot is written from a capture while the run steps on: its file is the state's at the
    capture, byte for byte, and resumes to that state."""
    model = make_model(only_2d="2d_params" in get_optimizer(name).needs)
    grads = make_grads(model, K + 1)
    run = RunState(_spec(model, name), initial_params(model))
    for k in range(K):
        run.apply(grads[k], k, loss=1.0)
    expected, digest = run.to_bytes(), run.digest()
    assert b"".join(run.parts()) == expected
    captured = run.capture()
    run.apply(grads[K], K, loss=1.0)
    assert run.digest() != digest
    assert b"".join(captured.parts()) == expected and captured.digest() == digest
    assert RunState.from_bytes(expected).digest() == digest


def test_digest_changes_with_the_state() -> None:
    model = make_model()
    run = RunState(_spec(model, "adamw"), initial_params(model))
    before = run.digest()
    run.apply(make_grads(model, 1)[0], 0)
    assert run.digest() != before


def test_digests_recorded_in_the_earlier_format_still_verify() -> None:
    """Snapshots recorded before the xxh3 digest carry a bare blake2b-256 hex digest; recovery checks either."""
    model = make_model()
    run = RunState(_spec(model, "adamw"), initial_params(model))
    run.apply(make_grads(model, 1)[0], 0)
    captured = run.capture()
    legacy = snapshot.digest(captured.meta, captured.tensors, "blake2b")
    assert run.digest().startswith("xxh3:") and len(legacy) == 64 and ":" not in legacy
    assert run.digest_matches(run.digest()) and run.digest_matches(legacy)
    assert not run.digest_matches(legacy[:-1] + ("0" if legacy[-1] != "0" else "1"))
    run.apply(make_grads(model, 2)[1], 1)
    assert not run.digest_matches(legacy)


def _tampered(data: bytes, **changes: object) -> bytes:
    meta, tensors = snapshot.unpack(data)
    return snapshot.pack({**meta, "__dict__": [[k, changes.get(k, v)] for k, v in meta["__dict__"]]}, tensors)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("torch", "1.13.0", "torch 1.13.0"),
        ("device", "cuda" if not torch.cuda.is_available() else "cpu", "bitwise exact"),
        ("format", "optim-run/999", "format"),
    ],
)
def test_snapshot_from_elsewhere_is_refused(field: str, value: str, message: str) -> None:
    model = make_model()
    data = RunState(_spec(model, "adamw"), initial_params(model)).to_bytes()
    with pytest.raises(SnapshotError, match=message):
        RunState.from_bytes(_tampered(data, **{field: value}))


@pytest.mark.parametrize("data", [b"", b"garbage", b"\xff" * 64, (1 << 40).to_bytes(8, "little") + b"{}"])
def test_garbage_is_not_a_snapshot(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        RunState.from_bytes(data)
