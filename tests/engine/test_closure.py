"""The closure protocol (``optim_core.closure``): torch's LBFGS stepped by evaluations that arrive one at a time
is bitwise torch's ``LBFGS.step(closure)`` in-process; replayed evaluations give the same bits, mid-step too."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from optim_core import GradientError, NonFiniteGradient, RunState, StepFailed, StepMismatch
from optim_core.closure import ClosureStep, Done, Evaluate, replay
from optim_core.errors import EvaluationMismatch, ProtocolRequired, StepInProgress

from ..reference import assert_tree_bitwise, bitwise_equal, initial_params, manifest

COVERS = ("torch.LBFGS",)  # the catalogue entries whose parity this module proves (test_optimizer_parity routes them here)
STEPS = 3


# ---------------------------------------------------------------------- problems: a model and its loss
class Rosenbrock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([-1.5, 2.0, -0.5, 1.2], dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        x = self.x
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        self.register_buffer("data", torch.randn(16, 4, generator=g))
        self.register_buffer("target", torch.randn(16, 1, generator=g))

    def loss(self) -> torch.Tensor:
        return ((self.body(self.data) - self.target) ** 2).mean()


PROBLEMS: dict[str, tuple[Callable[[], nn.Module], dict[str, object]]] = {
    "rosenbrock": (Rosenbrock, {"lr": 1.0, "max_iter": 20, "history_size": 5}),
    "mlp": (Mlp, {"lr": 0.5, "max_iter": 6, "history_size": 3}),
}


def _spec(model: nn.Module, line_search: str | None, options: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "params": manifest(model),
        "optimizer": {"name": "torch.LBFGS", "line_search_fn": line_search, **options},
        **extra,
    }


@dataclass
class Worker:
    """A test worker: its own copy of the model, evaluated at the parameters it is told."""

    model: nn.Module
    log: list[tuple[int, float, dict[str, torch.Tensor]]] = field(default_factory=list)

    def evaluate(self, ask: Evaluate) -> tuple[float, dict[str, torch.Tensor]]:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(ask.params[n])
        self.model.zero_grad()
        loss = self.model.loss()  # type: ignore[operator]
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    def run_step(self, step: ClosureStep, asked: list[dict[str, torch.Tensor]] | None = None) -> Done:
        answer = step.pending
        while isinstance(answer, Evaluate):
            if asked is not None:
                asked.append({n: p.clone() for n, p in answer.params.items()})
            loss, grads = self.evaluate(answer)
            self.log.append((answer.k, loss, grads))
            answer = step.provide(answer.k, loss, grads)
        return answer


def _reference(model: nn.Module, line_search: str | None, options: dict[str, object], steps: int) -> dict[str, object]:
    """torch's LBFGS in-process: the parameters at every closure call, the returned losses, the final state."""
    opt = torch.optim.LBFGS(model.parameters(), line_search_fn=line_search, **options)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen: list[list[dict[str, torch.Tensor]]] = []
    losses, lrs = [], []

    def closure() -> torch.Tensor:
        seen[-1].append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.zero_grad()
        loss = model.loss()  # type: ignore[operator]
        loss.backward()
        return loss

    for _ in range(steps):
        seen.append([])
        losses.append(float(opt.step(closure).detach()))
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return {"seen": seen, "losses": losses, "lrs": lrs, "state": opt.state_dict()["state"], "model": model}


def _assert_params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert set(a) == set(b), what
    for n in a:
        assert bitwise_equal(a[n], b[n]), f"{what}: {n!r} differs"


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_lbfgs_by_evaluations_is_bitwise_torch_lbfgs(problem: str, line_search: str | None) -> None:
    make, options = PROBLEMS[problem]
    ref = _reference(make(), line_search, options, STEPS)
    model = make()
    run = RunState(
        _spec(model, line_search, options, scheduler={"name": "StepLR", "step_size": 1, "gamma": 0.5}), initial_params(model)
    )
    worker = Worker(make())
    for t in range(STEPS):
        asked: list[dict[str, torch.Tensor]] = []
        done = worker.run_step(run.begin_closure_step(t), asked)
        # evaluated where torch's closure was called, in the same order, as many times
        assert len(asked) == len(ref["seen"][t]) == done.evaluations  # type: ignore[index]
        for k, (mine, theirs) in enumerate(zip(asked, ref["seen"][t], strict=True)):  # type: ignore[index]
            _assert_params_equal(mine, theirs, f"step {t} evaluation {k}")
        assert done.loss == ref["losses"][t]  # type: ignore[index]
        assert done.result.t == t + 1 == run.t
        assert done.result.lrs == ref["lrs"][t]  # type: ignore[index]
    _assert_params_equal(run.params(), dict(ref["model"].named_parameters()), "final")  # type: ignore[attr-defined]
    assert_tree_bitwise(ref["state"], run.optimizer.state_dict()["state"], problem)
    assert len(ref["seen"][0]) > 2  # type: ignore[index]  # the protocol was exercised: several evaluations per step


