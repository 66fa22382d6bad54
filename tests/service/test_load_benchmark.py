"""benchmarks/load.py against a real server: rows, errors and the result files."""

from __future__ import annotations

import json
from pathlib import Path

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
