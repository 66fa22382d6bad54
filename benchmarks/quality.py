"""LETTER's Table 1/2 in one harness: popularity, SASRec, TIGER (alpha = beta = 0, tau = 1),
+CF alignment, +diversity, LETTER (both) with tau tuned on validation, all on the same data,
split and evaluation -> benchmarks/results/quality-<dataset>.json + .md + plots.

    python -m benchmarks.quality --data ../shared/data/yelp --work runs/yelp [--profile full]
    python -m benchmarks.quality --data ml-100k --work runs/ml --profile quick

Every variant is a bundle under WORK/<variant>; stages resume, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, header, md_header, md_table, write_result
from training import pipeline
from training.config import PipelineConfig, resolve_config
from training.evaluate import evaluate_popularity, evaluate_recent

PAPER_YELP = {
    "SASRec": (0.0183, 0.0238, 0.0117, 0.0146),
    "TIGER": (0.0262, 0.0331, 0.0169, 0.0207),
    "LETTER-TIGER": (0.0286, 0.0364, 0.0184, 0.0227),
    "LC-Rec": (0.0230, 0.0298, 0.0148, 0.0184),
    "LETTER-LC-Rec": (0.0255, 0.0326, 0.0166, 0.0205),
}
METRICS = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
RECENT = "Recent history"
"""The repeat baseline's row (training.evaluate.evaluate_recent): not in the paper."""
REPEAT_COLUMNS = ["history_share@10", "recall@10_repeat", "recall@10_new"]
SHARED = ("data.json", "embeddings.npy", "embeddings.json", "cf.npy", "sasrec.json", "sasrec.pt")


def variants(cfg: PipelineConfig, taus: list[float]) -> dict[str, tuple[float, float, float]]:
    """name -> (alpha, beta, tau)."""
    a, b = cfg.tokenizer.alpha, cfg.tokenizer.beta
    out = {"TIGER": (0.0, 0.0, 1.0), "+CF": (a, 0.0, 1.0), "+div": (0.0, b, 1.0)}
    for t in taus:
        out[f"LETTER tau={t:g}"] = (a, b, t)
    return out


def workspace(
    work: Path, name: str, cfg: PipelineConfig, data: str, shared: Path, progress: bool
) -> pipeline.Workspace:
    out = variant_dir(work, name)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    for f in SHARED:
        dst = out / "stages" / f
        if not dst.exists():
            shutil.copy(shared / "stages" / f, dst)
    return pipeline.Workspace(out=out, cfg=cfg, data_spec=data, progress=progress)


def run_variant(ws: pipeline.Workspace, tok_src: Path | None) -> dict[str, Any]:
    if tok_src is not None and not (ws.out / "manifest.json").exists():
        for part in (
            "tokenizer",
            "report",
            "catalogue.parquet",
            "manifest.json",
            "stages/tokenizer.json",
        ):
            src, dst = tok_src / part, ws.out / part
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy(src, dst)
    pipeline.stage_tokenizer(ws)
    lm = pipeline.stage_lm(ws)
    pipeline.stage_evaluate(ws)
    ev = json.loads((ws.out / "report" / "eval.json").read_text())
    return {"lm": lm, "eval": ev}


def variant_dir(work: Path, name: str) -> Path:
    return work / name.replace(" ", "_").replace("=", "")


def finished(work: Path, name: str) -> dict[str, Any] | None:
    """A variant's lm summary and evaluation when its run has completed (any process)."""
    out = variant_dir(work, name)
    lm, ev = out / "stages" / "lm.json", out / "report" / "eval.json"
    if not (lm.exists() and ev.exists()):
        return None
    result = {"lm": json.loads(lm.read_text()), "eval": json.loads(ev.read_text())}
    stage_seconds = {
        "embed": json.loads((out / "stages" / "embeddings.json").read_text())["seconds"],
        "cf": json.loads((out / "stages" / "sasrec.json").read_text())["seconds"],
        "tokenizer": json.loads((out / "stages" / "tokenizer.json").read_text())["wall_seconds"],
        "lm": result["lm"]["train_seconds"],
        "evaluate": result["eval"]["letterrec"]["eval_seconds"],
    }
    return {**result, "stage_seconds": stage_seconds}


