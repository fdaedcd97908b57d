"""The per-step history (``GET /runs/{run}/history``), the app in this process on SQLite and PostgreSQL: what the
worker sent and what an in-process torch optimizer gives, buckets against numpy, retries, rollback, fork, delete,
snapshot-only runs, bad parameters."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from service.storage.models import HistoryBlock, HistoryValue

from ..reference import initial_params, make_grads, make_model, manifest, set_grads
from ..server import DATABASES, database, encode
from .inprocess import InProcessClient, InProcessServer
from .test_api import SPEC, reference


@pytest.fixture(scope="module", params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp(f"history-{request.param}")
    with database(request.param, tmp) as url, InProcessServer(url, tmp, history_norms="all") as srv:
        yield srv


@pytest.fixture
def client(server: InProcessServer) -> Iterator[InProcessClient]:
    with server.client() as c:
        yield c


def new_run(client: InProcessClient, model: torch.nn.Module, **options: Any) -> str:
    name = f"run-{uuid.uuid4().hex[:10]}"
    run = {"name": name, "spec": {"params": manifest(model), **SPEC}, **options}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 201, r.text
    return name


def step(client: InProcessClient, name: str, t: int, grads: dict[str, torch.Tensor], **params: Any) -> Any:
    scalars = params.pop("scalars", None)
    headers = {"Optim-Scalars": json.dumps(scalars)} if scalars is not None else {}
    return client.post(f"/runs/{name}/step", params={"t": t, "return": "none", **params}, content=encode(grads), headers=headers)


def history(client: InProcessClient, name: str, **params: Any) -> dict[str, Any]:
    r = client.get(f"/runs/{name}/history", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The reference: one flat vector in float64 (not the foreach path the service takes)."""
    return float(torch.cat([t.detach().double().flatten() for t in tensors]).norm())


