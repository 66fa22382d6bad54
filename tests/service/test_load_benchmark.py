"""benchmarks/load.py against a real server: rows, errors and the result files."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest

from benchmarks import load
from tests.service.conftest import live_server, service_settings


def test_load_generator_measures_a_live_server(tiny_bundle: Path, tmp_path: Path) -> None:
    with live_server(service_settings(tiny_bundle)) as server:
        load.main(
            [
                "--bundle", str(tiny_bundle),
                "--url", server.url,
                "--concurrency", "1", "3",
                "--requests", "6",
                "--duration", "30",
                "--warmup", "2",
                "--out", str(tmp_path),
                "--device", "test",
            ]
        )  # fmt: skip
    report = json.loads((tmp_path / "load-test.json").read_text())
    assert [r["concurrency"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["requests"] == 6 and row["errors"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert report["server"]["engine"] == "torch"
    assert report["commit"] and report["machine"]["cpus"]
    assert report["target_met"] is None  # no concurrency-32 level was run
    md = (tmp_path / "load-test.md").read_text()
    assert "| closed | 3 |  | 6 |" in md and report["command"] in md
    assert not (tmp_path / "load-test.png").exists()  # the plot is of open-loop levels


def test_open_loop_levels_against_a_live_server(tiny_bundle: Path, tmp_path: Path) -> None:
    with live_server(service_settings(tiny_bundle)) as server:
        load.main(
            [
                "--bundle", str(tiny_bundle),
                "--url", server.url,
                "--concurrency",
                "--rates", "40", "80",
                "--rate-concurrency", "4",
                "--duration", "1.5",
                "--warmup", "2",
                "--out", str(tmp_path),
                "--device", "test",
            ]
        )  # fmt: skip
        served = _recommend_count(server.url)
    report = json.loads((tmp_path / "load-test.json").read_text())
    rows = report["rows"]
    assert [(r["mode"], r["offered_rate"], r["concurrency"]) for r in rows] == [
        ("open", 40.0, 4),
        ("open", 80.0, 4),
    ]
    for row in rows:
        assert row["errors"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        # Poisson arrivals over 1.5 s: about 60 and 120 requests, never a handful or thousands.
        assert 0.4 * 1.5 * row["offered_rate"] < row["requests"] < 2 * 1.5 * row["offered_rate"]
    assert served == 2 + sum(r["requests"] for r in rows)  # warm-up + every scheduled request
    assert report["target_met"] is None  # no open-loop level with 32 connections
    assert (tmp_path / "load-test.png").stat().st_size > 0
    assert "| open | 4 | 40.0 |" in (tmp_path / "load-test.md").read_text()


def test_open_loop_latency_counts_from_the_scheduled_arrival() -> None:
    # A server that takes 50 ms per request, one connection, 100 arrivals/s: requests queue up
    # behind each other, and the latency users see grows far past the 50 ms of service time.
    # Measured from the send (coordinated omission) it would stay near 50 ms.
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def run() -> load.Row:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await load.run_open_level(client, 1, 100.0, [{"history": []}], 40, 10.0, 0)

    row = asyncio.run(run())
    assert row.requests == 40 and row.errors == 0
    assert row.p50_ms >= 50 and row.p99_ms > 600  # the 40th waits behind ~39 x 50 ms
    assert row.requests_per_s < 25  # served at the server's pace, not the offered 100/s


def test_targets_read_each_mode_separately() -> None:
    def row(mode: str, rps: float, p99: float) -> load.Row:
        return load.Row(32, 100, rps, p99 / 2, p99, 0, mode, 110.0 if mode == "open" else None)

    rows = [row("closed", 140.0, 500.0), row("open", 105.0, 80.0)]
    assert load.target_met(rows, "open") is True
    assert load.target_met(rows, "closed") is False  # under 150 requests/s
    assert load.target_met([row("closed", 160.0, 400.0)], "closed") is True  # no p99 objective
    assert load.target_met([row("open", 95.0, 80.0)], "open") is False  # too few served
    assert load.target_met([row("open", 105.0, 120.0)], "open") is False  # p99 too high
    assert load.target_met([row("closed", 400.0, 90.0)], "open") is None


def test_load_generator_counts_refused_requests_as_errors(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    # /recommend requires a key here and the generator sends none: every request is an error.
    settings = service_settings(tiny_bundle, require_key_for_recommend=True)
    with live_server(settings) as server:
        load.main(
            [
                "--bundle", str(tiny_bundle),
                "--url", server.url,
                "--concurrency", "2",
                "--requests", "4",
                "--warmup", "1",
                "--out", str(tmp_path),
                "--device", "test",
                "--api-key", "",
            ]
        )  # fmt: skip
    row = json.loads((tmp_path / "load-test.json").read_text())["rows"][0]
    assert row["errors"] == 4 and row["requests_per_s"] == 0.0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (scripts/bootstrap.sh)")
def test_wrk_client_measures_a_live_server_and_counts_refusals(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with live_server(service_settings(tiny_bundle)) as server:
        args = ["--bundle", str(tiny_bundle), "--url", server.url, "--client", "wrk",
                "--concurrency", "2", "--duration", "2", "--warmup", "2",
                "--out", str(tmp_path), "--device", "test"]  # fmt: skip
        load.main(args)
        row = json.loads((tmp_path / "load-test.json").read_text())["rows"][0]
        assert row["requests"] > 2 and row["errors"] == 0 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        served = _recommend_count(server.url)
        # The server saw every request wrk counted, the 2 warm-up requests, and at most one
        # request per connection still in flight when wrk stopped counting.
        assert row["requests"] + 2 <= served <= row["requests"] + 2 + 2
    settings = service_settings(tiny_bundle, require_key_for_recommend=True)
    with live_server(settings) as server:
        load.main([*args[:2], "--url", server.url, *args[4:], "--api-key", ""])
    row = json.loads((tmp_path / "load-test.json").read_text())["rows"][0]
    assert row["errors"] == row["requests"] > 0 and row["requests_per_s"] == 0.0


def _recommend_count(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("letterrec_http_request_duration_seconds_count") and (
            'route="/recommend"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_settle_waits_until_the_server_has_drained_the_last_level() -> None:
    polls = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        polls.append(scope["path"])
        busy = 5 if len(polls) < 4 else 1  # the /metrics request itself is in flight
        body = f"# TYPE letterrec_inflight_requests gauge\nletterrec_inflight_requests {busy}.0\n"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    async def run() -> float:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await load.settle(client)

    waited = asyncio.run(run())
    assert polls == ["/metrics"] * 4 and waited >= 0.3
