"""Schema fuzzing: schemathesis reads the live app's own /openapi.json and sends the requests it
generates over real HTTP to a real uvicorn server. Every answer must be one the schema documents
(status code, content type, headers, body), none may be a server error, schema-valid requests
must be accepted and schema-violating ones rejected (schemathesis' default checks, all on).

It runs schemathesis' engine (what `schemathesis run` drives) rather than its pytest plugin,
whose lazy fixture loader does not work with pytest 9. Derandomized with fixed seeds, no example
database and no cache, so CI sends the same cases on every run. Two runs: one with the valid API
key (so /tokenize's validation and storage are reached) and one with the credentials schemathesis
generates itself (none, or random keys), which the write route must refuse with its 401.

Below the fuzzing, one deterministic test per contract mismatch it found, each of which failed
before its fix.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events

from service.app import create_app
from tests.service.conftest import AUTH, LiveServer, live_server, service_settings

OPERATIONS = {
    "POST /recommend",
    "POST /recommend/batch",
    "POST /tokenize",
    "GET /items/{item_id}",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
}
EXAMPLES = 200
"""Hypothesis examples per operation in the fuzzing phase; the examples and coverage phases add
their own deterministic cases (boundary values, missing fields, unexpected methods)."""
BATCH_EXAMPLES = 100
"""Fewer for /recommend/batch, the costliest to generate: its elements are /recommend's bodies,
fuzzed there."""
MIN_CASES_PER_RUN = 1000
"""Two runs: at least 2,000 cases in all."""


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[LiveServer]:
    with live_server(service_settings(tiny_bundle)) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@dataclass
class FuzzRun:
    cases: collections.Counter[tuple[str, int, bool]] = field(default_factory=collections.Counter)
    """(operation, status code, whether the request carried the valid key) -> requests sent."""
    unkeyed_write_rejections: set[str] = field(default_factory=set)
    """The error types of /tokenize's 422 answers to requests without the valid key."""
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def statuses(self, operation: str, keyed: bool | None = None) -> set[int]:
        return {s for (op, s, k) in self.cases if op == operation and keyed in (None, k)}

    def summary(self) -> str:
        lines = [f"{self.total} cases in {self.seconds:.1f} s"]
        lines += [
            f"  {op} {status} {'with' if keyed else 'without'} the key: {n}"
            for (op, status, keyed), n in sorted(self.cases.items())
        ]
        lines.append(f"  /tokenize 422 without the key: {sorted(self.unkeyed_write_rejections)}")
        return "\n".join(lines + self.failures)


