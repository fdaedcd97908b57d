"""The run spec in the OpenAPI document: its fields shown, unknown ones refused by name, types as JSON gives them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..server import database
from .inprocess import InProcessClient, InProcessServer


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessClient]:
    tmp = tmp_path_factory.mktemp("spec")
    with database("sqlite", tmp) as url, InProcessServer(url, tmp) as server, server.client() as c:
        yield c


def test_the_document_declares_the_spec_and_the_catalogue_s_names(client: InProcessClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RunCreate"}
    assert schemas["RunCreate"]["properties"]["spec"] == {"$ref": "#/components/schemas/RunSpecBody"}
    assert set(schemas["RunSpecBody"]["properties"]) >= {"params", "optimizer", "param_groups", "scheduler", "ema", "swa"}
    names = schemas["OptimizerSpec"]["properties"]["name"]["enum"]
    assert {"adamw", "lookahead_lamb", "torch.SGD"} <= set(names) and len(names) > 200
    assert set(schemas["SwaSpec"]["required"]) == {"start"}
    text = json.dumps(doc)
    assert "$defs" not in text  # every reference resolves inside the document


SPEC: dict[str, Any] = {"params": [{"name": "w", "shape": [2]}], "optimizer": {"name": "sgd", "lr": 0.5}}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sheduler": {"name": "StepLR"}}, "spec.sheduler"),
        ({"ema": {"decya": 0.9}}, "spec.ema.decya"),
        ({"param_groups": {"filter_bias": False}}, "spec.param_groups.filter_bias"),
        ({"swa": {"start": 1, "every_n": 2}}, "spec.swa.every_n"),
        ({"params": [{"name": "w", "shape": [2], "dtyp": "float32"}]}, "spec.params.0.dtyp"),
    ],
)
def test_unknown_fields_are_refused_by_name(client: InProcessClient, change: dict[str, Any], named: str) -> None:
    r = client.post("/runs", json={"name": "typo", "spec": {**SPEC, **change}, "params": {"w": [1.0, 2.0]}})
    assert r.status_code == 422 and named in r.json()["detail"] and "Extra inputs" in r.json()["detail"], r.text
    assert client.get("/runs/typo").status_code == 404


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"optimizer": {"name": "sgd", "lr": "0.5"}}, "spec.optimizer"),
        ({"seed": True}, "spec.seed"),
        ({"params": [{"name": "w", "shape": ["2"]}]}, "spec.params.0.shape.0"),
        ({"nonfinite": "ignore"}, "spec.nonfinite"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(client: InProcessClient, change: dict[str, Any], named: str) -> None:
    r = client.post("/runs", json={"name": "typed", "spec": {**SPEC, **change}, "params": {"w": [1.0, 2.0]}})
    assert r.status_code == 422 and named in r.json()["detail"], r.text


def test_hyper_parameters_beside_the_named_fields_reach_the_library(client: InProcessClient) -> None:
    spec = {**SPEC, "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "nesterov": True}}
    r = client.post("/runs", json={"name": "open", "spec": spec, "params": {"w": [1.0, 2.0]}})
    assert r.status_code == 201, r.text
    assert r.json()["groups"][0]["momentum"] == 0.9 and r.json()["groups"][0]["nesterov"] is True
    typo = {**spec, "optimizer": {"name": "sgd", "momentun": 0.9}}
    r = client.post("/runs", json={"name": "open2", "spec": typo, "params": {"w": [1.0, 2.0]}})
    assert r.status_code == 422 and "momentun" in r.json()["detail"]  # the library's own refusal, named


def test_empty_database_gets_its_schema_when_served(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    with InProcessServer(url, tmp_path) as server, server.client() as c:
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.post("/runs", json={"name": "first", "spec": SPEC, "params": {"w": [1.0, 2.0]}}).status_code == 201
