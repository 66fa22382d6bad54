"""The quality report: rows, the tau chosen on validation (never on test), files and plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.quality import report
from training.config import get_profile

METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def _variant(valid_ndcg: float, test_ndcg: float) -> dict:
    test = dict.fromkeys(METRICS, test_ndcg) | {"eval_seconds": 10.0, "coverage@10": 0.5}
    history = [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 2.5, "valid_ndcg@10": valid_ndcg}]
    lm = {"valid": {"ndcg@10": valid_ndcg}, "epochs": 2, "train_seconds": 60.0}
    stages = {"embed": 60.0, "cf": 120.0, "tokenizer": 300.0, "lm": 60.0, "evaluate": 60.0}
    return {"lm": lm | {"history": history}, "eval": {"letterrec": test}, "stage_seconds": stages}


@pytest.mark.parametrize("name", ["unit", "quality-unit"])
def test_report_tunes_tau_on_validation_and_writes_files(tmp_path: Path, name: str) -> None:
    # a name given with the files' prefix is not prefixed twice
    args = argparse.Namespace(device="cpu", name=name, results=tmp_path)
    results = {
        "TIGER": _variant(0.01, 0.011),
        "LETTER tau=1": _variant(0.02, 0.030),  # best on test, not on validation
        "LETTER tau=0.7": _variant(0.03, 0.025),
    }
    pop = dict.fromkeys(METRICS, 0.001)
    sas = {"test": dict.fromkeys(METRICS, 0.02)}
    partial = {
        "+CF": {
            "epochs": 9,
            "best_valid": {"recall@10": 0.0115, "ndcg@10": 0.0067},
            "history": [{"epoch": 2, "loss": 3.0, "valid_ndcg@10": 0.0067}],
        }
    }
    recent = dict.fromkeys(METRICS, 0.05) | {
        "repeat_targets": 0.065,
        "history_share@10": 0.9,
        "recall@10_repeat": 0.8,
        "recall@10_new": 0.01,
    }
    report(args, get_profile("quick"), {"name": "Yelp"}, pop, sas, results, partial, recent)

    payload = json.loads((tmp_path / "quality-unit.json").read_text())
    models = [r["model"] for r in payload["rows"]]
    assert models[:4] == ["Popularity", "Recent history", "SASRec", "TIGER"]
    tuned = payload["rows"][-1]
    assert tuned["model"] == "LETTER (tau tuned on validation: 0.7)"
    assert tuned["ndcg@10"] == 0.025
    assert payload["rows"][3]["pipeline_minutes"] == 10.0
    assert payload["paper"]["LETTER-TIGER"]["recall@10"] == 0.0364
    md = (tmp_path / "quality-unit.md").read_text()
    assert "LETTER (tau tuned on validation: 0.7)" in md and "LETTER Table 1" in md
    assert "6.5% of the test targets" in md
    assert "| Recent history | 0.9000 | 0.8000 | 0.0100 |" in md
    assert "| +CF | 9 | 0.0115 | 0.0067 |" in md and "best valid ndcg@10" in md
    assert "+CF" not in models and payload["unfinished"]["+CF"]["epochs"] == 9
    assert (tmp_path / "quality-unit.png").stat().st_size > 10_000
