"""One quality report per dataset from finished pipeline bundles (`letterrec pipeline`):
every row of the same split, validation and test, bootstrap standard errors, the paper's numbers
beside ours, the command and config -> benchmarks/results/quality-<name>.{json,md,png}.

    python -m benchmarks.report --name yelp --bundle runs/yelp-d05 \\
        --variant "LETTER (distill 0.8)=runs/yelp-d08"

The first `--bundle` is the reported recipe: its report/eval.json gives the rows `Popularity`,
`Recent history`, `SASRec`, `LETTER` (plain beam search, the paper's protocol) and `LETTER
repeat-aware` (and `LETTER history excluded` when that is its chosen mode). Each `--variant
LABEL=DIR` adds that bundle's plain LETTER row under LABEL (ablations such as `TIGER`, `+CF`,
`+diversity`, or recipes compared on validation). Validation figures: the recommender's from its
training (a fixed subset of validation users) and its mode fit (stages/mode.json); SASRec's
from its training; popularity and recent history computed here on the full validation split.

    python -m benchmarks.report --name ml-100k --add "LETTER-LC-Rec=runs/ml-llm"

adds a bundle's plain LETTER row to the existing report without its first bundle, after checking
that the bundle is on the same split (dataset fingerprint, history length, and the split-only
rows Popularity and Recent history equal); the row records its bundle and commit.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, header, md_header, md_table, rows_figure, write_result
from benchmarks.quality import PAPER_YELP
from training.config import PipelineConfig, _from_dict
from training.data import leave_one_out, load_dataset
from training.evaluate import evaluate_popularity, evaluate_recent

METRICS = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
ROWS = {
    "popularity": "Popularity",
    "recent": "Recent history",
    "sasrec": "SASRec",
    "letterrec": "LETTER",
    "letterrec_repeat": "LETTER repeat-aware",
    "letterrec_exclude_history": "LETTER history excluded",
}
"""eval.json key -> report row name (scripts read these names)."""


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def rows_of(bundle: Path, valid: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    ev = _json(bundle / "report" / "eval.json")
    mode = (
        _json(bundle / "stages" / "mode.json") if (bundle / "stages" / "mode.json").exists() else {}
    )
    fit = mode.get("validation", {})
    lm = _json(bundle / "stages" / "lm.json")
    sas = _json(bundle / "stages" / "sasrec.json")
    valid_of = {
        "popularity": valid["popularity"],
        "recent": valid["recent"],
        "sasrec": sas["valid"],
        "letterrec": fit.get("plain", lm["valid"]),
        "letterrec_repeat": fit.get("repeat", {}),
        "letterrec_exclude_history": fit.get("exclude_history", {}),
    }
    out = []
    for key, name in ROWS.items():
        if key not in ev:
            continue
        row = {"model": name, **ev[key]}
        row.update({f"valid_{m}": valid_of[key].get(m) for m in ("recall@10", "ndcg@10")})
        out.append(row)
    return out


def differences(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """a - b on R@10 and N@10 with the standard error of the difference (independent errors,
    a conservative bound for these paired samples) and whether it exceeds two of them."""
    ra = next((r for r in rows if r["model"] == a), None)
    rb = next((r for r in rows if r["model"] == b), None)
    if ra is None or rb is None:
        return None
    out: dict[str, Any] = {"comparison": f"{a} - {b}"}
    for m in ("recall@10", "ndcg@10"):
        se = math.hypot(ra.get(f"se_{m}", 0.0), rb.get(f"se_{m}", 0.0))
        d = ra[m] - rb[m]
        out[m] = d
        out[f"se_{m}"] = se
        out[f"{m}_verdict"] = "higher" if d > 2 * se else "lower" if d < -2 * se else "within noise"
    return out


COMPARISONS = [
    ("LETTER", "SASRec"),
    ("LETTER repeat-aware", "SASRec"),
    ("LETTER repeat-aware", "Recent history"),
    ("LETTER history excluded", "SASRec"),
]


def comparisons_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for a, b in COMPARISONS if (c := differences(rows, a, b)) is not None]


SPLIT_ROWS = ("Popularity", "Recent history")
"""Rows that depend on the split alone: equal in two reports only if their splits are."""


def add_variants(payload: dict[str, Any], variants: list[str], commit: str) -> dict[str, Any]:
    """`payload` (an existing report) with each LABEL=DIR bundle's plain LETTER row added (or
    replaced) under LABEL, without the report's own bundle: the variant's dataset must be the
    report's (same fingerprint and history length) and its split rows must equal the report's,
    so the new row is on the same test users. Each added row records its bundle and `commit`."""
    rows = list(payload["rows"])
    for spec in variants:
        label, _, path = spec.partition("=")
        bundle = Path(path)
        data = _json(bundle / "stages" / "data.json")
        if data.get("fingerprint") != payload["dataset"].get("fingerprint"):
            raise ValueError(
                f"{bundle}: dataset {data.get('name')} ({data.get('fingerprint')}) is not the "
                f"report's {payload['dataset'].get('name')} ({payload['dataset'].get('fingerprint')})"
            )
        history = _json(bundle / "manifest.json")["config"].get("max_history")
        if history != payload["config"].get("max_history"):
            raise ValueError(
                f"{bundle}: max_history {history} differs from the report's "
                f"{payload['config'].get('max_history')}: not the same split"
            )
        vrows = rows_of(bundle, {"popularity": {}, "recent": {}})
        for name in SPLIT_ROWS:
            mine = next((r for r in vrows if r["model"] == name), None)
            theirs = next((r for r in rows if r["model"] == name), None)
            if mine and theirs and any(mine[m] != theirs[m] for m in ("recall@10", "ndcg@10")):
                raise ValueError(
                    f"{bundle}: its {name} row differs from the report's: not the same split"
                )
        plain = next(r for r in vrows if r["model"] == "LETTER")
        row = {**plain, "model": label, "bundle": str(bundle), "commit": commit}
        rows = [r for r in rows if r["model"] != label] + [row]
    return {**payload, "rows": rows, "comparisons": comparisons_of(rows)}


def notes_of(command: str) -> str:
    """The --notes of a report's recorded command (reports written before notes were kept)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return ""
    return words[words.index("--notes") + 1] if "--notes" in words[:-1] else ""


