"""The soak's per-minute series, its table and its plot, from hand-made request records."""

from __future__ import annotations

import json

from benchmarks import reliability


def test_series_windows_errors_percentiles_and_memory(tmp_path) -> None:
    # minute 1: 100 requests of 10..109 ms, two failed; minute 2: 50 requests of 500 ms
    results = [(0.5 * i, (10 + i) / 1000.0, i not in (3, 7)) for i in range(100)]
    results += [(60.0 + i, 0.5, True) for i in range(50)]
    rss = [(0.0, 100 * 1024), (30.0, 110 * 1024), (70.0, 120 * 1024)]
    series = reliability.soak_series(results, rss, 60.0)
    assert [r["minute"] for r in series] == [1.0, 2.0]
    first, second = series
    assert (first["requests"], first["errors"]) == (100, 2)
    assert (second["requests"], second["errors"]) == (50, 0)
    # numpy's linear percentile of 10..109 ms: p50 = 59.5, p99 = 108.01
    assert first["p50_ms"] == 59.5 and first["p99_ms"] == 108.0
    assert second["p50_ms"] == second["p99_ms"] == 500.0
    # the last memory sample inside each window
    assert (first["rss_mb"], second["rss_mb"]) == (110.0, 120.0)

    soak = {
        "minutes": 2.0,
        "requests": 150,
        "errors": 2,
        "rss_mb_start": 100.0,
        "rss_mb_end": 120.0,
        "rss_growth_pct": 20.0,
        "p99_ms_first": 108.0,
        "p99_ms_last": 500.0,
        "capacity_requests_per_s": 3.0,
        "rate_requests_per_s": 2.4,
        "tokenize_acknowledged": 120,
        "series": series,
    }
    text = reliability.markdown(
        {"command": "x", "commit": "c", "machine": {}, "created_at": "t", "soak": soak}
    )
    assert "Per minute" in text and "| 2 | 50 | 0 | 500.0 | 500.0 | 120.0 |" in text
    memory = {
        "recommend_seconds": 120.0,
        "recommend_requests": 3000,
        "recommend_errors": 0,
        "rss_mb_warm": 700.0,
        "rss_mb_after_recommend": 700.1,
        "recommend_growth_pct": 0.01,
        "dry_runs": 1000,
        "rss_mb_after_dry_runs": 725.0,
        "tokenized_items": 1000,
        "rss_mb_after_tokenize": 727.0,
        "kb_per_tokenized_item": 2.0,
    }
    text = reliability.markdown(
        {"command": "x", "commit": "c", "machine": {}, "created_at": "t", "memory": memory}
    )
    assert "leave 700.1 MB (+0.01%)" in text and "add 2.0 KB each (727.0 MB)" in text
    reliability.soak_plot(soak, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 1000


def test_series_of_nothing_is_empty() -> None:
    assert reliability.soak_series([], [], 60.0) == []


def test_a_partial_run_keeps_the_other_parts_of_the_report(tmp_path) -> None:
    earlier = tmp_path / "reliability-cpu.json"
    fuzz = {"cases": 2308, "server_errors": 0, "schema_violations": 0}
    machine = {"cpus": 2, "cpu_model": "AMD EPYC", "cpu_flags": ["avx2"]}
    old = {"commit": "aaa", "command": "x --parts fuzz,faults", "created_at": "t0"}
    earlier.write_text(json.dumps({**old, "machine": machine, "fuzz": fuzz, "faults": []}))
    now = {"commit": "bbb", "command": "x --parts soak", "created_at": "t1", "machine": machine}
    payload = reliability.keep_earlier(now, {"soak"}, earlier)
    assert payload["fuzz"] == fuzz and payload["faults"] == []
    assert "soak" not in payload  # the part run now is filled in by the run
    assert payload["parts"]["soak"]["commit"] == "bbb"
    assert payload["parts"]["fuzz"] == {**old, "machine": "2 x AMD EPYC (avx2)"}
    # a third run keeps the provenance recorded by the second
    payload["soak"] = {"minutes": 1}
    earlier.write_text(json.dumps(payload))
    third = {**now, "commit": "ccc", "command": "x --parts memory"}
    again = reliability.keep_earlier(third, {"memory"}, earlier)
    assert [again["parts"][p]["commit"] for p in ("fuzz", "soak", "memory")] == [
        "aaa",
        "bbb",
        "ccc",
    ]
    text = reliability.markdown({k: v for k, v in again.items() if k != "soak"})
    assert "| soak | x --parts soak | bbb | t1 | 2 x AMD EPYC (avx2) |" in text
    # no earlier report: only what runs now
    fresh = reliability.keep_earlier(dict(third), {"fuzz"}, tmp_path / "none.json")
    assert set(fresh["parts"]) == {"fuzz"}
