"""New-item report: `benchmarks/results/coldstart-<name>.{json,md,png}` from a bundle's
`report/coldstart.json` (written by `letterrec evaluate --cold-items SHARE`).

    python -m benchmarks.coldstart --bundle runs/yelp --name yelp

Rows (names scripts read): LETTER (the cold-start model as served: the new-item bonus and
slots fitted on validation), LETTER (no new-item prior: neither), SASRec (0 on cold targets by construction: it has no
embedding for an item it never saw), Content (text similarity to the recent items), Popularity,
and LETTER (full catalogue) when the bundle also holds a model trained on every item. Each with
recall@10 / ndcg@10 on all test users and recall@10_cold / ndcg@10_cold on the users whose
target is a cold item, with bootstrap standard errors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, header, md_header, md_table, rows_figure, write_result

COLUMNS = [
    "model",
    "recall@10",
    "se_recall@10",
    "ndcg@10",
    "se_ndcg@10",
    "recall@10_cold",
    "se_recall@10_cold",
    "ndcg@10_cold",
    "se_ndcg@10_cold",
    "recall@10_warm",
    "cold_share@10",
]


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets read off the rows: cold recall against the content baseline and
    zero, overall recall against the model trained on everything."""
    by = {r["model"]: r for r in rows}
    out = []
    letter, content = by.get("LETTER"), by.get("Content")
    if letter and content:
        d = letter["recall@10_cold"] - content["recall@10_cold"]
        se = (letter["se_recall@10_cold"] ** 2 + content["se_recall@10_cold"] ** 2) ** 0.5
        out.append(
            f"LETTER - Content on cold targets: R@10 {d:+.4f} (se {se:.4f}, unpaired: an upper "
            "bound on the paired one)"
        )
    if letter:
        z = letter["recall@10_cold"] / max(letter["se_recall@10_cold"], 1e-12)
        out.append(
            f"LETTER on cold targets: R@10 {letter['recall@10_cold']:.4f}, {z:.1f} standard "
            "errors above 0"
        )
    full = by.get("LETTER (full catalogue)")
    if letter and full and full["recall@10"] > 0:
        ratio = letter["recall@10"] / full["recall@10"]
        out.append(
            f"overall R@10 of the cold-start model / the model trained on everything: {ratio:.3f}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--name", required=True, help="dataset name for the result file")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--notes", default="", help="markdown appended under Notes")
    args = ap.parse_args()
    src = args.bundle / "report" / "coldstart.json"
    if not src.exists():
        raise SystemExit(f"{src} not found: run `letterrec evaluate --cold-items 0.05` first")
    report = json.loads(src.read_text())
    rows = report["rows"]
    fit = report.get("new_item_bonus", {})
    head = header()
    payload = {**head, **{k: v for k, v in report.items() if k != "config"}}
    payload["config"] = report.get("config", {})
    payload["verdicts"] = verdicts(rows)
    md = md_header(f"New items on {args.name} (leave-one-out test, cold-start protocol)", head)
    md += (
        f"{report['cold_items']} of {report['items']} items ({report['share']:.0%}) are cold: "
        f"{report['rule']}. They are kept out of every training stage, tokenized from text as "
        "POST /tokenize does and served as rows after the bundle's. "
        f"{report['test_users']} test users, "
        f"{rows[0]['cold_targets']} of them with a cold target. Standard errors (se_) by "
        "bootstrap over users; SASRec cannot score an item it never saw (0 on cold targets by "
        "construction).\n\n"
    )
    md += md_table(rows, COLUMNS)
    if fit:
        md += (
            f"\n## New-item bonus (fitted on {fit['users']} validation users, "
            f"{fit['cold_targets']} cold targets)\n\n"
            f"Chosen: **{fit['new_item_bonus']}** (log-probability units); validation NDCG@10 "
            f"gain over no bonus {fit['gain_ndcg@10']:+.4f} (paired se "
            f"{fit['se_gain_ndcg@10']:.4f}).\n\n"
        )
        md += md_table(fit["grid"], ["bonus", "ndcg@10", "recall@10", "recall@10_cold"])
    slots = report.get("new_item_slots")
    if slots:
        chosen = slots["new_item_slots"]
        md += (
            f"\n## New-item slots (fitted on the same {slots['users']} validation users)\n\n"
            f"Chosen: **{chosen['slots']} slot(s), margin {chosen['margin']}**: the setting that "
            "finds the most cold validation targets among those costing at most "
            f"{slots['cost']:.0%} of validation NDCG@10 (row 1: no slots). Cold-target R@10 gain "
            f"{slots['gain_recall@10_cold']:+.4f}; NDCG@10 gain {slots['gain_ndcg@10']:+.4f} "
            f"(paired se {slots['se_gain_ndcg@10']:.4f})."
        )
        if slots.get("median_gap") is not None:
            md += (
                " The best new item scores a median "
                f"{slots['median_gap']:.1f} log-probability units below the main list's last "
                "item: the margin a slot needs."
            )
        md += "\n\n"
        md += md_table(slots["grid"], ["slots", "margin", "ndcg@10", "recall@10", "recall@10_cold"])
    md += "\n## Verdicts\n\n" + "".join(f"- {v}\n" for v in payload["verdicts"])
    md += (
        f"\nTraining of the cold-start stages {report['train_seconds']:.0f} s (0 when resumed); "
        f"evaluation of the test users {report['eval_seconds']:.0f} s.\n"
    )
    if args.notes:
        md += "\n## Notes\n\n" + args.notes + "\n"
    out = write_result(f"coldstart-{args.name}", payload, md, args.results)
    plot(rows, fit.get("grid", []), out.with_suffix(".png"))
    print(out)


def plot(rows: list[dict[str, Any]], grid: list[dict[str, float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = rows_figure(rows, ("recall@10", "recall@10_cold"))
    if grid:
        xs = [g["bonus"] for g in grid]
        axes[1].plot(xs, [g["ndcg@10"] for g in grid], marker=".", label="NDCG@10 (all)")
        axes[1].plot(xs, [g["recall@10_cold"] for g in grid], marker=".", label="R@10 (cold)")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("new-item bonus (validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