def test_series_are_what_the_worker_sent_and_what_torch_gives(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    opt, sched, _ = reference(model)
    grads = make_grads(model, 12)
    expected: dict[str, list[float]] = {}
    for t, g in enumerate(grads):
        loss, acc = 1.0 / (t + 1), t / 20
        assert step(client, name, t, g, loss=loss, scalars={"acc": acc, "eval/top1": 2 * acc}).status_code == 200
        lrs = [group["lr"] for group in opt.param_groups]
        before = [p.detach().clone() for p in model.parameters()]
        set_grads(model, g)
        opt.step()
        sched.step_update(t + 1)
        row = {"loss": loss, "acc": acc, "eval/top1": 2 * acc, "grad_norm": total_norm(list(g.values()))}
        row["update_norm"] = total_norm([p - b for p, b in zip(model.parameters(), before, strict=True)])
        row["param_norm"] = total_norm(list(model.parameters()))
        row.update({f"lr/{i}": lr for i, lr in enumerate(lrs)})
        for key, value in row.items():
            expected.setdefault(key, []).append(value)
    answer = history(client, name)
    assert (answer["run"], answer["t"], answer["start"], answer["stop"], answer["bucket"]) == (name, 12, 0, 12, 1)
    series = answer["series"]
    assert set(series) == {*expected, "step_ms", "time"}
    for key, values in expected.items():
        s = series[key]
        assert s["t"] == list(range(12)) and s["count"] == [1] * 12, key
        assert s["min"] == s["mean"] == s["max"], key
        assert s["mean"] == pytest.approx(values, rel=1e-5), key
    assert all(ms > 0 for ms in series["step_ms"]["mean"])
    assert series["time"]["mean"] == sorted(series["time"]["mean"])
    # a few names, a range
    some = history(client, name, names="loss,lr/1", start=3, stop=7)
    assert set(some["series"]) == {"loss", "lr/1"} and some["series"]["loss"]["t"] == [3, 4, 5, 6]
    assert some["series"]["lr/1"]["mean"] == pytest.approx(expected["lr/1"][3:7])


def test_a_retried_step_is_recorded_once(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 2)
    assert step(client, name, 0, grads[0], loss=2.0).status_code == 200
    again = step(client, name, 0, grads[0], loss=2.0)
    assert again.status_code == 200 and again.headers["Optim-Replayed"] == "true"
    assert step(client, name, 1, grads[1], loss=1.0).status_code == 200
    loss = history(client, name)["series"]["loss"]
    assert loss["t"] == [0, 1] and loss["mean"] == [2.0, 1.0] and loss["count"] == [1, 1]


def _write_values(server: InProcessServer, name: str, values: np.ndarray) -> None:
    """The history of ``len(values)`` steps written straight through the storage layer (NaN: not finite)."""
    with server.registry.ctx.db.write("test history") as repo:
        row = repo.run("local", name)
        assert row is not None
        rows = [(t, "loss", None if math.isnan(v) else float(v)) for t, v in enumerate(values)]
        for i in range(0, len(rows), 500):  # in batches, as a run records them: blocks complete as they go
            repo.series.add(row.id, rows[i : i + 500])


def _numpy_buckets(values: np.ndarray, start: int, stop: int, size: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"t": [], "min": [], "mean": [], "max": [], "count": []}
    for k in range(start // size, -(-stop // size)):
        chunk = values[max(k * size, start) : min((k + 1) * size, stop)]
        if not len(chunk):
            continue
        out["t"].append(max(k * size, start))
        out["count"].append(len(chunk))
        for stat, f in (("min", np.min), ("mean", np.mean), ("max", np.max)):
            v = f(chunk)  # NaN propagates: a bucket holding one is null
            out[stat].append(None if math.isnan(v) else float(v))
    return out


@pytest.mark.parametrize(
    ("start", "stop", "points"),
    [
        (0, None, 1000),
        (0, None, 7),
        (0, None, 10_000),
        (37, 2950, 13),
        (250, 2345, 2),
        (1234, 1300, 1000),
        (0, None, 1),
        (0, 3456, 30),
    ],
)
def test_buckets_are_numpys(server: InProcessServer, client: InProcessClient, start: int, stop: int | None, points: int) -> None:
    name = new_run(client, make_model())
    rng = np.random.default_rng(7)
    values = rng.normal(size=3456)
    values[[5, 1500, 3400]] = np.nan
    _write_values(server, name, values)
    with server.registry.ctx.db.read("test") as repo:
        assert repo.series.blocks_end(repo.run("local", name).id) == 3400  # type: ignore[union-attr]
    stop = 3456 if stop is None else stop  # a run made here is at t=0: its history is only what was written
    answer = history(client, name, start=start, stop=stop, points=points)
    size = answer["bucket"]
    assert len(answer["series"]["loss"]["t"]) <= points
    want = _numpy_buckets(values, start, stop, size)
    got = answer["series"]["loss"]
    assert got["t"] == want["t"] and got["count"] == want["count"]
    for stat in ("min", "max", "mean"):
        assert [v is None for v in got[stat]] == [v is None for v in want[stat]], stat
        assert [v for v in got[stat] if v is not None] == pytest.approx([v for v in want[stat] if v is not None], rel=1e-9)


def test_rollback_drops_the_history_after_the_checkpoint_and_a_fork_starts_its_own(
    server: InProcessServer, client: InProcessClient
) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 4)
    for t in range(105):
        assert step(client, name, t, grads[t % 4], loss=float(t)).status_code == 200
        if t == 49:
            assert client.post(f"/runs/{name}/checkpoints", json={"name": "at50"}).status_code in (200, 201)
    assert client.post(f"/runs/{name}/rollback", json={"checkpoint": "at50"}).status_code == 200
    assert history(client, name)["series"]["loss"]["t"] == list(range(50))
    with server.registry.ctx.db.read("test") as repo:
        assert repo.series.blocks_end(repo.run("local", name).id) == 0  # type: ignore[union-attr]
    for t in range(50, 110):
        assert step(client, name, t, grads[t % 4], loss=1000.0 + t).status_code == 200
    actual = np.array([float(t) for t in range(50)] + [1000.0 + t for t in range(50, 110)])
    loss = history(client, name)["series"]["loss"]
    assert loss["mean"] == pytest.approx(list(actual))
    coarse = history(client, name, points=1)  # from the block re-aggregated after the rollback, and the steps past it
    assert coarse["bucket"] == 200 and coarse["series"]["loss"]["count"] == [110]
    assert coarse["series"]["loss"]["mean"] == pytest.approx([actual.mean()])

    r = client.post(f"/runs/{name}/fork", json={"checkpoint": "at50", "name": f"{name}-fork"})
    assert r.status_code in (200, 201), r.text
    assert history(client, f"{name}-fork")["series"] == {}
    assert step(client, f"{name}-fork", 50, grads[2], loss=-1.0).status_code == 200
    assert history(client, f"{name}-fork")["series"]["loss"] == {
        "t": [50],
        "min": [-1.0],
        "mean": [-1.0],
        "max": [-1.0],
        "count": [1],
    }


def test_a_skipped_step_records_its_gradient_norm_as_null(client: InProcessClient) -> None:
    model = make_model()
    name = f"run-{uuid.uuid4().hex[:10]}"
    run = {"name": name, "spec": {"params": manifest(model), **SPEC, "nonfinite": "skip"}}
    assert client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)})).status_code == 201
    grads = make_grads(model, 2)
    grads[1]["head.bias"][0] = math.inf
    for t in range(2):
        assert step(client, name, t, grads[t], loss=1.0).status_code == 200
    norm = history(client, name)["series"]["grad_norm"]
    assert norm["count"] == [1, 1] and norm["mean"][0] is not None and norm["mean"][1] is None and norm["max"][1] is None


