"""Batch recommendation throughput: the local runner against the Ray runner with 1, 2, ... workers.

    python -m benchmarks.batch --bundle bundles/ml-100k --users 20000 --workers 1,2 --threads 1

Users are synthetic: `--users` histories of 1..`--history-len` items drawn from the bundle's
catalogue (seeded). Each runner writes the whole job into a fresh directory
(`service.batch.run_local`, `service.batch_ray.run_ray`); `seconds` is its wall time end to end,
engine (or actor) start-up and Parquet writing included, since that is what a nightly job costs;
`startup_s` (the local runner on one engine batch of `--batch-size` users) shows how much of it
is fixed cost. Ray itself is started once, before the Ray rows, with
max(workers) x threads CPUs (or joins `--ray-address`).

It writes `benchmarks/results/batch-<device>.json` + `.md`: top-level `command`, `commit`,
`machine`, `created_at`, which model the bundle holds (`model_profile`, `weights`, `model`),
`config` and `rows` of {runner, workers, threads, users, seconds, users_per_s}, and
`identical_to_local`: every Ray run wrote exactly the local runner's table (same users, ranks,
items and float scores).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.common import RESULTS, header, md_header, md_table, model_info, write_result
from models.bundle import Bundle
from service.batch import BatchConfig, read_output, run_local, users_table

log = logging.getLogger("benchmarks.batch")


def synthetic_users(bundle: Path, n: int, history_len: int, seed: int) -> pa.Table:
    ids = Bundle.load(bundle).catalogue.item_ids
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, history_len + 1, size=n)
    rows = rng.integers(0, len(ids), size=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    histories = [[ids[r] for r in rows[a:b]] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return users_table([f"user-{i}" for i in range(n)], histories)


def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    users = synthetic_users(args.bundle, args.users, args.history_len, args.seed)
    cfg = BatchConfig(
        args.bundle,
        k=args.k,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device=args.device,
        threads=args.threads,
    )
    work = Path(tempfile.mkdtemp(prefix="letterrec-batch-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        startup = timed(run_local, users.slice(0, args.batch_size), work / "startup", cfg, False)
        seconds = timed(run_local, users, work / "local", cfg, progress=not args.quiet)
        rows.append(_row("local", 1, args, seconds))
        local = read_output(work / "local")
        identical = []
        if args.workers:
            identical = _ray_rows(args, users, cfg, work, local, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "config": {
            "k": args.k,
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "beam_width": cfg.beam_width,
            "device": args.device,
            "history_len": args.history_len,
            "seed": args.seed,
        },
        "startup_s": round(startup, 3),
        "rows": rows,
        "identical_to_local": all(identical) if identical else None,
    }


def _ray_rows(
    args: argparse.Namespace,
    users: pa.Table,
    cfg: BatchConfig,
    work: Path,
    local: pa.Table,
    rows: list[dict[str, Any]],
) -> list[bool]:
    import ray

    from service.batch_ray import run_ray

    gpus = 0.0
    if args.device.startswith("cuda"):
        import torch

        gpus = min(1.0, torch.cuda.device_count() / max(args.workers))
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    else:
        cpus = max(args.workers) * max(args.threads, 1)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    identical = []
    try:
        for n in args.workers:
            out = work / f"ray-{n}"
            seconds = timed(
                run_ray, users, out, cfg, n, gpus_per_worker=gpus, progress=not args.quiet
            )
            rows.append(_row("ray", n, args, seconds))
            same = read_output(out).equals(local)
            rows[-1]["identical_to_local"] = same
            identical.append(same)
    finally:
        ray.shutdown()
    return identical


def _row(runner: str, workers: int, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    log.info("%s x%d: %d users in %.1f s", runner, workers, args.users, seconds)
    return {
        "runner": runner,
        "workers": workers,
        "threads": args.threads,
        "users": args.users,
        "seconds": round(seconds, 3),
        "users_per_s": round(args.users / seconds, 2),
    }


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    text = md_header("Batch recommendation: local and Ray runners", report)
    text += (
        f"{report['rows'][0]['users']} synthetic users (histories of 1..{c['history_len']} "
        f"catalogue items), k {c['k']}, beam {c['beam_width']}, engine batches of "
        f"{c['batch_size']}, parts of {c['chunk_size']} users, on {c['device']}. Seconds are "
        f"wall time end to end (engine or actor start-up included; the local runner's start-up "
        f"plus one batch took {report['startup_s']:.1f} s).\n\n"
    )
    text += md_table(
        report["rows"],
        ["runner", "workers", "threads", "users", "seconds", "users_per_s", "identical_to_local"],
    )
    text += f"\nidentical_to_local: {report['identical_to_local']}\n"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--users", type=int, default=2000, help="synthetic users")
    p.add_argument("--history-len", type=int, default=20, help="longest synthetic history")
    p.add_argument(
        "--workers",
        type=lambda s: [int(w) for w in s.split(",") if w],
        default=[1, 2],
        help="Ray worker counts, comma-separated ('' = the local runner only)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the results file suffix)")
    p.add_argument("--ray-address", default=None, help="a Ray cluster (default: a local one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = {**header(), **model_info(args.bundle), **run(args)}
    device = "cuda" if args.device.startswith("cuda") else args.device
    path = write_result(f"batch-{device}", report, markdown(report), args.out)
    print(markdown(report))
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
