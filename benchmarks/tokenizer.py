"""Tokenizer results of a bundle -> benchmarks/results/tokenizer-<dataset>.json + .md.

Reads what `letterrec pipeline` wrote (report/tokenizer.json, stages/*.json) and measures the
re-clustering step on the bundle's own trained codebooks: LETTER's reference method
(`k_means_constrained`, as in its released code: 10 clusters, n_init=10, max_iter=10) against
ours (`training.clustering.balanced_labels`): seconds per re-clustering and within-cluster SSE.

    python -m benchmarks.tokenizer --bundle bundles/yelp [--name yelp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import header, md_header, md_table, write_result
from models.item_tokenizer import ItemTokenizer
from training.clustering import balanced_labels


def sse(x: np.ndarray, labels: np.ndarray) -> float:
    return float(
        sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))
    )


def clustering_comparison(
    tok: ItemTokenizer, k: int = 10, repeats: int = 3
) -> list[dict[str, Any]]:
    try:
        from k_means_constrained import KMeansConstrained
    except ImportError as e:
        raise SystemExit("this benchmark compares against `pip install k-means-constrained`") from e
    rows = []
    for level, cb in enumerate(tok.model.codebooks):
        x = cb.detach().float().numpy()
        n = len(x)
        ours_t, ref_t = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            ours = balanced_labels(torch.as_tensor(x), k, seed=r).numpy()
            ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = KMeansConstrained(
                n_clusters=k,
                size_min=n // k - 1,
                size_max=-(-n // k) + 1,
                max_iter=10,
                n_init=10,
                random_state=r,
            ).fit_predict(x)
            ref_t.append(time.perf_counter() - t0)
        rows.append(
            {
                "level": level,
                "ours_seconds": statistics.median(ours_t),
                "reference_seconds": statistics.median(ref_t),
                "speedup": statistics.median(ref_t) / statistics.median(ours_t),
                "ours_sse": sse(x, ours),
                "reference_sse": sse(x, ref),
                "ours_max_cluster": int(np.bincount(ours).max()),
                "reference_max_cluster": int(np.bincount(ref).max()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument(
        "--name", default=None, help="dataset name in the file name (default: manifest)"
    )
    ap.add_argument(
        "--wall",
        type=float,
        default=None,
        help="measured end-to-end seconds of the pipeline run (default: sum of the stages, "
        "without the alpha = 0 ablation tokenizer)",
    )
    ap.add_argument("--pipeline-command", default=None, help="the command that built the bundle")
    args = ap.parse_args()
    rep = json.loads((args.bundle / "report" / "tokenizer.json").read_text())
    stages = args.bundle / "stages"
    emb = json.loads((stages / "embeddings.json").read_text())
    sas = json.loads((stages / "sasrec.json").read_text())
    data = json.loads((stages / "data.json").read_text())
    name = args.name or data["name"].lower()
    tok = ItemTokenizer.load(args.bundle / "tokenizer")
    clustering = clustering_comparison(tok)
    levels = [
        {k: lv[k] for k in ("level", "used", "codebook_size", "perplexity", "max_load", "entropy")}
        for lv in rep["levels"]
    ]
    payload = {
        **header(),
        "dataset": data,
        "items": rep["items"],
        "unique_ids": rep["unique_ids"],
        "wall_seconds": args.wall or emb["seconds"] + sas["seconds"] + rep["wall_seconds"],
        "pipeline_command": args.pipeline_command,
        "stage_seconds": {
            "embed": emb["seconds"],
            "embed_cache_hit": emb["cache_hit"],
            "sasrec": sas["seconds"],
            "tokenizer_main": rep["wall_seconds"],
            "tokenizer_train": rep["train_seconds"],
            "clustering_in_training": rep["cluster_seconds"],
        },
        "levels": levels,
        "cf_alignment": rep.get("cf_alignment"),
        "collisions": rep["collisions"],
        "recon_mse": rep["recon_mse"],
        "latent_effective_rank": rep["latent_effective_rank"],
        "latent_dim": rep["latent_dim"],
        "ablation_plain": {
            k: rep["ablation_plain"][k]
            for k in (
                "levels",
                "collisions",
                "recon_mse",
                "latent_effective_rank",
                "cf_code_overlap",
            )
        }
        if "ablation_plain" in rep
        else None,
        "sasrec": {"valid": sas["valid"], "test": sas["test"], "epochs": sas["epochs"]},
        "clustering": clustering,
        "config": rep["config"],
    }
    md = md_header(f"LETTER tokenizer on {data['name']}", payload)
    md += f"{payload['items']} items -> {payload['unique_ids']} unique identifiers; wall {payload['wall_seconds']:.0f} s "
    md += f"(embed {emb['seconds']:.0f} s{' cached' if emb['cache_hit'] else ''}, SASRec {sas['seconds']:.0f} s, LETTER tokenizer {rep['wall_seconds']:.0f} s; the alpha = 0 ablation tokenizer is the rest).\n\n"
    if args.pipeline_command:
        md += f"Bundle built by `{args.pipeline_command}`.\n\n"
    md += "## Code use per level (LETTER)\n\n" + md_table(
        levels, ["level", "used", "codebook_size", "perplexity", "max_load"]
    )
    if payload["ablation_plain"]:
        md += "\n## Code use per level (plain RQ-VAE, alpha = beta = 0)\n\n" + md_table(
            payload["ablation_plain"]["levels"],
            ["level", "used", "codebook_size", "perplexity", "max_load"],
        )
    if payload["cf_alignment"]:
        ca = payload["cf_alignment"]
        md += f"\n## CF alignment (LETTER Table 4: code overlap with the CF nearest neighbour)\n\nwith alpha: {ca['with_alpha']:.4f}; alpha = 0: {ca['alpha_zero']:.4f} (x{ca['with_alpha'] / max(ca['alpha_zero'], 1e-9):.2f})\n"
    c = payload["collisions"]
    md += (
        f"\n## Collisions\n\n{c['items_colliding_before']} items shared an identifier before resolution; "
        f"{c['items_moved']} moved; reconstruction MSE of moved items {c['recon_mse_moved_before']:.4f} -> {c['recon_mse_moved_after']:.4f} "
        f"(all items: {payload['recon_mse']:.4f}). Latent effective rank {payload['latent_effective_rank']:.1f} of {payload['latent_dim']}.\n"
    )
    md += (
        "\n## Re-clustering the codebooks (diversity loss): ours vs LETTER's k_means_constrained\n\n"
        + md_table(
            clustering,
            [
                "level",
                "ours_seconds",
                "reference_seconds",
                "speedup",
                "ours_sse",
                "reference_sse",
                "ours_max_cluster",
                "reference_max_cluster",
            ],
        )
    )
    md += "\nPlots: `report/code_frequency.png` (LETTER Fig. 6) and `report/latent_spectrum.png` in the bundle; copies beside this file.\n"
    out = write_result(f"tokenizer-{name}", payload, md)
    for png in ("code_frequency.png", "latent_spectrum.png"):
        src = args.bundle / "report" / png
        if src.exists():
            (out.parent / f"tokenizer-{name}-{png}").write_bytes(src.read_bytes())
    print(out)


if __name__ == "__main__":
    main()
