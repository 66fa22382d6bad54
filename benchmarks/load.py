"""Load generator for a running letterrec server: throughput and latency of POST /recommend.

    python benchmarks/load.py --bundle bundles/yelp --url http://127.0.0.1:8000

For each concurrency level (default 1, 8, 32, 128) it keeps that many requests in flight for
`--duration` seconds or `--requests` requests, whichever ends first, with histories drawn from
the bundle's catalogue (seeded), and writes `benchmarks/results/load-<device>.json` + `.md`:
top-level `command`, `commit`, `machine`, `created_at`, `server` and `rows` of
{concurrency, requests, requests_per_s, p50_ms, p99_ms, errors}. The issue's target on the
2-core CPU: at concurrency 32, >= 100 requests/s at p99 <= 100 ms with zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

log = logging.getLogger("benchmarks.load")
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = {"concurrency": 32, "requests_per_s": 100.0, "p99_ms": 100.0, "errors": 0}


@dataclass
class Row:
    concurrency: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def histories(item_ids: list[str], count: int, max_len: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(item_ids, rng.randint(1, max_len)) for _ in range(count)]


async def run_level(
    client: httpx.AsyncClient,
    concurrency: int,
    bodies: list[dict[str, Any]],
    max_requests: int,
    duration_s: float,
) -> Row:
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal errors, issued
        while issued < max_requests and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            start = time.perf_counter()
            try:
                r = await client.post("/recommend", json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    done = len(latencies) + errors
    return Row(
        concurrency=concurrency,
        requests=done,
        requests_per_s=round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        p50_ms=round(1000 * percentile(latencies, 50), 2),
        p99_ms=round(1000 * percentile(latencies, 99), 2),
        errors=errors,
    )


async def benchmark(
    args: argparse.Namespace, item_ids: list[str]
) -> tuple[dict[str, Any], list[Row]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8)
    bodies = [
        {"history": h, "k": args.k} for h in histories(item_ids, 4096, args.history_len, args.seed)
    ]
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, limits=limits, timeout=args.timeout
    ) as client:
        ready = await client.get("/readyz")
        if ready.status_code != 200:
            raise SystemExit(f"{args.url}/readyz answered {ready.status_code}: {ready.text}")
        server = ready.json()
        await run_level(client, 4, bodies, args.warmup, 30.0)  # warm-up, not reported
        rows = []
        for c in args.concurrency:
            row = await run_level(client, c, bodies, args.requests, args.duration)
            log.info("%s", row)
            rows.append(row)
    return server, rows


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            info["gpu"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def target_met(rows: list[Row]) -> bool | None:
    for r in rows:
        if r.concurrency == TARGET["concurrency"]:
            return (
                r.requests_per_s >= TARGET["requests_per_s"]
                and r.p99_ms <= TARGET["p99_ms"]
                and r.errors == TARGET["errors"]
            )
    return None


def write(report: dict[str, Any], out_dir: Path, device: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"load-{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Load: POST /recommend ({device})",
        "",
        f"- command: `{report['command']}`",
        f"- commit: `{report['commit']}`, created {report['created_at']}",
        f"- machine: {report['machine']}",
        f"- server: engine {report['server'].get('engine')}, model {report['server'].get('model_version')}",
        f"- k = {report['k']}, histories of 1..{report['history_len']} items, "
        f"{report['duration_s']} s or {report['max_requests']} requests per level",
        f"- target (concurrency 32: >= 100 req/s, p99 <= 100 ms, 0 errors): {report['target_met']}",
        "",
        "| concurrency | requests | requests/s | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} "
            f"| {r['p99_ms']} | {r['errors']} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle served (for its item ids)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level (upper bound)")
    p.add_argument("--requests", type=int, default=5000, help="requests per level (upper bound)")
    p.add_argument("--warmup", type=int, default=50, help="unreported requests first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--history-len", type=int, default=20)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout (s)")
    p.add_argument("--api-key", default=os.environ.get("LETTERREC_BENCH_API_KEY"))
    p.add_argument("--device", default=None, help="results file suffix (default: server's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1 or args.duration <= 0:
        p.error("--concurrency, --requests and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    item_ids = [
        str(x)
        for x in pq.read_table(args.bundle / "catalogue.parquet", columns=["item_id"])
        .column("item_id")
        .to_pylist()
    ]
    server, rows = asyncio.run(benchmark(args, item_ids))
    device = args.device or server.get("device") or "unknown"
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "machine": machine(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": {
            k: server.get(k) for k in ("engine", "device", "model_version", "catalogue_items")
        },
        "url": args.url,
        "k": args.k,
        "history_len": args.history_len,
        "duration_s": args.duration,
        "max_requests": args.requests,
        "rows": [asdict(r) for r in rows],
        "target": TARGET,
        "target_met": target_met(rows),
    }
    path = write(report, args.out, device)
    log.info("wrote %s and %s", path, path.with_suffix(".md"))


if __name__ == "__main__":
    main()
