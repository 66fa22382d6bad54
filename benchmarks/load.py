"""Load generator for a running letterrec server: throughput and latency of POST /recommend.

    python -m benchmarks.load --bundle bundles/yelp --url http://127.0.0.1:8000

Two kinds of level, with histories drawn from the bundle's catalogue (seeded):

- Closed loop (`--concurrency`, default 1 8 32 128): that many requests always in flight, each
  connection sending its next request as soon as the last one answers, for `--duration` seconds
  or `--requests` requests, whichever ends first. This measures saturation: throughput is
  concurrency / latency, and latency is mostly queueing behind the other connections.
  Two clients: `httpx` (in this process, asyncio) and `wrk` (Debian's C load generator, driven by
  a Lua script over the same bodies; duration-bounded only). On a 2-core machine the client shares
  the CPU with the server: a Python client at 128 connections spends more time in itself than the
  server does, so the committed closed-loop CPU numbers use `--client wrk`.
- Open loop (`--rates`): requests arrive at a fixed mean rate (Poisson, seeded) whatever the
  server does, over at most `--rate-concurrency` connections (default 32), as real users do. A
  request that finds every connection busy waits for one, and its latency counts from its
  scheduled arrival, not from when it was sent (no coordinated omission, as wrk2 does). This is
  the throughput a service sustains at a latency objective. Always the httpx client (wrk cannot
  schedule arrivals).

It writes `benchmarks/results/load-<device>.json` + `.md` (+ `.png` for open-loop levels):
top-level `command`, `commit`, `machine`, `created_at`, which model the bundle holds
(`model_profile`, `weights`, `model`: see benchmarks.common.model_info; the server is assumed to
serve `--bundle`), `server` and `rows` of
{mode, concurrency, offered_rate, requests, requests_per_s, p50_ms, p99_ms, errors}. The issue's
target on the 2-core CPU: at concurrency 32, >= 100 requests/s at p99 <= 100 ms with zero errors;
`target_met` reads it for open-loop levels (>= 100 requests/s served with 32 connections), and
`closed_loop_target_met` the closed-loop one: at least 150 requests/s with 32 connections and zero
errors (saturation throughput; the latency objective belongs to the open loop, where arrivals do
not wait for answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

from benchmarks.common import RESULTS, header, md_header, md_table, model_info, write_result

log = logging.getLogger("benchmarks.load")
TARGET = {"concurrency": 32, "requests_per_s": 100.0, "p99_ms": 100.0, "errors": 0}
CLOSED_TARGET = {"concurrency": 32, "requests_per_s": 150.0, "errors": 0}
"""Saturation throughput with 32 connections (no latency objective: in a closed loop latency is
concurrency / throughput)."""


@dataclass
class Row:
    concurrency: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mode: str = "closed"
    offered_rate: float | None = None


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
            if await recommend_ok(client, body):
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return make_row(concurrency, len(latencies) + errors, latencies, errors, wall)


async def recommend_ok(client: httpx.AsyncClient, body: dict[str, Any]) -> bool:
    """POST /recommend; True when it answered 200."""
    try:
        return (await client.post("/recommend", json=body)).status_code == 200
    except httpx.HTTPError:
        return False


def make_row(
    concurrency: int,
    requests: int,
    latencies: list[float],
    errors: int,
    wall: float,
    mode: str = "closed",
    offered_rate: float | None = None,
) -> Row:
    """A level's row from its successful requests' latencies (seconds) and wall time."""
    return Row(
        concurrency=concurrency,
        requests=requests,
        requests_per_s=round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        p50_ms=round(1000 * percentile(latencies, 50), 2),
        p99_ms=round(1000 * percentile(latencies, 99), 2),
        errors=errors,
        mode=mode,
        offered_rate=offered_rate,
    )


async def run_open_level(
    client: httpx.AsyncClient,
    concurrency: int,
    rate: float,
    bodies: list[dict[str, Any]],
    max_requests: int,
    duration_s: float,
    seed: int,
) -> Row:
    """Poisson arrivals at `rate`/s over at most `concurrency` connections; each latency runs
    from the request's scheduled arrival to its answer (time spent waiting for a free connection
    counts)."""
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(body: dict[str, Any], due: float) -> None:
        nonlocal errors
        async with slots:
            ok = await recommend_ok(client, body)
        if ok:
            latencies.append(time.perf_counter() - due)
        else:
            errors += 1

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    due = start
    while len(tasks) < max_requests:
        due += rng.expovariate(rate)
        if due - start > duration_s:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(bodies[len(tasks) % len(bodies)], due)))
    await asyncio.gather(*tasks)
    wall = max(time.perf_counter() - start, duration_s if len(tasks) < max_requests else 0.0)
    return make_row(concurrency, len(tasks), latencies, errors, wall, "open", rate)


WRK_SCRIPT = r"""
local bodies, n = {}, 0
local headers = {["Content-Type"] = "application/json"}
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  if args[2] ~= nil and args[2] ~= "" then headers["Authorization"] = "Bearer " .. args[2] end
end
function request()
  n = n + 1
  return wrk.format("POST", "/recommend", headers, bodies[(n % #bodies) + 1])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "non2xx": %d, ' ..
    '"socket_errors": %d}\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def run_level_wrk(
    args: argparse.Namespace, concurrency: int, bodies_file: Path, duration_s: float
) -> Row:
    """One level with wrk (one thread, `concurrency` connections, each one request at a time)."""
    script = bodies_file.with_name("load.lua")
    script.write_text(WRK_SCRIPT)
    cmd = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(args.timeout))}s", "-s", str(script), args.url,
        "--", str(bodies_file), args.api_key or "",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out[-500:]}")
    res = json.loads(line[4:])
    errors = res["non2xx"] + res["socket_errors"]
    seconds = res["duration_us"] / 1e6
    ok = max(0, res["requests"] - res["non2xx"])
    return Row(
        concurrency=concurrency,
        requests=res["requests"],
        requests_per_s=round(ok / seconds, 2) if seconds > 0 else 0.0,
        p50_ms=round(res["p50_us"] / 1000, 2),
        p99_ms=round(res["p99_us"] / 1000, 2),
        errors=errors,
    )


