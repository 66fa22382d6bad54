"""Reliability report: schema fuzzing, faults under traffic, and a soak at 80% of capacity.

    python -m benchmarks.reliability --bundle runs/ml [--minutes 30] [--name reliability-cpu]

writes `benchmarks/results/<name>.{json,md}` with `fuzz` = {cases, server_errors,
schema_violations}, `faults` = [{fault, requests, recommend_failures, tokenize_acknowledged,
acknowledged_lost, converge_seconds}], `soak` = {minutes, requests, errors, rss_growth_pct,
p99_ms_first, p99_ms_last, series (per minute)}, `memory` = {rss after /recommend alone and per
/tokenize'd item}, plus command, commit, machine, created_at. Everything runs against real
`letterrec serve` processes (benchmarks/faults.py, shared with tests/service/test_faults.py);
`--parts` runs a subset and keeps the other parts of an existing report of the same name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import RESULTS, header, machine_text, md_header, md_table, write_result
from benchmarks.faults import SCENARIOS, Cluster, Replica, bad_bundle

log = logging.getLogger("benchmarks.reliability")

API_KEY = "reliability-benchmark-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ---- fuzz ------------------------------------------------------------------------------------


def fuzz(url: str, examples: int, seed: int, headers: dict[str, str] | None) -> dict[str, int]:
    """One schemathesis run (all phases but stateful) over the live /openapi.json."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events

    options: dict[str, Any] = {
        "seed": seed,
        "base-url": url,
        "request-timeout": 30,
        "generation": {
            "mode": "all",
            "max-examples": examples,
            "deterministic": True,
            "database": "none",
        },
        "phases": {"stateful": {"enabled": False}},
        "cache": {"enabled": False},
    }
    if headers:
        options["headers"] = headers
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=SchemathesisConfig.from_dict(options)
    )
    out = {"cases": 0, "server_errors": 0, "schema_violations": 0}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                out["cases"] += 1
                status = interaction.response.status_code if interaction.response else 599
                out["server_errors"] += status >= 500 and status != 503
            for checks in event.recorder.checks.values():
                out["schema_violations"] += sum(c.failure_info is not None for c in checks)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            out["schema_violations"] += 1
    return out


def run_fuzz(bundle: Path, workdir: Path, examples: int) -> dict[str, int]:
    env = {"LETTERREC_API_KEYS": API_KEY, "LETTERREC_TORCH_THREADS": "1"}
    env["LETTERREC_WRITE_RATE_PER_S"] = "0"  # the fuzzer writes faster than a client should
    replica = Replica(bundle, None, env, workdir / "fuzz.log").start()
    try:
        replica.wait_ready()
        keyed = fuzz(replica.url, examples, 1, AUTH)
        unkeyed = fuzz(replica.url, examples, 2, None)
    finally:
        replica.stop()
    return {k: keyed[k] + unkeyed[k] for k in keyed}


# ---- faults ------------------------------------------------------------------------------------


