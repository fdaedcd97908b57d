"""The API, the app in this process (``tests/service/inprocess.py``) on SQLite and PostgreSQL: runs,
exactly-once steps, schedule, checkpoints, errors."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import timm.optim
import torch
from timm.scheduler import create_scheduler_v2
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..reference import bitwise_equal, initial_params, make_grads, make_model, manifest, set_grads
from ..server import DATABASES, database, decode, encode
from .inprocess import InProcessClient, InProcessServer


@pytest.fixture(scope="module", params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    with database(request.param, tmp) as url:
        # the SQLite app keeps blobs in the database, the PostgreSQL one in a directory: both are exercised
        blob_store = "database" if request.param == "sqlite" else "directory"
        with InProcessServer(url, tmp, blob_store=blob_store, max_body_bytes=4 * 1024 * 1024) as srv:
            yield srv


@pytest.fixture
def client(server: InProcessServer) -> Iterator[InProcessClient]:
    with server.client() as c:
        yield c


SPEC: dict[str, Any] = {
    "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
    "scheduler": {"name": "cosine", "num_epochs": 40, "warmup_epochs": 4, "warmup_lr": 1e-4},
    "ema": {"decay": 0.9},
}


def new_run(client: InProcessClient, model: torch.nn.Module, **changes: Any) -> str:
    name = f"run-{uuid.uuid4().hex[:10]}"
    run = {"name": name, "spec": {"params": manifest(model), **SPEC, **changes}}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 201, r.text
    return name


def step(client: InProcessClient, name: str, t: int, grads: dict[str, torch.Tensor], **params: Any) -> Any:
    return client.post(f"/runs/{name}/step", params={"t": t, **params}, content=encode(grads))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[n], b[n]) for n in a)


def reference(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any, AveragedModel]:
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=0.01, weight_decay=0.05)
    sched, _ = create_scheduler_v2(
        opt, sched="cosine", num_epochs=40, warmup_epochs=4, warmup_lr=1e-4, step_on_epochs=False, updates_per_epoch=1
    )
    return opt, sched, AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))


def test_health_and_catalogue(client: InProcessClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    names = {o["name"] for o in client.get("/optimizers").json()["optimizers"]}
    assert {"adamw", "lookahead_lamb", "torch.SGD"} <= names
    assert "CosineAnnealingLR" in {s["name"] for s in client.get("/schedulers").json()["schedulers"]}
    assert "/runs/{run}/step" in client.get("/openapi.json").json()["paths"]


def test_create_is_idempotent_by_name_and_spec(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    run = {"name": name, "spec": {"params": manifest(model), **SPEC}}
    other_init = {n: torch.zeros_like(p) for n, p in initial_params(model).items()}
    again = client.post("/runs", content=encode(other_init, {"run": json.dumps(run)}))
    assert again.status_code == 200 and again.json()["t"] == 0
    different = {"name": name, "spec": {"params": manifest(model), **SPEC, "ema": None}}
    conflict = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(different)}))
    assert conflict.status_code == 409 and conflict.json()["error"] == "RunConflict"
    assert name in {r["name"] for r in client.get("/runs").json()["runs"]}


def test_json_bodies_for_curl(client: InProcessClient) -> None:
    name = f"json-{uuid.uuid4().hex[:8]}"
    r = client.post(
        "/runs",
        json={
            "name": name,
            "params": {"w": [1.0, 2.0]},
            "spec": {"params": [{"name": "w", "shape": [2]}], "optimizer": {"name": "sgd", "lr": 0.5}},
        },
    )
    assert r.status_code == 201, r.text
    r = client.post(f"/runs/{name}/step", params={"t": 0, "return": "json"}, json={"grads": {"w": [1.0, -1.0]}})
    assert r.status_code == 200, r.text
    ref = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = timm.optim.create_optimizer_v2([ref], opt="sgd", lr=0.5)
    ref.grad = torch.tensor([1.0, -1.0])
    opt.step()
    assert r.json()["params"]["w"] == ref.detach().tolist() and r.json()["t"] == 1


def test_steps_equal_in_process_and_are_exactly_once(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 8, drop=(3, "head.weight"))
    opt, sched, ema = reference(model)
    for k, g in enumerate(grads):
        set_grads(model, g)
        opt.step()
        sched.step_update(num_updates=k + 1)
        ema.update_parameters(model)
        r = step(client, name, k, g)
        assert r.status_code == 200, r.text
        assert r.headers["Optim-T"] == str(k + 1) and json.loads(r.headers["Optim-LR"]) == [g_["lr"] for g_ in opt.param_groups]
        got = decode(r.content)
        assert all(bitwise_equal(p, got[n]) for n, p in model.named_parameters())
        # a retry of the same step: the stored result, nothing applied again
        again = step(client, name, k, g)
        assert again.status_code == 200 and again.headers.get("Optim-Replayed") == "true"
        assert same_tensors(decode(again.content), got) and again.headers["Optim-LR"] == r.headers["Optim-LR"]
    different = {n: v + 1 for n, v in grads[-1].items()}
    r = step(client, name, 7, different)
    assert r.status_code == 409 and r.json()["current_t"] == 8 and "different gradient" in r.json()["detail"]
    for stale in (0, 5, 9, 100):
        r = step(client, name, stale, grads[0])
        assert r.status_code == 409 and r.json()["error"] == "StepConflict" and r.json()["current_t"] == 8
    ema_now = decode(client.get(f"/runs/{name}/averages/ema").content)
    assert all(bitwise_equal(p, ema_now[n]) for n, p in ema.module.named_parameters())
    assert client.get(f"/runs/{name}/averages/swa").status_code == 404
    params = client.get(f"/runs/{name}/params")
    assert params.headers["Optim-T"] == "8"
    assert all(bitwise_equal(p, decode(params.content)[n]) for n, p in model.named_parameters())


def test_return_modes_and_wire_dtypes(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 2)
    r = step(client, name, 0, {n: g.to(torch.bfloat16) for n, g in grads[0].items()}, **{"return": "none"})
    assert r.status_code == 200 and r.content == b"" and r.headers["Optim-T"] == "1"
    r = step(client, name, 1, grads[1])
    # the safetensors metadata of the response carries t and lr too
    header_len = int.from_bytes(r.content[:8], "little")
    meta = json.loads(r.content[8 : 8 + header_len])["__metadata__"]
    assert meta["t"] == "2" and json.loads(meta["lr"]) == json.loads(r.headers["Optim-LR"])


def test_schedule_preview_matches_what_happens(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    preview = client.get(f"/runs/{name}/schedule/preview", params={"steps": 6}).json()
    assert preview["interval"] == "step" and len(preview["lr"]) == 6
    seen = []
    for k, g in enumerate(make_grads(model, 6)):
        seen.append(json.loads(step(client, name, k, g).headers["Optim-LR"]))
    assert seen == preview["lr"]
    schedule = client.get(f"/runs/{name}/schedule").json()
    assert schedule["t"] == 6 and schedule["lr"] == seen[-1] and schedule["scheduler"] is not None


def test_epoch_steps_with_a_plateau_metric(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model, scheduler={"name": "ReduceLROnPlateau", "interval": "epoch", "patience": 0, "factor": 0.5})
    r = client.post(f"/runs/{name}/schedule/step", json={})
    assert r.status_code == 422 and "metric" in r.json()["detail"]
    lrs = [client.post(f"/runs/{name}/schedule/step", json={"metric": m}).json()["lr"][0] for m in (1.0, 1.0, 1.0)]
    assert lrs == [0.01, 0.005, 0.0025]
    assert client.get(f"/runs/{name}").json()["epoch"] == 3


def test_checkpoint_export_loads_into_local_timm_and_continues_equal(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 10)
    for k in range(5):
        assert step(client, name, k, grads[k]).status_code == 200
    r = client.post(f"/runs/{name}/checkpoints", json={"name": "at5"})
    assert r.status_code == 201 and r.json()["t"] == 5
    assert client.post(f"/runs/{name}/checkpoints", json={"name": "at5"}).status_code == 409
    assert [c["name"] for c in client.get(f"/runs/{name}/checkpoints").json()["checkpoints"]] == ["at5"]
    exported = torch.load(io.BytesIO(client.get(f"/runs/{name}/checkpoints/at5/export").content), weights_only=True)
    assert exported["step"] == 5

    local = make_model()
    local.load_state_dict(exported["model"])
    opt, sched, _ = reference(local)
    opt.load_state_dict(exported["optimizer"])
    sched.load_state_dict(exported["lr_scheduler"])
    for k in range(5, 10):
        set_grads(local, grads[k])
        opt.step()
        sched.step_update(num_updates=k + 1)
        r = step(client, name, k, grads[k])
        assert json.loads(r.headers["Optim-LR"]) == [g["lr"] for g in opt.param_groups]
    served = decode(r.content)
    assert all(bitwise_equal(p, served[n]) for n, p in local.named_parameters())


def test_rollback_and_fork_replay_the_same_future(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 8)
    for k in range(4):
        step(client, name, k, grads[k])
    client.post(f"/runs/{name}/checkpoints", json={"name": "mid"})
    for k in range(4, 8):
        first = step(client, name, k, grads[k])
    r = client.post(f"/runs/{name}/rollback", json={"checkpoint": "mid"})
    assert r.status_code == 200 and r.json()["t"] == 4
    assert step(client, name, 7, grads[7]).json()["current_t"] == 4
    fork_name = f"{name}-fork"
    r = client.post(f"/runs/{name}/fork", json={"checkpoint": "mid", "name": fork_name})
    assert r.status_code == 201 and r.json()["t"] == 4
    for k in range(4, 8):
        again = step(client, name, k, grads[k])
        forked = step(client, fork_name, k, grads[k])
    assert same_tensors(decode(again.content), decode(first.content))
    assert same_tensors(decode(forked.content), decode(first.content))
    assert client.post(f"/runs/{name}/fork", json={"checkpoint": "mid", "name": fork_name}).status_code == 409
    # regression (found by the fuzzer): a fork onto its own name deadlocked on the run's lock
    assert client.post(f"/runs/{name}/fork", json={"checkpoint": "mid", "name": name}, timeout=10).status_code == 409
    assert client.post(f"/runs/{name}/rollback", json={"checkpoint": "nope"}).status_code == 404
    assert client.delete(f"/runs/{name}/checkpoints/mid").status_code == 204
    assert client.get(f"/runs/{name}/checkpoints/mid/export").status_code == 404


def test_delete(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    step(client, name, 0, make_grads(model, 1)[0])
    assert client.delete(f"/runs/{name}").status_code == 204
    r = client.get(f"/runs/{name}")
    assert r.status_code == 404 and r.json() == {"error": "RunNotFound", "detail": f"run {name!r} does not exist"}
    assert client.delete(f"/runs/{name}").status_code == 404


def test_errors_have_one_shape_and_change_nothing(client: InProcessClient) -> None:
    model = make_model()
    name = new_run(client, model)
    grads = make_grads(model, 1)[0]
    before = client.get(f"/runs/{name}/digest").json()
    cases = [
        (client.post(f"/runs/{name}/step", params={"t": 0}, content=b"garbage!"), 400, "safetensors"),
        (client.post(f"/runs/{name}/step", params={"t": 0}, content=encode(grads)[:-10]), 400, "safetensors"),
        (client.post(f"/runs/{name}/step", params={"t": 0}, content=encode({"nope": torch.ones(1)})), 422, "nope"),
        (client.post(f"/runs/{name}/step", params={"t": 0}, content=encode({"head.bias": torch.ones(4)})), 422, "shape"),
        (client.post(f"/runs/{name}/step", params={"t": -1}, content=encode(grads)), 422, "t"),
        (client.post(f"/runs/{name}/step", content=encode(grads)), 422, "t"),
        (client.post(f"/runs/{name}/step", params={"t": 0}, content=b"\0" * (5 * 1024 * 1024)), 413, "limit"),
        (client.post("/runs/no-such-run/step", params={"t": 0}, content=encode(grads)), 404, "no-such-run"),
        (
            client.post("/runs", json={"name": "x", "spec": {"params": manifest(model), "optimizer": "adamz"}, "params": {}}),
            422,
            "adamz",
        ),
        (client.post("/runs", json={"name": "../etc", "spec": {}}), 422, "name"),
        (client.get("/runs/" + "x" * 200), 422, "run"),
    ]
    for response, status, word in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) >= {"error", "detail"} and word in body["detail"], body
    assert client.get(f"/runs/{name}/digest").json() == before and before["t"] == 0