async def settle(client: httpx.AsyncClient, timeout_s: float = 30.0) -> float:
    """Wait until the server has drained the previous level (a closed-loop client stops counting
    with up to `concurrency` requests still queued there): /metrics shows no request in flight
    but the /metrics request itself. Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        try:
            text = (await client.get("/metrics")).text
        except httpx.HTTPError:
            text = ""
        busy = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("letterrec_inflight_requests ")
        ]
        if not busy or busy[0] <= 1:
            break
        await asyncio.sleep(0.1)
    return time.perf_counter() - start


async def benchmark(
    args: argparse.Namespace, item_ids: list[str]
) -> tuple[dict[str, Any], list[Row]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max([*args.concurrency, args.rate_concurrency]) + 8)
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
        with tempfile.TemporaryDirectory() as tmp:
            bodies_file = Path(tmp) / "bodies.jsonl"
            bodies_file.write_text("".join(json.dumps(b) + "\n" for b in bodies))
            for c in args.concurrency:
                await settle(client)
                if args.client == "wrk":
                    row = await asyncio.to_thread(
                        run_level_wrk, args, c, bodies_file, args.duration
                    )
                else:
                    row = await run_level(client, c, bodies, args.requests, args.duration)
                log.info("%s", row)
                rows.append(row)
        for i, rate in enumerate(args.rates):
            await settle(client)
            row = await run_open_level(
                client, args.rate_concurrency, rate, bodies, args.requests, args.duration,
                args.seed + i,
            )  # fmt: skip
            log.info("%s", row)
            rows.append(row)
    return server, rows


def _meets(r: Row) -> bool:
    if r.mode == "closed":
        return (
            r.requests_per_s >= CLOSED_TARGET["requests_per_s"]
            and r.errors == CLOSED_TARGET["errors"]
        )
    return (
        r.requests_per_s >= TARGET["requests_per_s"]
        and r.p99_ms <= TARGET["p99_ms"]
        and r.errors == TARGET["errors"]
    )


def target_met(rows: list[Row], mode: str = "open") -> bool | None:
    """Whether a level of `mode` with the target's concurrency meets its target (TARGET in open
    loop, CLOSED_TARGET in closed loop); None if none ran."""
    levels = [r for r in rows if r.mode == mode and r.concurrency == TARGET["concurrency"]]
    return any(_meets(r) for r in levels) if levels else None


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Latency (p50, p99) against served throughput for the open-loop levels."""
    open_rows = [r for r in rows if r["mode"] == "open"]
    if not open_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["requests_per_s"] for r in open_rows]
    ax.plot(x, [r["p50_ms"] for r in open_rows], "o-", label="p50")
    ax.plot(x, [r["p99_ms"] for r in open_rows], "s-", label="p99")
    ax.axhline(TARGET["p99_ms"], color="grey", ls="--", lw=1, label="p99 objective")
    ax.axvline(TARGET["requests_per_s"], color="grey", ls=":", lw=1)
    ax.set_xlabel("served requests/s (Poisson arrivals)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"POST /recommend, open loop, {open_rows[0]['concurrency']} connections")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(report: dict[str, Any], out_dir: Path, device: str) -> Path:
    md = md_header(f"Load: POST /recommend ({device})", report)
    server = report["server"]
    md += (
        f"Client: {report['client']}. "
        f"Server: engine {server.get('engine')} ({server.get('dtype')}, "
        f"{server.get('decode_workers')} decode processes of {server.get('torch_threads')} torch "
        f"threads; 0 processes: in the server), model {server.get('model_version')}, "
        f"{server.get('catalogue_items')} items. k = {report['k']}, histories of "
        f"1..{report['history_len']} items, {report['duration_s']} s or "
        f"{report['max_requests']} requests per level. Load average at start "
        f"{report['load_average']['start']}, at end {report['load_average']['end']}.\n\n"
        "Closed loop: each connection sends its next request when the last answers (saturation). "
        "Open loop: Poisson arrivals at `offered_rate`/s over at most that many connections, "
        "latency counted from each request's scheduled arrival.\n\n"
        f"Target (concurrency 32: >= 100 req/s, p99 <= 100 ms, 0 errors) met in open loop: "
        f"**{report['target_met']}**; in closed loop (>= 150 req/s, 0 errors): "
        f"**{report['closed_loop_target_met']}**\n\n"
    )
    md += md_table(
        report["rows"],
        ["mode", "concurrency", "offered_rate", "requests", "requests_per_s", "p50_ms", "p99_ms",
         "errors"],
    )  # fmt: skip
    path = write_result(f"load-{device}", report, md, out_dir)
    png = plot(report["rows"], path.with_suffix(".png"))
    if png is not None:
        path.with_suffix(".md").write_text(md + f"\n![latency against throughput]({png.name})\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle served (for its item ids)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        default=[1, 8, 32, 128],
        help="closed-loop levels (none: only open-loop levels)",
    )
    p.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[],
        help="open-loop levels: mean arrivals per second (Poisson)",
    )
    p.add_argument("--rate-concurrency", type=int, default=32, help="connections, open loop")
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
    p.add_argument(
        "--client",
        choices=["httpx", "wrk"],
        default="httpx",
        help="load generator: httpx (this process) or wrk (Debian package; duration-bounded)",
    )
    args = p.parse_args(argv)
    if args.client == "wrk" and shutil.which("wrk") is None:
        p.error("--client wrk: the wrk command is not installed (apt-get install wrk)")
    if not args.concurrency and not args.rates:
        p.error("nothing to run: give --concurrency levels, --rates, or both")
    if (
        min(args.concurrency, default=1) < 1
        or min(args.rates, default=1) <= 0
        or args.rate_concurrency < 1
        or args.requests < 1
        or args.duration <= 0
    ):
        p.error("--concurrency, --rates, --rate-concurrency, --requests, --duration: positive")
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
    load_start = os.getloadavg()
    server, rows = asyncio.run(benchmark(args, item_ids))
    device = args.device or server.get("device") or "unknown"
    path = write(make_report(args, server, rows, load_start), args.out, device)
    log.info("wrote %s and %s", path, path.with_suffix(".md"))


def make_report(
    args: argparse.Namespace,
    server: dict[str, Any],
    rows: list[Row],
    load_start: tuple[float, float, float],
) -> dict[str, Any]:
    """The result file's content: header, the bundle's model, the server, the levels."""
    return {
        **header(),
        **model_info(args.bundle),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "server": {
            k: server.get(k)
            for k in (
                "engine",
                "device",
                "dtype",
                "decode_workers",
                "torch_threads",
                "model_version",
                "catalogue_items",
            )
        },
        "url": args.url,
        "client": args.client,
        "k": args.k,
        "history_len": args.history_len,
        "duration_s": args.duration,
        "max_requests": args.requests,
        "rows": [asdict(r) for r in rows],
        "target": TARGET,
        "closed_loop_target": CLOSED_TARGET,
        "target_met": target_met(rows, "open"),
        "closed_loop_target_met": target_met(rows, "closed"),
    }


if __name__ == "__main__":
    main()
