"""Security of the live service: keys from a mounted Secret reloaded without a restart, no
default key, a per-key write rate limit, the key checked before the body, no internals in any
error body, JSON answers when uvicorn's connection limit refuses."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.keys import KeyRing, RateLimiter, parse_keys
from tests.service.conftest import LiveServer, live_server, service_settings, wait_until

FILE_KEY = "file-key-0123456789"
OTHER_KEY = "other-key-0123456789"
ITEM = {"items": [{"item_id": "sec-1", "title": "Lantern-lit tea house"}], "dry_run": True}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("secret")
    (d / "api-key").write_text(FILE_KEY + "\n")
    return d


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, secret_dir: Path) -> Iterator[LiveServer]:
    settings = service_settings(
        tiny_bundle, api_keys="", api_keys_file=secret_dir, write_rate_per_s=0.5, write_burst=2
    )
    with live_server(settings) as srv:
        yield srv


def test_key_files_parse_and_reload_on_change(tmp_path: Path) -> None:
    assert parse_keys("# rotated 2026\n a, b \n\nc\n") == ["a", "b", "c"]
    f = tmp_path / "keys"
    f.write_text("one\n")
    ring = KeyRing(["env-key", "dev-insecure-placeholder-key"], f, check_every_s=0.0)
    assert ring.values() == [b"env-key", b"one"] and ring.placeholders == 1
    f.write_text("two\n")
    assert ring.values() == [b"env-key", b"two"]
    f.unlink()  # a revoked Secret: its keys go, the environment's stay
    assert ring.values() == [b"env-key"]


def test_the_rate_limit_is_a_token_bucket_per_key() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.take(b"k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(b"k", now=0.0) == pytest.approx(0.5)
    assert limiter.take(b"other", now=0.0) == 0.0  # its own bucket
    assert limiter.take(b"k", now=0.5) == 0.0  # one token back after 1 / rate seconds
    assert RateLimiter(0.0, 1).take(b"k") == 0.0  # off


def test_keys_come_from_the_mounted_secret_and_are_reloaded(
    server: LiveServer, secret_dir: Path
) -> None:
    with server.client() as c:
        assert c.post("/tokenize", json=ITEM, headers=bearer(FILE_KEY)).status_code == 200
        assert c.post("/tokenize", json=ITEM, headers=bearer(OTHER_KEY)).status_code == 401
        (secret_dir / "api-key").write_text(OTHER_KEY + "\n")  # rotated, no restart

        def rotated() -> bool:
            return c.post("/tokenize", json=ITEM, headers=bearer(OTHER_KEY)).status_code == 200

        assert wait_until(rotated, timeout_s=5, interval_s=0.2) < 3
        assert c.post("/tokenize", json=ITEM, headers=bearer(FILE_KEY)).status_code == 401


def test_writes_past_the_rate_limit_get_429_with_retry_after(server: LiveServer) -> None:
    with server.client() as c:
        codes = [
            c.post("/tokenize", json=ITEM, headers=bearer(OTHER_KEY)).status_code for _ in range(4)
        ]
        assert codes[-1] == 429 and codes.count(429) >= 1, codes
        r = c.post("/tokenize", json=ITEM, headers=bearer(OTHER_KEY))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "rate limit" in r.json()["detail"]


def test_the_key_is_checked_before_the_body_is_read(server: LiveServer) -> None:
    with server.client() as c:
        for body in (b"not json", b'{"items": 3}'):
            r = c.post("/tokenize", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"].startswith("Bearer")


def test_an_internal_error_answers_json_without_internals(server: LiveServer) -> None:
    state = server.app.state.letterrec
    saved = state.recommend.build

    def broken(req: object) -> object:
        raise RuntimeError("secret detail at /srv/internal/path.py line 42")

    state.recommend.build = broken
    try:
        with server.client() as c:
            r = c.post("/recommend", json={"k": 3})
    finally:
        state.recommend.build = saved
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith("internal error; it was logged as ")
    for leak in ("Traceback", "secret detail", "/srv/", ".py", "RuntimeError"):
        assert leak not in r.text


def test_without_any_key_writes_are_refused_and_a_warning_says_why(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service")
    with live_server(service_settings(tiny_bundle, api_keys="")) as srv, srv.client() as c:
        r = c.post("/tokenize", json=ITEM, headers=bearer("anything"))
        assert r.status_code == 401 and "none is configured" in r.json()["detail"]
        assert c.post("/recommend", json={"k": 2}).status_code == 200  # reads stay open
    assert any("no API key configured" in m for m in caplog.messages)


def test_uvicorns_connection_limit_answers_json_with_retry_after(tiny_bundle: Path) -> None:
    with live_server(service_settings(tiny_bundle, max_connections=2)) as srv:
        with srv.client() as first, httpx.Client(base_url=srv.url, timeout=10) as second:
            assert first.get("/healthz").status_code == 200  # keep-alive: stays open
            r = second.get("/healthz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "max_connections" in r.json()["detail"]