def _straight(line_search: str | None, steps: int) -> tuple[RunState, Worker, list[list[dict[str, torch.Tensor]]], list[bytes]]:
    """An uninterrupted run with its log of evaluations, the parameters asked at each, and a snapshot before each step."""
    make, options = PROBLEMS["mlp"]
    model = make()
    run = RunState(_spec(model, line_search, options, ema={"decay": 0.9}), initial_params(model))
    worker = Worker(make())
    asked: list[list[dict[str, torch.Tensor]]] = []
    snapshots = []
    for t in range(steps):
        snapshots.append(run.to_bytes())
        asked.append([])
        worker.run_step(run.begin_closure_step(t), asked[-1])
    return run, worker, asked, snapshots


def _evaluations_of(worker: Worker, asked: list[list[dict[str, torch.Tensor]]]) -> list[list[tuple[int, float, dict]]]:
    out, i = [], 0
    for step in asked:
        out.append(worker.log[i : i + len(step)])
        i += len(step)
    return out


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_replay_from_a_snapshot_mid_step_waits_for_the_same_evaluation_and_ends_bitwise(line_search: str | None) -> None:
    straight, worker, asked, snapshots = _straight(line_search, STEPS)
    logs = _evaluations_of(worker, asked)
    t = 1
    for k in sorted({0, 1, len(logs[t]) // 2, len(logs[t]) - 1}):
        recovered = RunState.from_bytes(snapshots[t])
        step = replay(recovered, t, logs[t][:k])
        assert step.waiting_for == k
        pending = step.pending
        assert isinstance(pending, Evaluate) and (pending.t, pending.k) == (t, k)
        _assert_params_equal(pending.params, asked[t][k], f"evaluation {k} after replay")
        for kk, loss, grads in logs[t][k:]:
            step.provide(kk, loss, grads)
        assert isinstance(step.pending, Done) and recovered.t == t + 1
        for later in range(t + 1, STEPS):
            replay(recovered, later, logs[later])
        assert recovered.digest() == straight.digest(), f"resumed after {k} evaluation(s) of step {t}"


def test_replay_from_snapshots_at_step_boundaries_is_bitwise() -> None:
    straight, worker, asked, snapshots = _straight("strong_wolfe", STEPS)
    logs = _evaluations_of(worker, asked)
    for start in range(STEPS):
        recovered = RunState.from_bytes(snapshots[start])
        for t in range(start, STEPS):
            done = replay(recovered, t, logs[t]).pending
            assert isinstance(done, Done) and done.result.t == t + 1
        assert recovered.digest() == straight.digest(), f"from the snapshot at t={start}"
        assert_tree_bitwise(straight.optimizer.state_dict(), recovered.optimizer.state_dict())


def test_bad_evaluations_are_refused_and_change_nothing() -> None:
    straight, worker, asked, snapshots = _straight(None, 1)
    log = _evaluations_of(worker, asked)[0]
    run = RunState.from_bytes(snapshots[0])
    step = run.begin_closure_step(0)
    (k0, loss0, grads0), (_, loss1, grads1) = log[0], log[1]
    good_name = next(iter(grads0))
    bad: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: step.provide(1, loss0, grads0), EvaluationMismatch, "waits for evaluation k=0"),
        (lambda: step.provide(True, loss0, grads0), EvaluationMismatch, "was not asked for"),  # type: ignore[arg-type]
        (lambda: step.provide(0, float("nan"), grads0), GradientError, "loss of evaluation k=0"),
        (lambda: step.provide(0, "1.0", grads0), GradientError, "finite number"),  # type: ignore[arg-type]
        (lambda: step.provide(0, loss0, {**grads0, "nope": torch.zeros(1)}), GradientError, "unknown parameter"),
        (lambda: step.provide(0, loss0, {good_name: torch.zeros(3, 3, 3)}), GradientError, "shape"),
        (
            lambda: step.provide(0, loss0, {good_name: torch.full_like(grads0[good_name], float("inf"))}),
            NonFiniteGradient,
            "cannot be skipped",
        ),
    ]
    for call, error, words in bad:
        with pytest.raises(error, match=words):
            call()
        assert step.waiting_for == 0
    step.provide(k0, loss0, grads0)
    with pytest.raises(
        EvaluationMismatch, match="k=0 of step t=0 was already provided; the step waits for evaluation k=1"
    ) as info:
        step.provide(0, loss0, grads0)
    assert info.value.expected_k == 1 and info.value.t == 0
    for k, loss, grads in log[1:]:
        step.provide(k, loss, grads)
    assert run.digest() == straight.digest()  # as if the bad ones had never been sent
    with pytest.raises(EvaluationMismatch, match="ended") as ended:
        step.provide(len(log), loss1, grads1)
    assert ended.value.expected_k is None


def test_the_state_is_neither_stepped_nor_snapshotted_during_a_step() -> None:
    make, options = PROBLEMS["mlp"]
    model = make()
    run = RunState(_spec(model, None, options), initial_params(model))
    step = run.begin_closure_step(0)
    for call in (run.to_bytes, run.digest, run.capture, run.parts, run.export, run.step_epoch, lambda: run.begin_closure_step(0)):
        with pytest.raises(StepInProgress, match="closure step t=0 is under way"):
            call()
    assert run.params()  # reading the parameters to evaluate at is what a step in progress is for
    Worker(make()).run_step(step)
    assert len(run.to_bytes()) > 0 and run.t == 1