def run_faults(bundle: Path, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    cluster = Cluster(bundle, workdir / "cluster", API_KEY)
    try:
        cluster.start()
        for name, scenario in SCENARIOS.items():
            log.info("fault: %s", name)
            result = scenario(cluster)
            if result.notes:
                log.warning("%s: %s", name, result.notes)
            rows.append(result.row())
    finally:
        cluster.close()
    for kind in ("missing", "corrupt"):
        result = bad_bundle(bundle, workdir, kind)
        if result.notes:
            log.warning("bundle_%s: %s", kind, result.notes)
        rows.append(result.row())
    return rows


# ---- soak --------------------------------------------------------------------------------------


def tree_rss_kb(pid: int) -> int:
    """Resident memory of `pid` and its children (the decode child), in KB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


async def _closed_loop(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            r = await c.post(f"{url}/recommend", json={"k": 10, "history": []})
            done += r.status_code == 200

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return done / seconds


class _Paced:
    """An open-loop client at a fixed rate that creates each request when it is due (a soak
    of 30 minutes at 90/s is 160,000 requests: creating them all up front, each sleeping until
    its time, stalls the event loop). Latency counts from the scheduled start, so a late
    client or a queue in the server both show (no coordinated omission)."""

    def __init__(self, url: str, item_ids: list[str], seconds: float) -> None:
        self.url, self.item_ids, self.seconds = url, item_ids, seconds
        self.results: list[tuple[float, float, bool]] = []
        self.acknowledged = 0
        self.rng = np.random.default_rng(0)
        self.start = 0.0
        self.pending: set[asyncio.Task[None]] = set()

    async def one(self, c: httpx.AsyncClient, at: float, tokenize: int | None) -> None:
        try:
            if tokenize is None:
                history = [str(x) for x in self.rng.choice(self.item_ids, size=5)]
                r = await c.post(f"{self.url}/recommend", json={"k": 10, "history": history})
            else:
                item = {"item_id": f"soak-{tokenize}", "title": f"Soak test item {tokenize}"}
                r = await c.post(f"{self.url}/tokenize", json={"items": [item]}, headers=AUTH)
                self.acknowledged += 200 <= r.status_code < 300
            ok = r.status_code < 400
        except httpx.HTTPError:
            ok = False
        self.results.append((at, time.monotonic() - self.start - at, ok))

    async def stream(self, c: httpx.AsyncClient, every_s: float, tokenize: bool) -> None:
        """One request every `every_s` seconds from the start until `seconds`."""
        i = 0
        while (at := i * every_s) < self.seconds:
            await asyncio.sleep(max(0.0, self.start + at - time.monotonic()))
            task = asyncio.create_task(self.one(c, at, i if tokenize else None))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
            i += 1

    async def run(
        self, rate: float, tokenize_every_s: float | None, sample: Any, sample_s: float
    ) -> None:
        """Requests at `rate`/s and a /tokenize every `tokenize_every_s` (None: none);
        `sample()` is called every `sample_s` seconds (memory over time)."""

        async def sampler() -> None:
            while time.monotonic() - self.start < self.seconds:
                sample(time.monotonic() - self.start)
                await asyncio.sleep(sample_s)

        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            self.start = time.monotonic()
            streams = [self.stream(c, 1.0 / rate, False), sampler()]
            if tokenize_every_s is not None:
                streams.append(self.stream(c, tokenize_every_s, True))
            await asyncio.gather(*streams)
            while self.pending:
                await asyncio.gather(*list(self.pending))


def soak_series(
    results: list[tuple[float, float, bool]], rss: list[tuple[float, int]], window_s: float
) -> list[dict[str, float | None]]:
    """Per window of `window_s` seconds (by scheduled start): requests, errors, p50 and p99
    latency (ms) and the last RSS sample (MB) in it."""
    if not results:
        return []
    at = np.array([r[0] for r in results])
    lat = np.array([r[1] for r in results])
    ok = np.array([r[2] for r in results])
    rows = []
    for w in range(int(at.max() // window_s) + 1):
        sel = (at >= w * window_s) & (at < (w + 1) * window_s)
        if not sel.any():
            continue
        mem = [kb for t, kb in rss if t < (w + 1) * window_s]
        minute = (w + 1) * window_s / 60.0
        rows.append(
            {
                "minute": int(minute) if minute.is_integer() else round(minute, 2),
                "requests": int(sel.sum()),
                "errors": int((~ok[sel]).sum()),
                "p50_ms": round(1000.0 * float(np.percentile(lat[sel], 50)), 1),
                "p99_ms": round(1000.0 * float(np.percentile(lat[sel], 99)), 1),
                "rss_mb": round(mem[-1] / 1024.0, 1) if mem else None,
            }
        )
    return rows


@contextmanager
def _measured_replica(
    bundle: Path, workdir: Path, capacity_s: float
) -> Iterator[tuple[str, int, list[str], float]]:
    """One replica (with its decode child and Redis) for the soak and memory parts: its URL,
    server pid, the bundle's item ids and the closed-loop capacity (8 connections, also the
    warm-up) measured first."""
    from models.bundle import Bundle

    item_ids = Bundle.load(bundle).catalogue.item_ids
    cluster = Cluster(bundle, workdir, API_KEY, n=1)
    replica = cluster.replicas[0]
    try:
        cluster.start()
        assert replica.proc is not None
        capacity = asyncio.run(_closed_loop(replica.url, 8, capacity_s))
        yield replica.url, replica.proc.pid, item_ids, capacity
    finally:
        cluster.close()


def run_soak(bundle: Path, workdir: Path, minutes: float, capacity_s: float) -> dict[str, Any]:
    rss: list[tuple[float, int]] = []
    with _measured_replica(bundle, workdir / "soak", capacity_s) as (url, pid, item_ids, capacity):
        rate = 0.8 * capacity
        log.info("capacity %.1f requests/s; soaking at %.1f/s for %g min", capacity, rate, minutes)
        rss_before = tree_rss_kb(pid)
        client = _Paced(url, item_ids, minutes * 60.0)
        asyncio.run(client.run(rate, 1.0, lambda t: rss.append((t, tree_rss_kb(pid))), 10.0))
        rss_after = tree_rss_kb(pid)
    results = client.results
    first = [lat for at, lat, _ in results if at < 60.0]
    last = [lat for at, lat, _ in results if at >= minutes * 60.0 - 60.0]
    return {
        "minutes": minutes,
        "requests": len(results),
        "errors": sum(not ok for _, _, ok in results),
        "rss_mb_start": round(rss_before / 1024.0, 1),
        "rss_mb_end": round(rss_after / 1024.0, 1),
        "rss_growth_pct": round(100.0 * (rss_after - rss_before) / max(1, rss_before), 2),
        "p99_ms_first": round(1000.0 * float(np.percentile(first, 99)), 1),
        "p99_ms_last": round(1000.0 * float(np.percentile(last, 99)), 1),
        "capacity_requests_per_s": round(capacity, 1),
        "rate_requests_per_s": round(rate, 1),
        "tokenize_acknowledged": client.acknowledged,
        "series": soak_series(results, rss, 60.0),
    }


def _memory_item(i: int, prefix: str) -> dict[str, str]:
    """A test item whose text length varies with `i` (1 to 40 extra words): text of every
    length, as a real catalogue has, so that shape-dependent caches show."""
    return {"item_id": f"{prefix}-{i}", "title": f"Memory test item {i}" + " word" * (i % 40)}


async def _tokenize_many(url: str, n: int, prefix: str, dry_run: bool = False) -> int:
    """`n` items through /tokenize one call each, in sequence: how many were acknowledged."""
    ok = 0
    async with httpx.AsyncClient(timeout=60) as c:
        for i in range(n):
            body = {"items": [_memory_item(i, prefix)], "dry_run": dry_run}
            r = await c.post(f"{url}/tokenize", json=body, headers=AUTH)
            ok += 200 <= r.status_code < 300
    return ok


def run_memory(
    bundle: Path, workdir: Path, seconds: float, items: int, capacity_s: float
) -> dict[str, Any]:
    """Where the soak's memory goes, on a fresh server: resident memory (server and decode
    child) after a closed-loop warm-up of /recommend; after `seconds` of /recommend alone at
    80% of capacity (flat if requests leak nothing); after `items` dry-run /tokenize calls of
    texts of every length (encoded and planned, nothing stored: /tokenize's one-time
    allocations); after `items` new items of the same texts (what storing an item
    costs)."""
    with _measured_replica(bundle, workdir / "memory", capacity_s) as (url, pid, ids, capacity):
        warm = tree_rss_kb(pid)
        client = _Paced(url, ids, seconds)
        asyncio.run(client.run(0.8 * capacity, None, lambda t: None, seconds))
        served = tree_rss_kb(pid)
        asyncio.run(_tokenize_many(url, items, "memory", dry_run=True))
        encoded = tree_rss_kb(pid)
        acknowledged = asyncio.run(_tokenize_many(url, items, "memory"))
        grown = tree_rss_kb(pid)
    return {
        "recommend_seconds": seconds,
        "recommend_requests": len(client.results),
        "recommend_errors": sum(not ok for _, _, ok in client.results),
        "rss_mb_warm": round(warm / 1024.0, 1),
        "rss_mb_after_recommend": round(served / 1024.0, 1),
        "recommend_growth_pct": round(100.0 * (served - warm) / max(1, warm), 2),
        "dry_runs": items,
        "rss_mb_after_dry_runs": round(encoded / 1024.0, 1),
        "tokenized_items": acknowledged,
        "rss_mb_after_tokenize": round(grown / 1024.0, 1),
        "kb_per_tokenized_item": round((grown - encoded) / max(1, acknowledged), 1),
    }


def soak_plot(soak: dict[str, Any], path: Path) -> None:
    """Latency (p50, p99) and resident memory per minute of the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = soak["series"]
    x = [r["minute"] for r in series]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(x, [r["p50_ms"] for r in series], label="p50 latency")
    ax.plot(x, [r["p99_ms"] for r in series], label="p99 latency")
    ax.set_xlabel("minute")
    ax.set_ylabel("ms")
    mem = ax.twinx()
    mem.plot(x, [r["rss_mb"] for r in series], color="grey", linestyle="--", label="RSS")
    mem.set_ylabel("RSS of the server and its decode child (MB)")
    mem.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], fontsize=8, loc="upper left")
    ax.set_title(
        f"Soak: {soak['rate_requests_per_s']} requests/s for {soak['minutes']:g} min, "
        f"{soak['errors']} errors"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PARTS = ("fuzz", "faults", "soak", "memory")


def _provenance(report: dict[str, Any]) -> dict[str, Any]:
    where, flags = machine_text(report.get("machine", {}))
    return {
        "commit": report.get("commit"),
        "command": report.get("command"),
        "created_at": report.get("created_at"),
        "machine": f"{where} ({flags})",
    }


def keep_earlier(payload: dict[str, Any], parts: set[str], earlier: Path) -> dict[str, Any]:
    """The report of the `parts` run now, plus the other parts of an earlier report at the same
    path as they were; `parts` maps each part to the commit, command, time and machine that
    measured it."""
    now = _provenance(payload)
    payload["parts"] = {p: now for p in sorted(parts)}
    if earlier.exists():
        old = json.loads(earlier.read_text())
        for p in sorted(set(PARTS) - parts):
            if p in old:
                payload[p] = old[p]
                kept = old.get("parts", {}).get(p)
                payload["parts"][p] = kept if isinstance(kept, dict) else _provenance(old)
    return payload


# ---- report ------------------------------------------------------------------------------------


def markdown(payload: dict[str, Any]) -> str:
    text = md_header("Reliability", payload)
    if payload.get("parts"):
        text += "Each part, as measured:\n\n" + md_table(
            [
                {"part": p, **{k: v or "" for k, v in prov.items()}}
                for p, prov in payload["parts"].items()
            ],
            ["part", "command", "commit", "created_at", "machine"],
        )
        text += "\n"
    if "fuzz" in payload:
        f = payload["fuzz"]
        text += (
            f"## Schema fuzzing\n\n{f['cases']} cases: {f['server_errors']} server errors, "
            f"{f['schema_violations']} schema violations.\n\n"
        )
    if "faults" in payload:
        cols = [
            "fault",
            "requests",
            "recommend_failures",
            "tokenize_acknowledged",
            "acknowledged_lost",
            "converge_seconds",
        ]
        text += "## Faults under traffic\n\n" + md_table(payload["faults"], cols) + "\n"
    if "soak" in payload:
        s = payload["soak"]
        text += (
            f"## Soak\n\n{s['minutes']} minutes at {s['rate_requests_per_s']} requests/s (80% of "
            f"{s['capacity_requests_per_s']}/s measured), /tokenize once a second: "
            f"{s['requests']} requests, {s['errors']} errors, RSS growth {s['rss_growth_pct']}%, "
            f"p99 {s['p99_ms_first']} ms in the first minute, {s['p99_ms_last']} ms in the last "
            f"(RSS {s.get('rss_mb_start')} MB -> {s.get('rss_mb_end')} MB).\n\n"
        )
        if s.get("series"):
            cols = ["minute", "requests", "errors", "p50_ms", "p99_ms", "rss_mb"]
            text += "Per minute:\n\n" + md_table(s["series"], cols)
    if "memory" in payload:
        m = payload["memory"]
        text += (
            "\n## Where the memory goes\n\nOn a fresh server after a closed-loop warm-up of "
            f"/recommend, the server and its decode child hold {m['rss_mb_warm']} MB; "
            f"{m['recommend_seconds']:g} s of /recommend alone ({m['recommend_requests']} "
            f"requests, {m['recommend_errors']} errors) leave {m['rss_mb_after_recommend']} MB "
            f"({m['recommend_growth_pct']:+}%). {m['dry_runs']} dry-run /tokenize calls (texts of "
            "1 to 40 extra words, encoded and planned, nothing stored) take it to "
            f"{m['rss_mb_after_dry_runs']} MB: the /tokenize path's one-time allocations (the "
            "text encoder's buffers and caches, its worker threads' memory), which do not grow "
            f"with the number of items. {m['tokenized_items']} new items "
            f"of the same texts then add {m['kb_per_tokenized_item']} KB each "
            f"({m['rss_mb_after_tokenize']} MB): what storing an item costs.\n"
        )
    if payload.get("notes"):
        text += "\n## Notes\n\n" + payload["notes"] + "\n"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=30.0, help="soak duration")
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--fuzz-examples", type=int, default=200, help="per operation and run")
    parser.add_argument("--memory-seconds", type=float, default=120.0)
    parser.add_argument("--memory-items", type=int, default=1000)
    parser.add_argument("--parts", default="fuzz,faults,soak,memory")
    parser.add_argument("--name", default="reliability-cpu")
    parser.add_argument("--notes", default="", help="markdown appended to the report")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose among {', '.join(PARTS)}")
    payload = keep_earlier(header(), parts, args.results / f"{args.name}.json")
    if args.notes:
        payload["notes"] = args.notes
    with tempfile.TemporaryDirectory(prefix="letterrec-reliability-") as tmp:
        work = Path(tmp)
        if "fuzz" in parts:
            payload["fuzz"] = run_fuzz(args.bundle, work, args.fuzz_examples)
        if "faults" in parts:
            payload["faults"] = run_faults(args.bundle, work)
        if "soak" in parts:
            payload["soak"] = run_soak(args.bundle, work, args.minutes, args.capacity_seconds)
        if "memory" in parts:
            payload["memory"] = run_memory(
                args.bundle, work, args.memory_seconds, args.memory_items, args.capacity_seconds
            )
    path = write_result(args.name, payload, markdown(payload), args.results)
    if payload.get("soak", {}).get("series"):
        soak_plot(payload["soak"], args.results / f"{args.name}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
