"""The new-item report reads `report/coldstart.json` and states the issue's verdicts."""

from __future__ import annotations

import json
import sys

from benchmarks import coldstart


def _row(model: str, r: float, r_cold: float, se_cold: float) -> dict:
    return {
        "model": model,
        "recall@10": r,
        "se_recall@10": 0.01,
        "ndcg@10": r / 2,
        "se_ndcg@10": 0.005,
        "recall@10_cold": r_cold,
        "se_recall@10_cold": se_cold,
        "ndcg@10_cold": r_cold / 2,
        "se_ndcg@10_cold": se_cold / 2,
        "recall@10_warm": r,
        "cold_share@10": 0.1,
        "cold_targets": 50,
    }


def test_report_files_and_verdicts(tmp_path, monkeypatch) -> None:
    rows = [
        _row("LETTER", 0.19, 0.30, 0.05),
        _row("SASRec", 0.18, 0.0, 0.0),
        _row("Content", 0.05, 0.10, 0.04),
        _row("LETTER (full catalogue)", 0.20, 0.25, 0.05),
    ]
    fit = {
        "new_item_bonus": 2.0,
        "users": 900,
        "cold_targets": 40,
        "gain_ndcg@10": 0.01,
        "se_gain_ndcg@10": 0.004,
        "grid": [{"bonus": 0.0, "ndcg@10": 0.1, "recall@10": 0.2, "recall@10_cold": 0.1}],
    }
    report = {
        "share": 0.05,
        "cold_items": 84,
        "items": 1682,
        "test_users": 943,
        "rule": "newest",
        "rows": rows,
        "new_item_bonus": fit,
        "new_item_slots": {
            "new_item_slots": {"slots": 1, "margin": 4.0},
            "median_gap": 21.5,
            "cost": 0.02,
            "users": 900,
            "cold_targets": 40,
            "gain_ndcg@10": -0.001,
            "se_gain_ndcg@10": 0.0005,
            "gain_recall@10_cold": 0.05,
            "grid": [{"slots": 0, "margin": 0.0, "ndcg@10": 0.1, "recall@10": 0.2}],
        },
        "train_seconds": 10.0,
        "eval_seconds": 2.0,
        "config": {"lm": {}},
    }
    (tmp_path / "b" / "report").mkdir(parents=True)
    (tmp_path / "b" / "report" / "coldstart.json").write_text(json.dumps(report))
    argv = ["coldstart", "--bundle", str(tmp_path / "b"), "--name", "x"]
    monkeypatch.setattr(sys, "argv", [*argv, "--results", str(tmp_path / "out")])
    coldstart.main()
    out = json.loads((tmp_path / "out" / "coldstart-x.json").read_text())
    assert [r["model"] for r in out["rows"]][:3] == ["LETTER", "SASRec", "Content"]
    v = "\n".join(out["verdicts"])
    assert "R@10 +0.2000" in v  # LETTER - Content on cold targets
    assert "6.0 standard errors above 0" in v
    assert "0.950" in v  # 0.19 / 0.20
    md = (tmp_path / "out" / "coldstart-x.md").read_text()
    assert "Chosen: **1 slot(s), margin 4.0**" in md and "gain +0.0500" in md
    assert "a median 21.5 log-probability units below" in md
    assert "Chosen: **2.0**" in md and (tmp_path / "out" / "coldstart-x.png").exists()
