"""benchmarks/load.py against a real server: rows, errors and the result files."""

from __future__ import annotations

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
    assert "| 3 | 6 |" in md and report["command"] in md


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