def test_a_snapshot_only_run_writes_its_history_with_its_snapshots(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model, durability="snapshot", snapshot_every=5)
    grads = make_grads(model, 7)
    for t in range(7):
        assert step(client, name, t, grads[t], loss=float(t)).status_code == 200
    assert history(client, name, stop=7)["series"]["loss"]["t"] == [0, 1, 2, 3, 4]  # the snapshot at t=5 holds 0..4


def test_deleting_a_run_deletes_its_history(server: InProcessServer, client: InProcessClient) -> None:
    name = new_run(client, make_model())
    _write_values(server, name, np.arange(250.0))
    with server.registry.ctx.db.read("test") as repo:
        run_id = repo.run("local", name).id  # type: ignore[union-attr]
    assert client.delete(f"/runs/{name}").status_code == 204
    with server.registry.ctx.db.read("test") as repo:
        for table in (HistoryValue, HistoryBlock):
            assert repo.session.execute(select(func.count()).select_from(table).where(table.run_id == run_id)).scalar() == 0
    assert client.get(f"/runs/{name}/history").status_code == 404


@pytest.mark.parametrize(
    "params",
    [{"start": 5, "stop": 2}, {"points": 0}, {"points": 10_001}, {"names": "loss,bad name"}, {"names": "a,,b"}, {"start": -1}],
)
def test_bad_query_parameters_are_422(client: InProcessClient, params: dict[str, Any]) -> None:
    name = new_run(client, make_model())
    r = client.get(f"/runs/{name}/history", params=params)
    assert r.status_code == 422 and r.json()["error"] == "Invalid" and r.json()["detail"], r.text


@pytest.mark.parametrize("points", [1, 2, 1000])
def test_a_range_far_past_the_run_is_answered_at_once(client: InProcessClient, points: int) -> None:
    """A range up to 2**62 is answered at once (the bucket size was once found by ~1e16 passes of a loop)."""
    model = make_model()
    name = new_run(client, model)
    assert step(client, name, 0, make_grads(model, 1)[0], loss=1.0).status_code == 200
    for start, stop in ((2**61, 2**62), (0, 2**62)):
        r = client.get(f"/runs/{name}/history", params={"start": start, "stop": stop, "points": points})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["bucket"] >= (stop - start) // points and len(got["series"].get("loss", {"t": []})["t"]) <= points
        assert got["series"].get("loss", {"t": []})["t"] == ([] if start else [0])


@pytest.mark.parametrize(
    "header",
    [
        "not json",
        "[1, 2]",
        json.dumps({f"s{i}": 1.0 for i in range(33)}),
        json.dumps({"bad name": 1.0}),
        json.dumps({"x" * 65: 1.0}),
        json.dumps({"loss": 1.0}),
        json.dumps({"lr/0": 1.0}),
        json.dumps({"acc": "high"}),
        json.dumps({"acc": True}),
        '{"acc": NaN}',
        '{"acc": Infinity}',
        json.dumps({"x" * 64 + "\n": 1.0}),  # a name that a regex's $ would let through before its newline
        '{"acc": ' + "9" * 400 + "}",  # an integer no float holds
    ],
)
def test_bad_scalars_are_422_and_change_nothing(client: InProcessClient, header: str) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 2)
    assert step(client, name, 0, grads[0], loss=1.0).status_code == 200
    before = client.get(f"/runs/{name}/digest").json()
    r = client.post(
        f"/runs/{name}/step", params={"t": 1, "return": "none"}, content=encode(grads[1]), headers={"Optim-Scalars": header}
    )
    assert r.status_code == 422 and "Optim-Scalars" in r.json()["detail"], r.text
    assert client.get(f"/runs/{name}/digest").json() == before
    assert history(client, name)["series"]["loss"]["t"] == [0]
