"""Serving in bfloat16 instead of float32: how often the item lists agree, what it does to
quality, and how much faster it decodes, on a trained bundle's validation users.

    python -m benchmarks.dtype_agreement --bundle runs/ml --users 2000 --threads 1

The torch engine decodes the same validation users (their histories and held-out validation
targets from the bundle's own dataset and split) once per dtype, batch by batch and interleaved,
so both see the same background load. Reported against float32 (the exact engine):

- `identical_lists`: share of users whose top-k is the same items in the same order;
- `overlap@k`: mean share of float32's top-k also in the other dtype's top-k;
- `recall@10`, `ndcg@10` on the validation targets with bootstrap standard errors, and the paired
  difference to float32 with its own standard error (`*_verdict`: beyond two of them or not);
- `users_per_s`: median over the interleaved batches, and the speed-up over float32.

Validation users only: the choice of a serving dtype is made here, never on test users.
Results: benchmarks/results/dtype-agreement-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import (
    RESULTS,
    cpu_flags,
    header,
    md_header,
    md_table,
    model_info,
    write_result,
)
from models.bundle import Bundle
from models.trie import ItemTrie
from service.engines.base import DecodeRequest
from service.engines.torch_engine import TorchEngine
from training.config import PipelineConfig, _from_dict
from training.data import leave_one_out, load_dataset
from training.metrics import bootstrap_se, gains_at, ranks_from_lists

K = 10


def validation_users(bundle: Bundle, n_users: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Up to `n_users` random (history rows, target row) pairs of the bundle's validation split."""
    cfg: PipelineConfig = _from_dict(PipelineConfig, bundle.manifest.config)
    ds = load_dataset(json.loads((bundle.root / "stages" / "data.json").read_text())["source"])
    if list(ds.item_ids) != list(bundle.catalogue.item_ids):
        raise ValueError(f"{bundle.root}: catalogue rows differ from the dataset's item order")
    pairs = leave_one_out(ds, cfg.max_history).valid
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pairs), size=min(n_users, len(pairs)), replace=False)
    return [pairs[i] for i in sorted(pick)]


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """b - a with the bootstrap standard error of the per-user difference."""
    d = b - a
    se = bootstrap_se(d)
    verdict = "higher" if d.mean() > 2 * se else "lower" if d.mean() < -2 * se else "within noise"
    return {"diff": float(d.mean()), "se": se, "verdict": verdict}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.load(args.bundle)
    vocab, codes = bundle.vocab, bundle.catalogue.codes
    users = validation_users(bundle, args.users)
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    requests = [DecodeRequest(vocab.prompt(codes[h]), k=K) for h, _ in users]
    engines = [
        TorchEngine(bundle.lm_dir, vocab, dtype=d, beam_width=args.beam, max_batch=args.batch)
        for d in args.dtypes
    ]
    for engine in engines:
        engine.recommend(requests[: args.batch], trie)  # warm-up
    lists: list[list[list[int]]] = [[] for _ in engines]
    seconds: list[list[float]] = [[] for _ in engines]
    for s in tqdm(range(0, len(requests), args.batch), desc="decoding", unit="batch"):
        chunk = requests[s : s + args.batch]
        for v, engine in enumerate(engines):
            t0 = time.perf_counter()
            got = engine.recommend(chunk, trie)
            seconds[v].append((time.perf_counter() - t0) / len(chunk))
            lists[v].extend([r.item_index for r in recs] for recs in got)
    targets = [t for _, t in users]
    base_ranks = ranks_from_lists(lists[0], targets)
    rows = []
    for v, d in enumerate(args.dtypes):
        ranks = ranks_from_lists(lists[v], targets)
        hit = (ranks < K).astype(np.float64)
        ndcg = gains_at(ranks, K)
        row: dict[str, Any] = {
            "dtype": d,
            "users": len(users),
            "recall@10": float(hit.mean()),
            "se_recall@10": bootstrap_se(hit),
            "ndcg@10": float(ndcg.mean()),
            "se_ndcg@10": bootstrap_se(ndcg),
            "users_per_s": round(1.0 / float(np.median(seconds[v])), 2),
        }
        if v > 0:  # against the baseline (the first dtype)
            pairs = list(zip(lists[0], lists[v], strict=True))
            overlap = [len(set(a) & set(b)) / max(1, len(a)) for a, b in pairs]
            r = paired((base_ranks < K).astype(np.float64), hit)
            n = paired(gains_at(base_ranks, K), ndcg)
            row.update(
                {
                    "identical_lists": float(np.mean([a == b for a, b in pairs])),
                    f"overlap@{K}": float(np.mean(overlap)),
                    "recall@10_diff": r["diff"],
                    "se_recall@10_diff": r["se"],
                    "recall@10_verdict": r["verdict"],
                    "ndcg@10_diff": n["diff"],
                    "se_ndcg@10_diff": n["se"],
                    "ndcg@10_verdict": n["verdict"],
                    "speedup": round(float(np.median(seconds[0]) / np.median(seconds[v])), 2),
                }
            )
        rows.append(row)
    for engine in engines:
        engine.close()
    return {
        **header(),
        "bundle": str(args.bundle),
        **model_info(args.bundle),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "beam": args.beam,
        "k": K,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--users", type=int, default=2000, help="validation users (random, seeded)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="the first is the baseline")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--name", default=None, help="files dtype-agreement-NAME.* (default: bundle)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.dtypes = args.dtypes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = run(args)
    md = md_header("Serving dtype: agreement with float32, quality and speed", payload)
    md += (
        f"{payload['rows'][0]['users']:,} validation users of the bundle's own split, batch "
        f"{args.batch}, beam {args.beam}, top-{K}, {payload['threads']} torch threads. "
        "identical_lists: same items in the same order as float32; differences are paired "
        "(per user) with bootstrap standard errors; a difference within about two of them is "
        "noise.\n\n"
    )
    md += md_table(
        payload["rows"],
        [
            "dtype",
            "users_per_s",
            "speedup",
            "identical_lists",
            f"overlap@{K}",
            "recall@10",
            "se_recall@10",
            "recall@10_diff",
            "se_recall@10_diff",
            "recall@10_verdict",
            "ndcg@10",
            "ndcg@10_diff",
            "se_ndcg@10_diff",
            "ndcg@10_verdict",
        ],
    )
    name = args.name or Path(args.bundle).name
    print(write_result(f"dtype-agreement-{name}", payload, md, args.results))


if __name__ == "__main__":
    main()
