"""Every endpoint over real HTTP (uvicorn + httpx), one embedded-store app for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from models.bundle import Bundle
from tests.service.conftest import AUTH, LiveServer, live_server, service_settings

PLACEMENTS = {
    "in-process": {"decode_process": False},
    "decode-process": {"decode_process": True, "decode_workers": 1},
    "two-decode-processes": {"decode_process": True, "decode_workers": 2, "torch_threads": 1},
}


@pytest.fixture(scope="module", params=list(PLACEMENTS), ids=list(PLACEMENTS))
def server(tiny_bundle: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """Every test runs against every engine placement: in the server process, in a child
    process (LETTERREC_DECODE_PROCESS), where /tokenize's trie changes must be shipped over,
    and in two children decoding batches side by side (LETTERREC_DECODE_WORKERS), each of
    which must see those changes."""
    with live_server(service_settings(tiny_bundle, **PLACEMENTS[request.param])) as srv:
        yield srv


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def rec(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/recommend", json=body)


def ids(response: httpx.Response) -> list[str]:
    return [it["item_id"] for it in response.json()["items"]]


# ---- operations ----------------------------------------------------------------------------
def test_health_ready_docs(client: httpx.Client, bundle: Bundle, server: LiveServer) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and all(body["checks"].values())
    assert body["catalogue_items"] >= len(bundle.catalogue)
    assert body["model_version"].endswith(bundle.manifest.created_at)
    assert body["engine"] == "torch" and body["device"] == "cpu"
    # How it decodes, as the placement asked: in process, one child, or two side by side.
    asked = server.settings
    workers = asked.decode_workers if asked.decode_process else 0
    assert (body["dtype"], body["decode_workers"]) == ("float32", workers)
    docs = client.get("/docs")
    assert docs.status_code == 200
    # Air-gapped installs: the page's scripts come from the service itself, not a CDN.
    assert "cdn" not in docs.text and "/static/swagger-ui/swagger-ui-bundle.js" in docs.text
    js = client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    assert client.get("/static/swagger-ui/swagger-ui.css").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/recommend/batch", "/tokenize", "/items/{item_id}"} <= set(paths)


# ---- /recommend ----------------------------------------------------------------------------
def test_recommend_returns_k_distinct_unseen_items(client: httpx.Client, bundle: Bundle) -> None:
    history = bundle.catalogue.item_ids[:5]
    r = rec(client, history=history, k=10)
    assert r.status_code == 200, r.text
    body = r.json()
    got = ids(r)
    assert len(got) == 10 == len(set(got)) and not set(got) & set(history)
    assert body["ignored_history"] == []
    assert body["model_version"]
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    index = bundle.catalogue.index()
    for it in body["items"]:
        row = index[it["item_id"]]
        assert it["codes"] == bundle.catalogue.codes[row].tolist()
        assert it["title"] == bundle.catalogue.titles[row]


def test_empty_history_is_the_model_prior(client: httpx.Client) -> None:
    a, b = rec(client, history=[], k=5), rec(client, k=5)
    assert a.status_code == b.status_code == 200
    assert ids(a) == ids(b) and len(ids(a)) == 5


def test_unknown_history_items_are_ignored_and_listed(client: httpx.Client, bundle: Bundle) -> None:
    known = bundle.catalogue.item_ids[3]
    r = rec(client, history=["ghost-1", known, "ghost-2", "ghost-1"], k=5)
    assert r.status_code == 200
    assert r.json()["ignored_history"] == ["ghost-1", "ghost-2"]
    assert ids(r) == ids(rec(client, history=[known], k=5))


def test_exclusions_are_exact(client: httpx.Client, bundle: Bundle) -> None:
    history = bundle.catalogue.item_ids[10:13]
    top = ids(rec(client, history=history, k=10))
    r = rec(client, history=history, k=10, exclude=top[:4] + ["not-an-item"])
    got = ids(r)
    assert len(got) == 10 and not set(got) & set(top[:4])
    keep_history = ids(rec(client, history=history, k=50, exclude_history=False))
    assert len(keep_history) == 50


def test_k_larger_than_the_catalogue_allows(client: httpx.Client, bundle: Bundle) -> None:
    all_ids = bundle.catalogue.item_ids
    r = rec(client, k=100, exclude=all_ids[: len(all_ids) - 7])
    assert r.status_code == 200
    assert sorted(ids(r)) == sorted(all_ids[len(all_ids) - 7 :])
    assert len(ids(rec(client, k=100))) == 100
    too_big = rec(client, k=101)
    assert too_big.status_code == 422 and "k" in too_big.json()["detail"][0]["loc"]


def test_batch_matches_single_requests(client: httpx.Client, bundle: Bundle) -> None:
    reqs = [
        {"history": bundle.catalogue.item_ids[i : i + 3], "k": 5 + i} for i in range(0, 12, 4)
    ] + [{"history": ["nope"], "k": 3}]
    r = client.post("/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    responses = r.json()["responses"]
    assert len(responses) == len(reqs)
    for req, resp in zip(reqs, responses, strict=True):
        single = rec(client, **req).json()
        assert [it["item_id"] for it in resp["items"]] == [it["item_id"] for it in single["items"]]
        assert resp["ignored_history"] == single["ignored_history"]


# ---- /items ----------------------------------------------------------------------------------
def test_get_item(client: httpx.Client, bundle: Bundle) -> None:
    item_id = bundle.catalogue.item_ids[42]
    r = client.get(f"/items/{item_id}")
    assert r.status_code == 200
    assert r.json() == {
        "item_id": item_id,
        "codes": bundle.catalogue.codes[42].tolist(),
        "title": bundle.catalogue.titles[42],
        "source": "bundle",
    }
    missing = client.get("/items/no-such-item")
    assert missing.status_code == 404 and "no-such-item" in missing.json()["detail"]


# ---- /tokenize -------------------------------------------------------------------------------
NEW_ITEM = {
    "item_id": "new-1",
    "title": "Harbour view ramen bar",
    "description": "noodles, 5 stars",
}


def catalogue_size(client: httpx.Client) -> int:
    return int(client.get("/readyz").json()["catalogue_items"])


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}]
)
def test_tokenize_without_valid_key_is_401_and_changes_nothing(
    client: httpx.Client, headers: dict[str, str]
) -> None:
    before = catalogue_size(client)
    r = client.post(
        "/tokenize", json={"items": [{"item_id": "sneaky", "title": "x"}]}, headers=headers
    )
    assert r.status_code == 401 and "Authorization" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/items/sneaky").status_code == 404
    assert catalogue_size(client) == before


def test_tokenize_lifecycle(client: httpx.Client, bundle: Bundle) -> None:
    before = catalogue_size(client)
    dry = client.post("/tokenize", json={"items": [NEW_ITEM], "dry_run": True}, headers=AUTH)
    assert dry.status_code == 200 and dry.json()["dry_run"]
    assert client.get("/items/new-1").status_code == 404

    r = client.post("/tokenize", json={"items": [NEW_ITEM]}, headers=AUTH)
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert item["status"] == "created" and item["codes"] == dry.json()["items"][0]["codes"]
    assert len(item["codes"]) == bundle.vocab.levels
    assert tuple(item["codes"]) not in {tuple(c) for c in bundle.catalogue.codes.tolist()}
    assert client.get("/items/new-1").json()["source"] == "tokenized"
    assert catalogue_size(client) == before + 1

    # Recommendable at once: with every bundle item excluded it is the only answer.
    only = rec(client, k=5, exclude=bundle.catalogue.item_ids)
    assert ids(only) == ["new-1"] and only.json()["items"][0]["codes"] == item["codes"]
    assert only.json()["items"][0]["new"] is True  # marked as added after training
    known = set(bundle.catalogue.item_ids)
    for it in rec(client, k=20, history=["item-1"]).json()["items"]:
        assert it["new"] == (it["item_id"] not in known)

    again = client.post("/tokenize", json={"items": [NEW_ITEM]}, headers=AUTH)
    assert again.json()["items"][0] == {**item, "status": "existing"}
    assert catalogue_size(client) == before + 1

    changed = {**NEW_ITEM, "title": "Harbour view sushi counter"}
    conflict = client.post("/tokenize", json={"items": [changed]}, headers=AUTH)
    assert conflict.status_code == 409
    assert conflict.json()["detail"][0]["loc"] == ["body", "items", 0, "item_id"]
    assert "replace" in conflict.json()["detail"][0]["msg"]

    replaced = client.post("/tokenize", json={"items": [changed], "replace": True}, headers=AUTH)
    assert replaced.status_code == 200 and replaced.json()["items"][0]["status"] == "replaced"
    new_codes = replaced.json()["items"][0]["codes"]
    assert client.get("/items/new-1").json()["codes"] == new_codes
    assert catalogue_size(client) == before + 1
    assert ids(rec(client, k=5, exclude=bundle.catalogue.item_ids)) == ["new-1"]


def test_new_item_bonus_promotes_tokenized_items(client: httpx.Client, bundle: Bundle) -> None:
    """new_item_bonus lifts items added after training inside the search: with a bonus beyond
    any log-prob gap the tokenized items come first (scored log P + bonus); 0 is the default
    of a bundle without a fitted bonus; a negative bonus is a 422 naming the field."""
    item = {"item_id": "fresh-1", "title": "Lakeside dumpling house"}
    assert client.post("/tokenize", json={"items": [item]}, headers=AUTH).status_code == 200
    history = bundle.catalogue.item_ids[:3]
    plain = rec(client, k=10, history=history)
    zero = rec(client, k=10, history=history, new_item_bonus=0.0)
    assert ids(zero) == ids(plain)
    lifted = rec(client, k=10, history=history, new_item_bonus=500.0).json()["items"]
    flags = [it["new"] for it in lifted]
    assert flags[0] and flags == sorted(flags, reverse=True)  # every new item before the rest
    assert "fresh-1" in [it["item_id"] for it in lifted]
    assert all(it["score"] > 400 for it in lifted if it["new"])
    bad = rec(client, k=10, history=history, new_item_bonus=-1)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "new_item_bonus"


def test_tokenize_a_batch_gets_unique_codes(client: httpx.Client, bundle: Bundle) -> None:
    items = [{"item_id": f"twin-{i}", "title": "Identical corner bakery"} for i in range(4)]
    r = client.post("/tokenize", json={"items": items}, headers=AUTH)
    assert r.status_code == 200, r.text
    codes = [tuple(it["codes"]) for it in r.json()["items"]]
    assert len(set(codes)) == 4  # same text, still unique identifiers
    bundle_codes = {tuple(c) for c in bundle.catalogue.codes.tolist()}
    assert not set(codes) & bundle_codes


def test_tokenize_an_item_twice_in_one_request(client: httpx.Client) -> None:
    # The same text twice is stored once, as if sent twice; two texts for one id conflict.
    twice = [{"item_id": "twice-1", "title": "Harbour fish market"}] * 2
    r = client.post("/tokenize", json={"items": twice}, headers=AUTH)
    assert r.status_code == 200, r.text
    first, second = r.json()["items"]
    assert (first["status"], second["status"]) == ("created", "existing")
    assert first["codes"] == second["codes"] == client.get("/items/twice-1").json()["codes"]
    clash = [{"item_id": "twice-2", "title": "Harbour fish market"}, {"item_id": "twice-2"}]
    r = client.post("/tokenize", json={"items": clash, "replace": True}, headers=AUTH)
    assert r.status_code == 409, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "items", 1, "item_id"]
    assert client.get("/items/twice-2").status_code == 404


def test_tokenize_extra_fields_and_bundle_item_replace(
    client: httpx.Client, bundle: Bundle
) -> None:
    target = bundle.catalogue.item_ids[7]
    item = {"item_id": target, "title": "A completely different shop", "city": "Oslo"}
    conflict = client.post("/tokenize", json={"items": [item]}, headers=AUTH)
    if conflict.status_code == 200:  # the new text happens to map to the same identifier
        assert conflict.json()["items"][0]["status"] == "existing"
        return
    assert conflict.status_code == 409 and "bundle" in conflict.json()["detail"][0]["msg"]
    r = client.post("/tokenize", json={"items": [item], "replace": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["items"][0]["status"] == "replaced"
    got = client.get(f"/items/{target}").json()
    assert got["source"] == "tokenized" and got["codes"] == r.json()["items"][0]["codes"]
    assert got["title"] == "A completely different shop"


# ---- malformed requests -----------------------------------------------------------------------
LONG = "x" * 10_001
MALFORMED = [
    ("/recommend", b'{"history": [', "json"),
    ("/recommend", {"history": "item-1"}, "history"),
    ("/recommend", {"history": [1, 2]}, "history"),
    ("/recommend", {"k": 0}, "k"),
    ("/recommend", {"k": 101}, "k"),
    ("/recommend", {"k": "10"}, "k"),
    ("/recommend", {"k": 2.5}, "k"),
    ("/recommend", {"histroy": []}, "histroy"),
    ("/recommend", {"history": ["a"] * 1001}, "history"),
    ("/recommend", {"exclude": ["a"] * 1001}, "exclude"),
    ("/recommend", {"history": [""]}, "history"),
    ("/recommend", {"history": ["bad\nid"]}, "history"),
    ("/recommend", {"history": ["x" * 300]}, "history"),
    ("/recommend", {"exclude_history": "yes"}, "exclude_history"),
    ("/recommend", [], "body"),
    ("/recommend", b"\xff\xfe{", "body"),
    ("/recommend/batch", {"requests": []}, "requests"),
    ("/recommend/batch", {"requests": [{}] * 257}, "requests"),
    ("/recommend/batch", {"requests": [{"k": -1}]}, "k"),
    ("/recommend/batch", {}, "requests"),
    ("/tokenize", {"items": []}, "items"),
    ("/tokenize", {"items": [{"title": "no id"}]}, "item_id"),
    ("/tokenize", {"items": [{"item_id": "a", "price": 3}]}, "price"),
    ("/tokenize", {"items": [{"item_id": "a"}, {"item_id": "a", "title": "b"}]}, "item_id"),
    ("/tokenize", {"items": [{"item_id": "a", "title": LONG}]}, "title"),
    ("/tokenize", {"items": [{"item_id": f"i{i}"} for i in range(257)]}, "items"),
    ("/tokenize", {"items": [{"item_id": "a"}], "dry_run": "no"}, "dry_run"),
    ("/tokenize", {"items": [{"item_id": "a"}], "replace": 1}, "replace"),
]


@pytest.mark.parametrize(("path", "body", "field"), MALFORMED)
def test_malformed_requests_are_4xx_naming_the_field(
    client: httpx.Client, path: str, body: object, field: str
) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        r = client.post(path, json=body, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text.lower(), r.text


def test_wrong_method_content_type_and_oversized_body(client: httpx.Client) -> None:
    assert client.get("/recommend").status_code == 405
    plain = client.post("/recommend", content=b"hello", headers={"Content-Type": "text/plain"})
    assert plain.status_code == 422
    huge = client.post(
        "/recommend", content=b" " * (5 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 413 and "max_body_bytes" in huge.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is checked
        yield b'{"history": ['
        for _ in range(300):
            yield json.dumps(["y" * 100] * 200).encode()[1:-1] + b","
        yield b'"z"]}'

    streamed = client.post(
        "/recommend", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413


# ---- metrics -----------------------------------------------------------------------------------
METRIC_NAMES = [  # family names (a counter's family drops `_total`)
    "letterrec_http_request_duration_seconds",
    "letterrec_queue_wait_seconds",
    "letterrec_batch_size",
    "letterrec_decode_seconds",
    "letterrec_tokenized_items",
    "letterrec_catalogue_items",
    "letterrec_trie_version",
    "letterrec_inflight_requests",
    "letterrec_redis_errors",
    "letterrec_queue_depth",
    "letterrec_ready",
    "letterrec_store_up",
]


def test_metrics_are_exposed(client: httpx.Client) -> None:
    assert rec(client, k=3).status_code == 200
    client.get("/items/unknown-for-metrics")
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        assert name in families, name
    http = families["letterrec_http_request_duration_seconds"]
    labels = [s.labels for s in http.samples if s.name.endswith("_count")]
    assert {"route": "/recommend", "method": "POST", "status": "200"} in labels
    assert {"route": "/items/{item_id:path}", "method": "GET", "status": "404"} in labels
    decode = families["letterrec_decode_seconds"]
    assert any(s.labels.get("engine") == "torch" for s in decode.samples)
    assert families["letterrec_ready"].samples[0].value == 1.0
    assert families["letterrec_catalogue_items"].samples[0].value >= 200


# ---- no input gives a 500 ------------------------------------------------------------------------
RAW_BODIES = [
    b'{"history": ["a\\ud800"]}',
    b'{"items": [{"item_id": "s1", "title": "\\udc00"}]}',
    b'{"items": [{"item_id": "s2", "extra": "x\\ud800y"}]}',
    b'{"items": [{"item_id": "s3", "\\ud800": "key"}]}',
    b'{"k": 1e999}',
    b'{"k": NaN}',
    b'{"history": null}',
    b"null",
    b'"just a string"',
    b"{" * 5000 + b"}" * 5000,
]


@pytest.mark.parametrize("path", ["/recommend", "/recommend/batch", "/tokenize"])
@pytest.mark.parametrize("raw", RAW_BODIES)
def test_odd_raw_bodies_are_4xx(client: httpx.Client, path: str, raw: bytes) -> None:
    r = client.post(path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ids_or_junk = st.lists(st.text(max_size=12) | json_values, max_size=5) | json_values
recommend_bodies = st.fixed_dictionaries(
    {},
    optional={
        "history": ids_or_junk,
        "k": st.integers(-5, 120) | json_values,
        "exclude": ids_or_junk,
        "exclude_history": st.booleans() | json_values,
    },
)
tokenize_items = st.fixed_dictionaries(
    {},
    optional={
        "item_id": st.text(max_size=12) | json_values,
        "title": st.text(max_size=30),
        "description": st.text(max_size=30) | json_values,
        "tag": st.text(max_size=5),
    },
)
tokenize_bodies = st.fixed_dictionaries(
    {"items": st.lists(tokenize_items, max_size=3) | json_values},
    optional={"dry_run": st.booleans() | json_values, "replace": st.booleans()},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=recommend_bodies | json_values)
def test_fuzzed_recommend_bodies_never_500(server: LiveServer, body: object) -> None:
    with server.client() as c:
        r = c.post("/recommend", json=body)
        assert r.status_code in (200, 422), r.text
        b = c.post("/recommend/batch", json={"requests": [body, body]})
        assert b.status_code in (200, 422), b.text


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=tokenize_bodies)
def test_fuzzed_tokenize_bodies_never_500(server: LiveServer, body: object) -> None:
    with server.client() as c:
        r = c.post("/tokenize", json=body, headers=AUTH)
        assert r.status_code in (200, 409, 422), r.text
