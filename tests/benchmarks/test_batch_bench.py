"""benchmarks/batch.py writes batch-<device>.json/md with the issue's schema (local runner only
here: the Ray runner's equality with it is tested in tests/service/test_batch.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import batch
from tests.bundlefactory import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", n_items=200, seed=0)


def test_batch_benchmark_result_schema(bundle: Path, tmp_path: Path) -> None:
    batch.main(
        ["--bundle", str(bundle), "--users", "30", "--workers", "", "--batch-size", "8",
         "--chunk-size", "16", "--k", "5", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    report = json.loads((tmp_path / "batch-cpu.json").read_text())
    assert {"command", "commit", "machine", "created_at", "model_profile"} <= set(report)
    assert report["identical_to_local"] is None  # no Ray run to compare
    (row,) = report["rows"]
    assert {k: row[k] for k in ("runner", "workers", "users")} == {
        "runner": "local",
        "workers": 1,
        "users": 30,
    }
    assert row["users_per_s"] == pytest.approx(30 / row["seconds"], rel=0.01)
    assert "| local | 1 | 1 | 30 |" in (tmp_path / "batch-cpu.md").read_text()