def render(payload: dict[str, Any]) -> str:
    """The report's markdown."""
    rows, comparisons = payload["rows"], payload["comparisons"]
    data = payload["dataset"]
    test_users = payload.get("test_users", data.get("users", 0))
    md = md_header(
        f"Recommendation quality on {data['name']} (leave-one-out test, full ranking)", payload
    )
    md += (
        f"{test_users:,} test users. Standard errors (se_) by bootstrap over users (1,000 "
        "resamples); a difference smaller than about two of them is noise. Validation: "
        "valid_ columns (the recommender's on its mode-fit subset of validation users).\n\n"
    )
    for a in payload.get("additions", []):
        command = a["command"].replace(shlex.quote(notes_of(a["command"])), "'(see Notes)'")
        md += f"- rows added by: `{command}` (commit `{a['commit']}`, {a['created_at']})\n"
    if payload.get("additions"):
        md += "\n"
    added = [r for r in rows if "commit" in r]
    if added:
        md += (
            "Added later from bundles of their own on the same split (its Popularity and Recent "
            "history rows equal these): "
            + "; ".join(
                f"{r['model']} (`{r['bundle']}`, commit `{r['commit'][:12]}`)" for r in added
            )
            + ".\n\n"
        )
    md += md_table(
        rows,
        [
            "model",
            *METRICS,
            "se_recall@10",
            "se_ndcg@10",
            "valid_recall@10",
            "valid_ndcg@10",
            "coverage@10",
        ],
    )
    md += "\n## Differences (test)\n\n" + md_table(
        comparisons,
        [
            "comparison",
            "recall@10",
            "se_recall@10",
            "recall@10_verdict",
            "ndcg@10",
            "se_ndcg@10",
            "ndcg@10_verdict",
        ],
    )
    rec = payload["recommend"]
    if rec:
        md += (
            f"\nServed default chosen on {rec['validation']['users']:,} validation users: "
            f"**{rec['mode']}**; repeat prior {rec['repeat_prior']}.\n"
        )
    with_repeats = [r for r in rows if "recall@10_repeat" in r]
    if with_repeats:
        md += (
            f"\n## Repeats\n\n{with_repeats[0]['repeat_targets']:.1%} of the test targets are an "
            "item of the user's last 20. history_share@10: share of recommended items taken from "
            "the history; recall on repeat and on new targets.\n\n"
        ) + md_table(
            with_repeats, ["model", "history_share@10", "recall@10_repeat", "recall@10_new"]
        )
    if payload["paper"]:
        md += "\nThe paper's numbers on the same data (LETTER Table 1):\n\n" + md_table(
            [{"model": k, **v} for k, v in payload["paper"].items()], ["model", *METRICS]
        )
    md += (
        f"\nRecommender training {payload['train_seconds']:.0f} s; evaluation of the test users "
        f"{payload['eval_seconds']:.0f} s.\n"
    )
    if payload.get("notes"):
        md += "\n## Notes\n\n" + payload["notes"] + "\n"
    return md


