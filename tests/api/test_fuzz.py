"""No 5xx, whatever is sent: schemathesis against the OpenAPI document, per operation and stateful."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis

from service.app import create_app

from ..reference import initial_params, make_model, manifest
from ..server import Server, database, encode

EXAMPLES = 30  # per operation, without shrinking: bounded in time (seconds each)
FUZZ = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with database("sqlite", tmp) as url:
        srv = Server(url, tmp, env={"OPTIM_MAX_BODY_BYTES": str(8 * 1024 * 1024)}).start()
        # a run to aim at, so that generated requests reach more than "run not found"
        model = make_model()
        run = {
            "name": "fuzzed",
            "spec": {"params": manifest(model), "optimizer": {"name": "adamw"}, "scheduler": {"name": "StepLR", "step_size": 3}},
        }
        with srv.client() as c:
            assert c.post("/runs", content=encode(initial_params(model), {"run": json.dumps(run)})).status_code == 201
            assert c.post("/runs/fuzzed/checkpoints", json={"name": "c0"}).status_code == 201
        yield srv
        srv.stop()


@pytest.fixture(scope="module")
def api(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.base}/openapi.json")


# the operations, from the app's own OpenAPI document (no server needed to list them)
OPERATIONS = [(m.upper(), path) for path, item in create_app().openapi()["paths"].items() for m in item]


def _no_server_error(response: Any, case: Any) -> None:
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "detail"} and body["detail"], body


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_operation_answers_5xx(api: Any, method: str, path: str) -> None:
    operation = api[path][method]

    @hypothesis.given(case=operation.as_strategy())
    @FUZZ
    def check(case: Any) -> None:
        _no_server_error(case.call(timeout=20), case)  # a hang is a failure too

    check()


def test_stateful_sequences_answer_no_5xx(api: Any) -> None:
    class Machine(api.as_state_machine()):  # type: ignore[misc]
        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            _no_server_error(response, case)

    Machine.run(settings=hypothesis.settings(FUZZ, max_examples=20, stateful_step_count=6))
