"""Back-pressure, timeouts and the optional key on /recommend, on a deliberately tight app."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import AUTH, LiveServer, live_server, service_settings


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[LiveServer]:
    settings = service_settings(
        tiny_bundle,
        queue_size=4,
        max_batch_size=2,
        max_wait_ms=20.0,
        require_key_for_recommend=True,
    )
    with live_server(settings) as srv:
        yield srv


def test_recommend_needs_a_key_when_configured(server: LiveServer) -> None:
    with server.client() as c:
        assert c.post("/recommend", json={"k": 3}).status_code == 401
        wrong = c.post("/recommend", json={"k": 3}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert c.post("/recommend/batch", json={"requests": [{}]}).status_code == 401
        assert c.post("/recommend", json={"k": 3}, headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200  # operations stay open


def test_a_batch_larger_than_the_queue_gets_503_with_retry_after(server: LiveServer) -> None:
    with server.client() as c:
        r = c.post("/recommend/batch", json={"requests": [{"k": 2}] * 5}, headers=AUTH)
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert "queue is full" in r.json()["detail"]
        ok = c.post("/recommend/batch", json={"requests": [{"k": 2}] * 4}, headers=AUTH)
        assert ok.status_code == 200 and len(ok.json()["responses"]) == 4


def test_a_burst_beyond_the_queue_is_shed_not_failed(server: LiveServer) -> None:
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
            return await asyncio.gather(
                *(c.post("/recommend", json={"k": 5}, headers=AUTH) for _ in range(120))
            )

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1
    with server.client() as c:
        text = c.get("/metrics").text
    assert 'status="503"' in text


def test_a_request_past_its_timeout_gets_504(server: LiveServer) -> None:
    state = server.app.state.letterrec
    saved = state.recommend.timeout_s
    state.recommend.timeout_s = 1e-6
    try:
        with server.client() as c:
            r = c.post("/recommend", json={"k": 3}, headers=AUTH)
        assert r.status_code == 504 and "request_timeout_s" in r.json()["detail"]
    finally:
        state.recommend.timeout_s = saved
    with server.client() as c:
        assert c.post("/recommend", json={"k": 3}, headers=AUTH).status_code == 200


def test_startup_objects_are_frozen_out_of_the_collector_until_shutdown(tiny_bundle: Path) -> None:
    """A full collection over the loaded model and catalogue took ~250 ms on 2 cores, stalling
    every in-flight request; the lifespan freezes them after warm-up and unfreezes at exit."""
    import gc

    gc.unfreeze()
    with live_server(service_settings(tiny_bundle)) as srv:
        frozen = gc.get_freeze_count()
        with srv.client() as c:
            assert c.post("/recommend", json={"history": [], "k": 3}).status_code == 200
    assert frozen > 10_000, frozen
    assert gc.get_freeze_count() == 0