def fuzz(server: LiveServer, seed: int, headers: dict[str, str] | None = None) -> FuzzRun:
    """One schemathesis run over every operation of the server's /openapi.json."""
    options: dict[str, object] = {
        "seed": seed,
        "base-url": server.url,
        "request-timeout": 30,
        "generation": {
            "mode": "all",  # schema-valid and schema-violating requests
            "max-examples": EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "operations": [
            {"include-path": "/recommend/batch", "generation": {"max-examples": BATCH_EXAMPLES}}
        ],
        # no links between operations in the schema: nothing for a stateful phase to follow
        "phases": {"stateful": {"enabled": False}},
        "cache": {"enabled": False},
    }
    if headers:
        options["headers"] = headers
    config = SchemathesisConfig.from_dict(options)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    run = FuzzRun()
    start = time.monotonic()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for interaction in recorder.interactions.values():
                status = interaction.response.status_code if interaction.response else -1
                keyed = interaction.request.headers.get("Authorization") == [AUTH["Authorization"]]
                run.cases[(recorder.label, status, keyed)] += 1
                if (recorder.label, status, keyed) == ("POST /tokenize", 422, False):
                    assert interaction.response is not None
                    error = json.loads(interaction.response.content)["detail"][0]["type"]
                    run.unkeyed_write_rejections.add(error)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        body = recorder.cases[case_id].value.body
                        run.failures.append(
                            f"{recorder.label} [{check.name}] {failure.title}: "
                            f"{failure.message} (body {body!r:.300})"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            run.failures.append(f"error: {event!r:.1000}")
        elif (
            isinstance(event, events.EngineFinished)
            and event.stop_reason != schemathesis.engine.StopReason.COMPLETED
        ):
            run.failures.append(f"the run stopped early: {event.stop_reason}")
    run.seconds = time.monotonic() - start
    return run


def assert_clean(run: FuzzRun) -> None:
    assert not run.failures, run.summary()
    assert {op for op, _, _ in run.cases} == OPERATIONS, run.summary()
    assert run.total >= MIN_CASES_PER_RUN, run.summary()
    assert not any(status >= 500 or status < 0 for _, status, _ in run.cases), run.summary()
    # The write route accepts the valid key and nothing else.
    assert 401 not in run.statuses("POST /tokenize", keyed=True), run.summary()
    assert not {200, 409} & run.statuses("POST /tokenize", keyed=False), run.summary()


@pytest.mark.slow
@pytest.mark.timeout(600)  # a hang guard; the run is bounded by its examples
def test_fuzz_with_the_api_key(server: LiveServer) -> None:
    run = fuzz(server, seed=19, headers=AUTH)
    print(run.summary())
    assert_clean(run)
    # The fuzzing got past validation everywhere: each operation answered 2xx to some cases,
    # and /tokenize created items and refused conflicting ones.
    for op in OPERATIONS:
        assert any(200 <= s < 300 for s in run.statuses(op)), f"{op}: no 2xx\n{run.summary()}"
    assert {200, 409, 422} <= run.statuses("POST /tokenize", keyed=True), run.summary()


@pytest.mark.slow
@pytest.mark.timeout(600)  # a hang guard; the run is bounded by its examples
def test_fuzz_with_generated_credentials(server: LiveServer) -> None:
    run = fuzz(server, seed=20)
    print(run.summary())
    assert_clean(run)
    # Without the key, /tokenize refuses everything it can read as JSON; a body that is not
    # JSON fails first (422, before the key is checked; nothing is decoded or stored), and
    # another method on the path is 405.
    assert run.statuses("POST /tokenize") <= {401, 405, 422}, run.summary()
    assert run.unkeyed_write_rejections <= {"json_invalid"}, run.summary()
    assert run.cases[("POST /tokenize", 401, False)] > 100, run.summary()
    # The key is optional on /recommend: random keys are not refused.
    assert 200 in run.statuses("POST /recommend"), run.summary()


# ---- the mismatches the fuzzing found, one deterministic test each -----------------------------
def test_the_key_is_optional_on_the_read_routes_and_the_schema_says_so(
    client: httpx.Client, tiny_bundle: Path
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    optional: list[dict[str, list[str]]] = [{}, {"HTTPBearer": []}]
    required: list[dict[str, list[str]]] = [{"HTTPBearer": []}]
    assert paths["/recommend"]["post"]["security"] == optional
    assert paths["/recommend/batch"]["post"]["security"] == optional
    assert paths["/tokenize"]["post"]["security"] == required
    assert client.post("/recommend", json={"k": 2}).status_code == 200
    # With LETTERREC_REQUIRE_KEY_FOR_RECOMMEND the key is required, and the schema says that.
    strict = create_app(service_settings(tiny_bundle, require_key_for_recommend=True))
    assert strict.openapi()["paths"]["/recommend"]["post"]["security"] == required


@pytest.mark.parametrize("path", ["/recommend", "/recommend/batch", "/tokenize"])
@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe{", b'{"history": ["caf\xe9"]}', b"[" * 200_000, b'{"k": 1'],
    ids=["not-utf8", "latin1-inside", "too-deep", "syntax"],
)
def test_a_body_that_is_not_json_is_422_never_400(
    client: httpx.Client, path: str, raw: bytes
) -> None:
    r = client.post(path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_an_integral_number_is_an_integer(client: httpx.Client) -> None:
    # JSON Schema's "integer" includes 5.0; a JSON encoder may well write it so.
    r = client.post("/recommend", json={"k": 5.0})
    assert r.status_code == 200 and len(r.json()["items"]) == 5, r.text
    assert client.post("/recommend", json={"k": 5.5}).status_code == 422
    assert client.post("/recommend", json={"k": "5"}).status_code == 422


def test_repeat_is_offered_only_when_the_bundle_can_do_it(client: httpx.Client) -> None:
    request = client.get("/openapi.json").json()["components"]["schemas"]["RecommendRequest"]
    # The tiny bundle has no fitted repeat prior: repeat can only be false or null ...
    assert request["properties"]["repeat"]["anyOf"] == [
        {"type": "boolean", "const": False},
        {"type": "null"},
    ]
    assert client.post("/recommend", json={"repeat": True}).status_code == 422
    assert client.post("/recommend", json={"repeat": False}).status_code == 200
    # ... and in any bundle it needs the history, so exclude_history must not be true with it.
    both = request["not"]
    assert both["required"] == ["repeat", "exclude_history"]
    r = client.post("/recommend", json={"repeat": True, "exclude_history": True})
    assert r.status_code == 422


def test_tokenize_item_fields_are_declared(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    item = schemas["TokenizeItem"]
    assert item["additionalProperties"] == {"type": "string", "maxLength": 10_000}
    assert item["maxProperties"] == 35 and item["propertyNames"] == {"maxLength": 64}

    def tokenize(**fields: object) -> int:
        body = {"items": [{"item_id": "fields-1", **fields}], "dry_run": True}
        return client.post("/tokenize", json=body, headers=AUTH).status_code

    assert tokenize(color="red") == 200
    assert tokenize(color=3) == 422
    assert tokenize(**{"n" * 65: "long name"}) == 422
    assert tokenize(title="t", **{f"f{i}": "v" for i in range(33)}) == 200  # 35 fields
    assert tokenize(title="t", **{f"f{i}": "v" for i in range(34)}) == 422


def test_every_error_status_is_documented_with_its_body(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    documented = {
        ("/recommend", "post"): {"200", "401", "413", "422", "503", "504"},
        ("/recommend/batch", "post"): {"200", "401", "413", "422", "503", "504"},
        ("/tokenize", "post"): {"200", "401", "409", "413", "422", "429", "503", "507"},
        ("/items/{item_id}", "get"): {"200", "404", "422"},
        ("/readyz", "get"): {"200", "503"},
    }
    for (path, method), statuses in documented.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == statuses, (path, set(responses))
        for status in statuses - {"200"}:
            assert "schema" in responses[status]["content"]["application/json"], (path, status)
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