def test_apply_and_closure_steps_each_refuse_the_other_protocol() -> None:
    make, options = PROBLEMS["mlp"]
    model = make()
    run = RunState(_spec(model, None, options), initial_params(model))
    with pytest.raises(ProtocolRequired, match=r"torch\.LBFGS steps by closure evaluations.*begin_closure_step"):
        run.apply({n: torch.zeros_like(p) for n, p in model.named_parameters()}, 0)
    adam = RunState({"params": manifest(model), "optimizer": "adamw"}, initial_params(model))
    with pytest.raises(ProtocolRequired, match="'adamw' steps by one gradient"):
        adam.begin_closure_step(0)
    with pytest.raises(StepMismatch):
        run.begin_closure_step(1)


def test_an_abandoned_step_ends_its_thread_and_leaves_the_state_unusable() -> None:
    make, options = PROBLEMS["mlp"]
    model = make()
    run = RunState(_spec(model, None, options), initial_params(model))
    step = run.begin_closure_step(0)
    worker = Worker(make())
    loss, grads = worker.evaluate(step.pending)  # type: ignore[arg-type]
    step.provide(0, loss, grads)
    thread = step._thread
    step.abandon()
    assert not thread.is_alive()
    assert step.waiting_for is None
    with pytest.raises(StepFailed, match="abandoned after 1 evaluation"):
        step.pending
    with pytest.raises(EvaluationMismatch, match="abandoned"):
        step.provide(1, loss, grads)
    for call in (run.to_bytes, lambda: run.begin_closure_step(0)):
        with pytest.raises(StepFailed, match="reloaded from a snapshot: closure step t=0 was abandoned"):
            call()
    step.abandon()  # nothing left to abandon


def test_a_step_dropped_unfinished_is_abandoned() -> None:
    make, options = PROBLEMS["mlp"]
    model = make()
    run = RunState(_spec(model, None, options), initial_params(model))
    step = run.begin_closure_step(0)
    thread = step._thread
    del step
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()
    with pytest.raises(StepFailed, match="abandoned after 0 evaluation"):
        run.to_bytes()


def test_an_exported_lbfgs_state_loads_back() -> None:
    straight, _, _, _ = _straight("strong_wolfe", 2)
    loaded = straight.load_export(straight.export())  # its trial step goes by closure evaluations
    assert loaded.digest() == straight.digest()


def test_a_plateau_scheduler_reads_the_loss_torch_s_step_returns() -> None:
    make, options = PROBLEMS["mlp"]
    model = make()
    spec = _spec(model, None, options, scheduler={"name": "ReduceLROnPlateau", "mode": "max", "patience": 0, "factor": 0.5})
    run = RunState(spec, initial_params(model))
    ref_model = make()
    opt = torch.optim.LBFGS(ref_model.parameters(), **options)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ref_model.loss()  # type: ignore[operator]
        loss.backward()
        return loss

    worker = Worker(make())
    for t in range(4):
        sched.step(float(opt.step(closure).detach()))
        done = worker.run_step(run.begin_closure_step(t))
        assert done.result.lrs == [g["lr"] for g in opt.param_groups]
    assert run.lrs[0] < options["lr"]  # type: ignore[operator]  # the loss (falling, in "max" mode) moved the LR
    _assert_params_equal(run.params(), dict(ref_model.named_parameters()), "final")


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(10, 3, mode="sum", sparse=True)
        self.head = nn.Linear(3, 1)
        self.register_buffer("ids", torch.tensor([1, 4, 1, 7, 2, 2]))
        self.register_buffer("offsets", torch.tensor([0, 2, 4]))
        self.register_buffer("target", torch.tensor([[0.5], [-1.0], [2.0]]))

    def loss(self) -> torch.Tensor:
        return ((self.head(self.bag(self.ids, self.offsets)) - self.target) ** 2).mean()


def test_lbfgs_takes_sparse_gradients_as_torch_does() -> None:
    """LBFGS reads a sparse gradient densely (``_gather_flat_grad``); sent sparse, it steps as in-process."""
    options: dict[str, object] = {"lr": 0.5, "max_iter": 5}
    ref = _reference(Bag(), "strong_wolfe", options, 2)
    model = Bag()
    run = RunState(
        _spec(model, "strong_wolfe", options, scheduler={"name": "StepLR", "step_size": 1, "gamma": 0.5}), initial_params(model)
    )
    worker = Worker(Bag())
    for t in range(2):
        done = worker.run_step(run.begin_closure_step(t))
        assert done.loss == ref["losses"][t]  # type: ignore[index]
    assert worker.log[0][2]["bag.weight"].layout == torch.sparse_coo
    _assert_params_equal(run.params(), dict(ref["model"].named_parameters()), "final")  # type: ignore[attr-defined]
