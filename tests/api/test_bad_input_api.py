"""Bad input over HTTP: a 4xx whose message names the problem, and the run's digest unchanged."""

from __future__ import annotations

import json
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from ..reference import initial_params, make_grads, make_model, manifest
from ..server import Server, database, encode

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("badinput")
    with database("sqlite", tmp) as url:
        srv = Server(url, tmp, env={"OPTIM_MAX_BODY_BYTES": str(LIMIT)}).start()
        yield srv
        srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _create(client: httpx.Client, **spec: Any) -> tuple[str, torch.nn.Module]:
    model = make_model()
    name = f"bad-{uuid.uuid4().hex[:8]}"
    run = {"name": name, "spec": {"params": manifest(model), "optimizer": {"name": "adamw", "lr": 0.01}, **spec}}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 201, r.text
    return name, model


def _lying_header(grads: dict[str, torch.Tensor], offsets: list[int]) -> bytes:
    data = encode(grads)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = offsets
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _grad_cases(model: torch.nn.Module) -> list[tuple[str, bytes, int, str]]:
    g = make_grads(model, 1)[0]
    nan = dict(g)
    nan["head.weight"] = g["head.weight"].clone()
    nan["head.weight"][1, 1] = float("nan")
    inf = {**g, "norm.bias": torch.full_like(g["norm.bias"], float("-inf"))}
    data = encode(g)
    return [
        ("wrong name", encode({**g, "head.wieght": g["head.weight"].clone()}), 422, "head.wieght"),
        ("wrong shape", encode({**g, "head.weight": g["head.weight"].t().contiguous()}), 422, "shape"),
        ("wrong dtype", encode({**g, "head.weight": g["head.weight"].double()}), 422, "float64"),
        ("non-floating", encode({**g, "head.bias": g["head.bias"].to(torch.int64)}), 422, "floating point"),
        ("bool", encode({**g, "head.bias": g["head.bias"] > 0}), 422, "floating point"),
        ("NaN", encode(nan), 422, "NaN or Inf"),
        ("-Inf", encode(inf), 422, "norm.bias"),
        ("truncated", data[: len(data) // 2], 400, "safetensors"),
        ("garbage", b"\x07" * 100, 400, "safetensors"),
        ("empty", b"", 400, "safetensors"),
        ("header beyond body", _lying_header(g, [0, 10**9]), 400, "safetensors"),
        ("overlapping offsets", _lying_header(g, [0, 4]), 400, "safetensors"),
        ("header length lies", struct.pack("<Q", 10**12) + b"{}", 400, "safetensors"),
        ("JSON garbage", b"{not json", 400, "JSON"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_gradients(client: httpx.Client, case: int) -> None:
    name, model = _create(client)
    label, body, status, word = _grad_cases(model)[case]
    before = client.get(f"/runs/{name}/digest").json()
    ctype = "application/json" if label.startswith("JSON") else "application/octet-stream"
    r = client.post(f"/runs/{name}/step", params={"t": 0}, content=body, headers={"content-type": ctype})
    assert r.status_code == status, (label, r.text)
    assert word in r.json()["detail"], (label, r.json())
    assert client.get(f"/runs/{name}/digest").json() == before, label


def test_nonfinite_skip_policy_over_http(client: httpx.Client) -> None:
    name, model = _create(client, nonfinite="skip")
    g = make_grads(model, 1)[0]
    g["head.bias"] = torch.full_like(g["head.bias"], float("nan"))
    params_before = client.get(f"/runs/{name}/params").content
    r = client.post(f"/runs/{name}/step", params={"t": 0}, content=encode(g))
    assert r.status_code == 200 and r.headers["Optim-Skipped"] == "true" and r.headers["Optim-T"] == "1"
    assert client.get(f"/runs/{name}").json()["skipped_steps"] == 1
    from safetensors.torch import load

    before, after = load(params_before), load(r.content)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ({"optimizer": {"name": "adamq"}}, "adamq"),
        ({"optimizer": {"name": "adamw", "lr": -0.1}}, "optimizer.lr"),
        ({"optimizer": {"name": "adamw", "betas": [0.9, 1.5]}}, "betas"),
        ({"optimizer": {"name": "sgd", "lr": 0.1, "momentum": -1}}, "momentum"),
        ({"scheduler": {"name": "Cosine"}}, "Cosine"),
        ({"scheduler": {"name": "LambdaLR", "lr_lambda": "__import__('os').getcwd()"}}, "lr_lambda"),
        ({"scheduler": {"name": "LambdaLR", "lr_lambda": "step.__class__"}}, "lr_lambda"),
        ({"scheduler": {"name": "LambdaLR", "lr_lambda": "1 / (step - step)"}}, "ZeroDivisionError"),
        ({"scheduler": {"name": "LambdaLR", "lr_lambda": "a\x00b"}}, "lr_lambda"),
        ({"ema": {"decay": 2}}, "ema.decay"),
        ({"param_groups": {"layer_decay": 0.5, "layer_rule": {"x": [["(", None]]}}}, "regex"),
    ],
)
def test_bad_specs(client: httpx.Client, spec: dict[str, Any], word: str) -> None:
    model = make_model()
    run = {"name": f"spec-{uuid.uuid4().hex[:8]}", "spec": {"params": manifest(model), "optimizer": {"name": "adamw"}, **spec}}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert client.get(f"/runs/{run['name']}").status_code == 404  # nothing was created


@pytest.mark.parametrize(
    ("path", "word"),
    [("/runs/a%2Fb", "run"), ("/runs/..", "run"), ("/runs/" + "n" * 129, "run"), ("/runs/-x", "run"), ("/runs/a b", "run")],
)
def test_bad_run_names(client: httpx.Client, path: str, word: str) -> None:
    r = client.get(path)
    assert r.status_code in (404, 422) and set(r.json()) >= {"error", "detail"}
    if r.status_code == 422:
        assert word in r.json()["detail"]


@pytest.mark.parametrize("t", ["-1", str(2**63), "1e3", "abc", ""])
def test_absurd_t(client: httpx.Client, t: str) -> None:
    name, model = _create(client)
    r = client.post(f"/runs/{name}/step?t={t}", content=encode(make_grads(model, 1)[0]))
    assert r.status_code == 422 and "t" in r.json()["detail"]
    assert client.get(f"/runs/{name}").json()["t"] == 0


def _peak_rss(server: Server) -> int:
    assert server.proc is not None
    status = open(f"/proc/{server.serving_pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_oversized_bodies_are_refused_while_streaming(server: Server, client: httpx.Client) -> None:
    name, _ = _create(client)
    before = client.get(f"/runs/{name}/digest").json()
    r = client.post(f"/runs/{name}/step", params={"t": 0}, content=b"\0" * (LIMIT + 1))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    peak = _peak_rss(server)
    total = 512 * 1024 * 1024

    def endless() -> Iterator[bytes]:  # no Content-Length: the server must stop keeping it at the limit
        chunk = b"\0" * (1 << 20)
        for _ in range(total // len(chunk)):
            yield chunk

    try:
        r = client.post(f"/runs/{name}/step", params={"t": 0}, content=endless())
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server answered 413 and closed the connection while the client was still sending
    grown = _peak_rss(server) - peak
    assert grown < total // 4, f"the server's peak memory grew by {grown >> 20} MiB for a {total >> 20} MiB body"
    assert client.get(f"/runs/{name}/digest").json() == before
    assert client.get("/healthz").status_code == 200


def test_conflicting_creates_at_once(server: Server) -> None:
    model = make_model()
    name = f"race-{uuid.uuid4().hex[:8]}"
    statuses: list[int] = []

    def create(lr: float) -> None:
        run = {"name": name, "spec": {"params": manifest(model), "optimizer": {"name": "sgd", "lr": lr}}}
        with server.client() as c:
            statuses.append(c.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)})).status_code)

    threads = [threading.Thread(target=create, args=(lr,)) for lr in (0.1, 0.2, 0.1, 0.2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(statuses) in ([200, 201, 409, 409], [200, 201, 409, 409][::-1])
    assert statuses.count(201) == 1


def test_bad_state_uploads(client: httpx.Client) -> None:
    import io
    import pickle

    name, _ = _create(client)
    before = client.get(f"/runs/{name}/digest").json()

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    pickled = pickle.dumps({"optimizer": Evil()})
    buf = io.BytesIO()
    torch.save({"optimizer": {"state": {}, "param_groups": [{"params": [0]}]}}, buf)
    for body, status in [(pickled, 400), (b"not a pt file", 400), (buf.getvalue(), 422)]:
        r = client.put(f"/runs/{name}/state", content=body)
        assert r.status_code == status, r.text
    assert client.get(f"/runs/{name}/digest").json() == before


def _state_upload(client: httpx.Client, name: str, change: Any) -> bytes:
    import io

    exported = torch.load(io.BytesIO(client.get(f"/runs/{name}/state").content), weights_only=True)
    change(exported)
    buf = io.BytesIO()
    torch.save(exported, buf)
    return buf.getvalue()


def _wrong_moment(state: dict[str, Any]) -> None:
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda s: s["optimizer"]["param_groups"][0].update(lr="abc"), "state does not fit"),
        (_wrong_moment, "state does not fit"),
        (lambda s: s.update(step=2**63), "step"),
        (lambda s: s["model"].update({"head.weight": torch.zeros(2, 2)}), "head.weight"),
    ],
)
def test_states_that_would_break_the_run_are_refused(client: httpx.Client, change: Any, word: str) -> None:
    # regressions from review: these loaded, then every later request failed
    name, model = _create(client)
    assert client.post(f"/runs/{name}/step", params={"t": 0}, content=encode(make_grads(model, 1)[0])).status_code == 200
    before = client.get(f"/runs/{name}/digest").json()
    r = client.put(f"/runs/{name}/state", content=_state_upload(client, name, change))
    assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert client.get(f"/runs/{name}/digest").json() == before
    assert client.post(f"/runs/{name}/step", params={"t": 1}, content=encode(make_grads(model, 2)[1])).status_code == 200


def test_numbers_too_large_for_a_float_and_unknown_dtypes(client: httpx.Client) -> None:
    name, model = _create(client)
    grads = {n: g.tolist() for n, g in make_grads(model, 1)[0].items()}
    r = client.post(
        f"/runs/{name}/step",
        params={"t": 0},
        content=json.dumps({"grads": grads, "loss": 10**400}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "loss" in r.json()["detail"]
    run = {"name": "huge", "spec": {"params": manifest(model), "optimizer": {"name": "sgd", "lr": 10**400}}}
    r = client.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)}))
    assert r.status_code == 422 and "optimizer.lr" in r.json()["detail"]
    header = json.dumps({"head.bias": {"dtype": "F8_E8M0", "shape": [3], "data_offsets": [0, 3]}}).encode()
    r = client.post(f"/runs/{name}/step", params={"t": 0}, content=struct.pack("<Q", len(header)) + header + b"\0\0\0")
    assert r.status_code == 400 and "safetensors" in r.json()["detail"], r.text
    assert client.get(f"/runs/{name}").json()["t"] == 0