def write(payload: dict[str, Any], name: str, results: Path) -> Path:
    out = write_result(f"quality-{name}", payload, render(payload), results)
    plot(payload["rows"], payload["histories"]["LETTER"], out.with_suffix(".png"))
    print(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path, help="the reported recipe's bundle")
    ap.add_argument("--variant", action="append", default=[], help="LABEL=DIR, repeatable")
    ap.add_argument(
        "--add",
        action="append",
        default=[],
        help="LABEL=DIR, repeatable: add that bundle's plain LETTER row to the existing report "
        "quality-NAME.json (same dataset and split, checked) without its --bundle",
    )
    ap.add_argument("--name", required=True, help="files quality-NAME.*")
    ap.add_argument("--notes", default="", help="markdown appended to the report")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.add:
        if args.bundle or args.variant:
            ap.error("--add extends an existing report: give it without --bundle and --variant")
        existing = args.results / f"quality-{args.name}.json"
        if not existing.exists():
            ap.error(f"--add: no report {existing} to add to")
        payload = _json(existing)
        payload.setdefault("notes", notes_of(payload.get("command", "")))
        now = header()
        try:
            payload = add_variants(payload, args.add, now["commit"])
        except (ValueError, FileNotFoundError) as e:
            ap.error(str(e))
        payload.setdefault("additions", []).append(
            {k: now[k] for k in ("command", "commit", "created_at")}
        )
        if args.notes:
            payload["notes"] = (payload["notes"] + "\n" + args.notes).strip()
        write(payload, args.name, args.results)
        return
    if args.bundle is None:
        ap.error("--bundle is required (or --add to extend an existing report)")

    manifest = _json(args.bundle / "manifest.json")
    cfg: PipelineConfig = _from_dict(PipelineConfig, manifest["config"])
    data = _json(args.bundle / "stages" / "data.json")
    ds = load_dataset(data["source"])
    split = leave_one_out(ds, cfg.max_history)
    valid = {
        "popularity": evaluate_popularity(split.train, split.valid, ds.n_items),
        "recent": evaluate_recent(split.train, split.valid, ds.n_items, cfg.max_history),
    }
    rows = rows_of(args.bundle, valid)
    for spec in args.variant:
        label, _, path = spec.partition("=")
        vrows = rows_of(Path(path), valid)
        plain = next(r for r in vrows if r["model"] == "LETTER")
        rows.append({**plain, "model": label})
    lm = _json(args.bundle / "stages" / "lm.json")
    payload = {
        **header(),
        "dataset": data,
        "test_users": len(split.test),
        "rows": rows,
        "comparisons": comparisons_of(rows),
        "recommend": manifest.get("recommend", {}),
        "train_seconds": lm["train_seconds"],
        "eval_seconds": next(r for r in rows if r["model"] == "LETTER")["eval_seconds"],
        "config": manifest["config"],
        "histories": {"LETTER": lm["history"]},
        "paper": {k: dict(zip(METRICS, v, strict=True)) for k, v in PAPER_YELP.items()}
        if "yelp" in data["name"].lower()
        else None,
        "notes": args.notes,
    }
    write(payload, args.name, args.results)


def plot(rows: list[dict[str, Any]], history: list[dict[str, float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = rows_figure(rows, ("recall@10", "ndcg@10"))
    pts = [(h["epoch"], h["valid_ndcg@10"]) for h in history if "valid_ndcg@10" in h]
    if pts:
        axes[1].plot(*zip(*pts, strict=True), marker=".")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("LETTER NDCG@10 (validation subset)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