def in_progress(work: Path, name: str) -> dict[str, Any] | None:
    """Validation history of a variant whose training stopped before the end (resumable)."""
    ckpt = variant_dir(work, name) / "stages" / "lm_checkpoint.pt"
    if finished(work, name) is not None or not ckpt.exists():
        return None
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]
    return {
        "epochs": state["epoch"],
        "best_valid": state["best_valid"],
        "history": state["history"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--taus", default="1.0,0.7,0.5")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated variant names to train (default: all); variants are independent, "
        "so several processes may each run some of them once the shared stages exist",
    )
    ap.add_argument(
        "--collect-only",
        action="store_true",
        help="train nothing: run the shared stages and write the report from finished variants",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument(
        "--name",
        default=None,
        help="report name: files quality-NAME.* (a leading 'quality-' is not doubled)",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    cfg = resolve_config(args.profile, args.config).with_device(args.device)
    cfg = dataclasses.replace(cfg, ablation=False)
    progress = not args.quiet

    shared = pipeline.Workspace(
        out=args.work / "shared", cfg=cfg, data_spec=args.data, progress=progress
    )
    data = pipeline.stage_data(shared)
    pipeline.stage_embed(shared)
    sas = pipeline.stage_cf(shared)
    split = shared.split()
    pop = evaluate_popularity(split.train, split.test, shared.dataset().n_items)
    recent = evaluate_recent(split.train, split.test, shared.dataset().n_items)

    taus = [float(t) for t in args.taus.split(",")]
    grid = variants(cfg, taus)
    chosen = set(filter(None, args.only.split(",")))
    unknown = chosen - set(grid)
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)}; valid: {sorted(grid)}")
    for name, (alpha, beta, tau) in grid.items():
        if args.collect_only or (chosen and name not in chosen):
            continue
        vcfg = dataclasses.replace(
            cfg,
            tokenizer=dataclasses.replace(cfg.tokenizer, alpha=alpha, beta=beta),
            lm=dataclasses.replace(cfg.lm, tau=tau),
        )
        ws = workspace(args.work, name, vcfg, args.data, shared.out, progress)
        # LETTER variants differ only in tau: the first finished LETTER tokenizer is reused.
        reuse = next(
            (
                variant_dir(args.work, n)
                for n in grid
                if n.startswith("LETTER")
                and n != name
                and (variant_dir(args.work, n) / "manifest.json").exists()
            ),
            None,
        )
        run_variant(ws, reuse if name.startswith("LETTER") else None)
    results = {n: r for n in grid if (r := finished(args.work, n)) is not None}
    partial = {n: r for n in grid if (r := in_progress(args.work, n)) is not None}
    report(args, cfg, data, pop, sas, results, partial, recent)


def report(
    args: argparse.Namespace,
    cfg: PipelineConfig,
    data: dict[str, Any],
    pop: dict[str, float],
    sas: dict[str, Any],
    results: dict[str, dict[str, Any]],
    partial: dict[str, dict[str, Any]] | None = None,
    recent: dict[str, float] | None = None,
) -> None:
    partial = partial or {}
    rows: list[dict[str, Any]] = [
        {"model": "Popularity", **pop},
        *([{"model": RECENT, **recent}] if recent else []),
        {"model": "SASRec", **sas["test"]},
    ]
    tau_curve = []
    for name, r in results.items():
        row = {
            "model": name,
            **{k: v for k, v in r["eval"]["letterrec"].items()},
            "valid_ndcg@10": r["lm"]["valid"].get("ndcg@10"),
            "epochs": r["lm"]["epochs"],
            "train_seconds": r["lm"]["train_seconds"],
            # This variant alone, from item text to test metrics (shared stages counted).
            "pipeline_minutes": sum(r["stage_seconds"].values()) / 60,
        }
        rows.append(row)
        if name.startswith("LETTER"):
            tau_curve.append(
                {
                    "tau": float(name.split("=")[1]),
                    "valid_ndcg@10": row["valid_ndcg@10"],
                    "test_ndcg@10": row["ndcg@10"],
                    "test_recall@10": row["recall@10"],
                }
            )
    if tau_curve:
        best = max(tau_curve, key=lambda r: r["valid_ndcg@10"] or -1)
        best_row = next(r for r in rows if r["model"] == f"LETTER tau={best['tau']:g}")
        rows.append({**best_row, "model": f"LETTER (tau tuned on validation: {best['tau']:g})"})
    payload = {
        **header(),
        "dataset": data,
        "rows": rows,
        "tau_curve": tau_curve,
        "histories": {n: r["lm"]["history"] for n, r in results.items()},
        "unfinished": partial,
        "stage_seconds": {n: r["stage_seconds"] for n, r in results.items()},
        "train_seconds": sum(r["lm"]["train_seconds"] for r in results.values()),
        "eval_seconds": sum(r["eval"]["letterrec"]["eval_seconds"] for r in results.values()),
        "device": args.device,
        "config": cfg.to_dict(),
        "paper": {k: dict(zip(METRICS, v, strict=True)) for k, v in PAPER_YELP.items()}
        if "yelp" in data["name"].lower()
        else None,
    }
    name = (args.name or data["name"].lower()).removeprefix("quality-")
    md = md_header(
        f"Recommendation quality on {data['name']} (leave-one-out test, full ranking)", payload
    )
    md += md_table(
        rows,
        [
            "model",
            *METRICS,
            "coverage@10",
            "pop_percentile@10",
            "epochs",
            "train_seconds",
            "pipeline_minutes",
        ],
    )
    if payload["paper"]:
        md += "\nThe paper's numbers on the same data (LETTER Table 1):\n\n" + md_table(
            [{"model": k, **v} for k, v in payload["paper"].items()], ["model", *METRICS]
        )
    md += f"\nTraining {payload['train_seconds']:.0f} s, evaluation {payload['eval_seconds']:.0f} s in all, on {args.device}.\n"
    if partial:
        md += (
            "\n## Unfinished variants (training stopped; `--only NAME` resumes from the "
            "checkpoint)\n\n"
        )
        md += md_table(
            [
                {"model": n, "epochs_done": r["epochs"], **r["best_valid"]}
                for n, r in partial.items()
            ],
            ["model", "epochs_done", "recall@10", "ndcg@10"],
        ).replace("| recall@10 | ndcg@10 |", "| best valid recall@10 | best valid ndcg@10 |")
    with_repeats = [r for r in rows if "recall@10_repeat" in r]
    if with_repeats:
        md += (
            f"\n## Repeats\n\n{with_repeats[0]['repeat_targets']:.1%} of the test targets are an "
            "item of the user's last 20 (a repeat visit). The row "
            f"'{RECENT}' recommends the user's most recent distinct items, then the most popular "
            "ones: a baseline outside the paper, showing how much the data rewards repeats. "
            "history_share@10: share of recommended items taken from the user's history; recall "
            "on repeat and on new targets.\n\n"
        ) + md_table(with_repeats, ["model", *REPEAT_COLUMNS])
    if tau_curve:
        md += "\n## tau (ranking-guided loss)\n\n" + md_table(
            tau_curve, ["tau", "valid_ndcg@10", "test_ndcg@10", "test_recall@10"]
        )
    out = write_result(f"quality-{name}", payload, md, args.results)
    curves = {**payload["histories"]}
    curves.update({f"{n} (unfinished)": r["history"] for n, r in partial.items()})
    plot(rows, tau_curve, curves, out.with_suffix(".png"))
    print(out)


def plot(
    rows: list[dict[str, Any]],
    tau_curve: list[dict[str, Any]],
    histories: dict[str, list[dict[str, float]]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [2, 1.3, 1]})
    names = [r["model"] for r in rows]
    axes[0].barh(names, [r["ndcg@10"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("NDCG@10 (test)")
    axes[0].invert_yaxis()
    for name, hist in histories.items():
        pts = [(h["epoch"], h["valid_ndcg@10"]) for h in hist if "valid_ndcg@10" in h]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker=".", label=name)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("NDCG@10 (validation subset)")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    if tau_curve:
        t = sorted(tau_curve, key=lambda r: r["tau"])
        axes[2].plot(
            [r["tau"] for r in t], [r["valid_ndcg@10"] for r in t], marker="o", label="validation"
        )
        axes[2].plot(
            [r["tau"] for r in t], [r["test_ndcg@10"] for r in t], marker="s", label="test"
        )
        axes[2].set_xlabel("tau")
        axes[2].set_ylabel("NDCG@10")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
