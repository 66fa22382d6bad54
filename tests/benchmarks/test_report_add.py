"""`benchmarks.report --add`: a bundle's row joins an existing report only on the same split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import report

POP = {"recall@10": 0.05, "ndcg@10": 0.02, "recall@5": 0.03, "ndcg@5": 0.015}
RECENT = {"recall@10": 0.0, "ndcg@10": 0.0, "recall@5": 0.0, "ndcg@5": 0.0}


def _metrics(r10: float) -> dict:
    return {
        "recall@5": r10 / 2,
        "recall@10": r10,
        "ndcg@5": r10 / 4,
        "ndcg@10": r10 / 3,
        "se_recall@10": 0.01,
        "se_ndcg@10": 0.005,
        "coverage@10": 0.3,
        "eval_seconds": 2.0,
    }


def _existing(results: Path) -> dict:
    payload = {
        "command": "benchmarks/report.py --bundle runs/ml --name toy --notes '- first note'",
        "commit": "a" * 40,
        "machine": {"cpus": 2, "cpu_model": "x"},
        "created_at": "2026-12-01T00:00:00+00:00",
        "dataset": {"name": "toy", "fingerprint": "f1", "users": 100},
        "rows": [
            {"model": "Popularity", **POP},
            {"model": "Recent history", **RECENT},
            {"model": "SASRec", **_metrics(0.08)},
            {"model": "LETTER", **_metrics(0.10)},
        ],
        "comparisons": [],
        "recommend": {},
        "train_seconds": 10.0,
        "eval_seconds": 2.0,
        "config": {"max_history": 20},
        "histories": {"LETTER": [{"epoch": 1, "valid_ndcg@10": 0.03}]},
        "paper": None,
    }
    results.mkdir(parents=True)
    (results / "quality-toy.json").write_text(json.dumps(payload))
    return payload


def _bundle(root: Path, fingerprint: str = "f1", pop_recall: float = 0.05) -> Path:
    (root / "stages").mkdir(parents=True)
    (root / "report").mkdir()
    (root / "stages" / "data.json").write_text(
        json.dumps({"name": "toy", "fingerprint": fingerprint})
    )
    (root / "manifest.json").write_text(json.dumps({"config": {"max_history": 20}}))
    (root / "stages" / "lm.json").write_text(
        json.dumps({"valid": {"recall@10": 0.07, "ndcg@10": 0.03}, "history": []})
    )
    (root / "stages" / "sasrec.json").write_text(json.dumps({"valid": {}}))
    ev = {
        "popularity": {**POP, "recall@10": pop_recall},
        "recent": RECENT,
        "letterrec": _metrics(0.06),
    }
    (root / "report" / "eval.json").write_text(json.dumps(ev))
    return root


def _main(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["report", *args])
    report.main()


def test_add_puts_the_bundle_row_beside_the_report_rows(tmp_path, monkeypatch) -> None:
    results = tmp_path / "results"
    before = _existing(results)
    llm = _bundle(tmp_path / "llm")
    _main(monkeypatch, "--name", "toy", "--results", str(results), "--add", f"LETTER-LC-Rec={llm}")
    after = json.loads((results / "quality-toy.json").read_text())
    assert [r["model"] for r in after["rows"]] == [
        *(r["model"] for r in before["rows"]),
        "LETTER-LC-Rec",
    ]
    added = after["rows"][-1]
    assert added["recall@10"] == 0.06 and added["valid_recall@10"] == 0.07
    assert added["bundle"] == str(llm) and len(added["commit"]) >= 7
    assert after["commit"] == before["commit"]  # the report's own rows keep their provenance
    assert after["additions"][0]["command"].endswith(f"LETTER-LC-Rec={llm}")
    md = (results / "quality-toy.md").read_text()
    assert "| LETTER-LC-Rec | 0.0300 | 0.0600 |" in md
    assert "- first note" in md  # the notes of the recorded command survive the re-render
    assert (results / "quality-toy.png").exists()
    # adding the same label again replaces its row
    _main(monkeypatch, "--name", "toy", "--results", str(results), "--add", f"LETTER-LC-Rec={llm}")
    rows = json.loads((results / "quality-toy.json").read_text())["rows"]
    assert [r["model"] for r in rows].count("LETTER-LC-Rec") == 1


@pytest.mark.parametrize(
    ("fingerprint", "pop_recall", "says"),
    [("f2", 0.05, "is not the report's"), ("f1", 0.051, "not the same split")],
)
def test_add_refuses_another_dataset_or_split(
    tmp_path, monkeypatch, capsys, fingerprint, pop_recall, says
) -> None:
    results = tmp_path / "results"
    _existing(results)
    other = _bundle(tmp_path / "other", fingerprint, pop_recall)
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, "--name", "toy", "--results", str(results), "--add", f"X={other}")
    assert e.value.code == 2 and says in capsys.readouterr().err
    rows = json.loads((results / "quality-toy.json").read_text())["rows"]
    assert "X" not in [r["model"] for r in rows]  # the report is left as it was
