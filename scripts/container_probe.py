"""Black-box probes of the running containers, for scripts/container_check.sh.

    python scripts/container_probe.py single --container NAME --bundle DIR --key KEY --work DIR
    python scripts/container_probe.py compose --project P --key KEY --ports A,B --prometheus-port N
    python scripts/container_probe.py free-port [--consecutive N]

`single` probes one container of the CPU image with a bundle baked in, over HTTP and through the
Docker CLI only: /readyz goes 200; /recommend answers what `letterrec serve` on the host answers
for the same bundle (same items in the same order, same scores); /tokenize refuses a missing or
wrong key and accepts the right one; /metrics has the request-latency histogram; the server runs
as uid 10001 on a read-only root filesystem; SIGTERM lets every in-flight request finish and the
container exits 0. It stops the container (the last check).

`compose` probes the stack of docker/compose.yaml: both replicas are ready on their published
ports and share Redis (an item tokenized on one is served by the other), Redis runs with AOF,
and Prometheus scrapes both replicas (its targets API says up).

Each check prints one line; the first failure exits 1 with what was expected and what came.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVER_UID = 10001
LATENCY_HISTOGRAM = "letterrec_http_request_duration_seconds"
# Scores are sums of log-probabilities from the same weights on the same CPU; only the order of
# float additions (threads, batch shapes, native kernels vs torch ops) may differ.
SCORE_TOLERANCE = 1e-4


class ProbeFailed(Exception):
    pass


def passed(what: str) -> None:
    print(f"  ok  {what}", flush=True)


def check(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        raise ProbeFailed(f"{what}: {detail}" if detail else what)
    passed(what)


def docker(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise ProbeFailed(f"docker {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout.strip()


def free_port(consecutive: int = 1) -> int:
    """A port P on 127.0.0.1 such that P .. P+consecutive-1 are all free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + consecutive > 65535:
            continue
        try:
            for port in range(first, first + consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise ProbeFailed(f"no {consecutive} consecutive free ports found")


def wait_until(what: str, cond: Callable[[], bool], seconds: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(every)
    raise ProbeFailed(f"{what}: not within {seconds:.0f} s")


def wait_ready(base: str, seconds: float, alive: Callable[[], None] | None = None) -> None:
    def ready() -> bool:
        if alive is not None:
            alive()
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

    wait_until(f"{base}/readyz answers 200", ready, seconds)
    body = httpx.get(f"{base}/readyz", timeout=5).json()
    check(body.get("ready") is True, f"{base}/readyz is 200, ready", json.dumps(body))


# -------------------------------------------------------------------------------------------------
# single container


def container_ip(name: str) -> str:
    ips = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name)
    if not ips.split():
        raise ProbeFailed(f"container {name} has no IP address (is it running?)")
    return ips.split()[0]


def container_alive(name: str) -> Callable[[], None]:
    def alive() -> None:
        state = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name)
        if not state.startswith("running"):
            logs = subprocess.run(
                ["docker", "logs", "--tail", "30", name], capture_output=True, text=True
            ).stderr
            raise ProbeFailed(f"container {name} is {state}:\n{logs}")

    return alive


def recommend_requests(bundle: Path) -> list[dict[str, Any]]:
    """Histories of real catalogue items, with and without the options that change the answer."""
    import pyarrow.parquet as pq

    ids = [
        str(i)
        for i in pq.read_table(bundle / "catalogue.parquet", columns=["item_id"])
        .column("item_id")
        .to_pylist()
    ]
    return [
        {"history": ids[0:3], "k": 10},
        {"history": ids[10:20], "k": 20},
        {"history": ids[5:6], "k": 5, "exclude_history": False},
        {"history": ids[40:45], "k": 10, "exclude": ids[0:10]},
        {"history": [], "k": 10},
    ]


class HostServer:
    """`letterrec serve` on the host for the same bundle: the reference answers."""

    def __init__(self, bundle: Path, key: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "LETTERREC_API_KEYS": key,
            "LETTERREC_DEVICE": "cpu",
            "LETTERREC_ENGINE": "torch",
            "LETTERREC_TORCH_THREADS": "1",
        }
        env.pop("LETTERREC_REDIS_URL", None)
        self.log = log
        letterrec = Path(sys.executable).parent / "letterrec"
        self.proc = subprocess.Popen(
            [str(letterrec), "serve", "--bundle", str(bundle), "--port", str(self.port)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProbeFailed(
                f"letterrec serve on the host exited {self.proc.returncode}:\n"
                f"{self.log.read_text()[-3000:]}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def compare_recommendations(base: str, host: str, requests: list[dict[str, Any]]) -> None:
    worst = 0.0
    for body in requests:
        got = httpx.post(f"{base}/recommend", json=body, timeout=60)
        want = httpx.post(f"{host}/recommend", json=body, timeout=60)
        if not got.status_code == want.status_code == 200:
            raise ProbeFailed(
                f"/recommend {body}: container {got.status_code} {got.text[:300]}, "
                f"host {want.status_code} {want.text[:300]}"
            )
        g, w = got.json()["items"], want.json()["items"]
        g_ids, w_ids = [i["item_id"] for i in g], [i["item_id"] for i in w]
        if g_ids != w_ids:
            raise ProbeFailed(f"/recommend {body}: container items {g_ids} != host items {w_ids}")
        if len(g_ids) != body["k"]:
            raise ProbeFailed(f"/recommend {body}: {len(g_ids)} items, asked for {body['k']}")
        for a, b in zip(g, w, strict=True):
            diff = abs(a["score"] - b["score"])
            if not math.isfinite(a["score"]) or diff > SCORE_TOLERANCE * max(1.0, abs(b["score"])):
                raise ProbeFailed(
                    f"/recommend {body}: {a['item_id']} scores {a['score']} in the "
                    f"container, {b['score']} on the host"
                )
            worst = max(worst, diff)
    passed(
        f"/recommend equals `letterrec serve` on the host: {len(requests)} requests, same "
        f"items in the same order, max score difference {worst:.2e}",
    )


def check_tokenize(base: str, key: str) -> str:
    item = {
        "item_id": "probe-new-1",
        "title": "Probe Coffee Roasters",
        "description": "coffee, local, 5 stars",
    }
    body = {"items": [item]}
    r = httpx.post(f"{base}/tokenize", json=body, timeout=60)
    check(r.status_code == 401, "/tokenize without a key is 401", f"{r.status_code} {r.text[:200]}")
    r = httpx.post(
        f"{base}/tokenize",
        json=body,
        timeout=60,
        headers={"Authorization": "Bearer not-the-key-0123456789"},
    )
    check(r.status_code == 401, "/tokenize with a wrong key is 401", f"{r.status_code}")
    r = httpx.post(
        f"{base}/tokenize", json=body, timeout=120, headers={"Authorization": f"Bearer {key}"}
    )
    check(
        r.status_code == 200 and r.json()["items"][0]["status"] == "created",
        "/tokenize with the key is 200, item created",
        f"{r.status_code} {r.text[:300]}",
    )
    return str(r.json()["items"][0]["item_id"])


def check_metrics(base: str) -> None:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    buckets = [
        ln
        for ln in text.splitlines()
        if ln.startswith(f"{LATENCY_HISTOGRAM}_bucket{{") and 'route="/recommend"' in ln
    ]
    check(
        bool(buckets) and f"# TYPE {LATENCY_HISTOGRAM} histogram" in text,
        f"/metrics has the histogram {LATENCY_HISTOGRAM} with /recommend buckets",
        text[:500],
    )


def check_user_and_filesystem(name: str) -> None:
    status = docker("exec", name, "cat", "/proc/1/status")
    uids = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:"))
    gids = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("Gid:"))
    check(
        set(uids) == {str(SERVER_UID)} and set(gids) == {str(SERVER_UID)},
        f"the server (pid 1) runs as uid/gid {SERVER_UID}",
        f"Uid {uids} Gid {gids}",
    )
    cmdline = docker("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ")
    check("letterrec serve" in cmdline, "pid 1 is `letterrec serve`", cmdline)
    check(
        docker("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", name) == "true",
        "the container's root filesystem is read-only",
    )
    # As root inside the container, so that only the mount, not permissions, can refuse.
    out = subprocess.run(
        ["docker", "exec", "-u", "0", name, "touch", "/opt/venv/probe"],
        capture_output=True,
        text=True,
    )
    check(
        out.returncode != 0 and "Read-only file system" in out.stderr,
        "writing under / fails with 'Read-only file system', even as root",
        out.stderr,
    )
    docker("exec", name, "touch", "/tmp/probe")
    passed("/tmp (tmpfs) is writable by the server's user")


def check_sigterm_drains(base: str, name: str, bundle: Path) -> None:
    """Requests in flight when SIGTERM arrives all finish with 200; then the process exits 0.

    The container runs with LETTERREC_MAX_WAIT_MS=1000: a batch of fewer than max_batch_size
    requests waits a second for company before it decodes, so requests sent together are still
    queued when the signal lands a fraction of that later, however fast the machine."""
    histories = [r["history"] for r in recommend_requests(bundle)]
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/recommend", {"history": histories[i % len(histories)], "k": 10}) for i in range(8)
    ] + [
        ("/recommend/batch", {"requests": [{"history": h, "k": 5} for h in histories] * 3})
        for _ in range(2)
    ]
    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()
    sent = threading.Barrier(len(bodies) + 1)

    def send(route: str, body: dict[str, Any]) -> None:
        with httpx.Client(timeout=120) as client:
            client.get(f"{base}/healthz")  # the connection is open before the clock starts
            sent.wait()
            try:
                outcome: int | str = client.post(f"{base}{route}", json=body).status_code
            except httpx.HTTPError as err:
                outcome = f"{type(err).__name__}: {err}"
        with lock:
            results.append((outcome, time.monotonic()))

    threads = [threading.Thread(target=send, args=rb) for rb in bodies]
    for t in threads:
        t.start()
    sent.wait(timeout=30)
    time.sleep(0.3)  # every request received and queued, none decoded yet (1 s wait)
    signalled = time.monotonic()
    docker("kill", "--signal", "TERM", name)
    for t in threads:
        t.join(timeout=180)
    exit_code = docker("wait", name, timeout=120)
    n = len(bodies)
    after = [t for _, t in results if t > signalled]
    bad = [o for o, _ in results if o != 200]
    check(
        len(results) == n and not bad,
        f"SIGTERM with {n} requests in flight: all {n} answered 200",
        f"{len(results)} answered, not 200: {bad[:5]}",
    )
    check(
        len(after) == n,
        f"all {n} finished after SIGTERM (they were in flight when it arrived)",
        f"{n - len(after)} finished before the signal",
    )
    check(exit_code == "0", "the container exited 0 after draining", f"exit code {exit_code}")
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
    check(
        "Finished server process" in logs.stdout + logs.stderr,
        "the server logged a clean shutdown",
        (logs.stdout + logs.stderr)[-1500:],
    )


def probe_single(args: argparse.Namespace) -> None:
    name, bundle = args.container, Path(args.bundle)
    base = f"http://{container_ip(name)}:8000"
    print(f"single container {name} at {base}", flush=True)
    t = time.monotonic()
    wait_ready(base, 300, container_alive(name))
    print(f"  ..  ready {time.monotonic() - t:.0f} s after the probe started", flush=True)
    host = HostServer(bundle, args.key, Path(args.work) / "host-serve.log")
    try:
        wait_ready(host.base, 300, host.alive)
        compare_recommendations(base, host.base, recommend_requests(bundle))
    finally:
        host.stop()
    item_id = check_tokenize(base, args.key)
    r = httpx.get(f"{base}/items/{item_id}", timeout=10)
    check(
        r.status_code == 200 and r.json()["source"] == "tokenized",
        "GET /items/{id} serves the tokenized item",
        f"{r.status_code} {r.text[:200]}",
    )
    check_metrics(base)
    check_user_and_filesystem(name)
    check_sigterm_drains(base, name, bundle)


# -------------------------------------------------------------------------------------------------
# compose stack


def compose_containers(project: str, service: str) -> list[str]:
    out = docker(
        "ps",
        "-q",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    )
    return out.split()


def published_port(container: str, port: int) -> int:
    out = docker("port", container, f"{port}/tcp")
    return int(out.splitlines()[0].rsplit(":", 1)[1])


def probe_compose(args: argparse.Namespace) -> None:
    project = args.project
    expected_ports = {int(p) for p in args.ports.split(",")}
    replicas = compose_containers(project, "letterrec")
    check(
        len(replicas) == len(expected_ports),
        f"{len(expected_ports)} letterrec replicas run",
        f"found {len(replicas)}",
    )
    ports = {c: published_port(c, 8000) for c in replicas}
    check(
        set(ports.values()) == expected_ports,
        f"each replica is published on its own port {sorted(expected_ports)}",
        str(ports),
    )
    bases = [f"http://127.0.0.1:{p}" for p in sorted(ports.values())]
    for base in bases:
        wait_ready(base, 300)
        body = httpx.get(f"{base}/readyz", timeout=5).json()
        check(
            body["checks"].get("store_reachable") is True, f"{base} reaches Redis", json.dumps(body)
        )
    first, second = bases
    item = {
        "item_id": f"compose-probe-{os.getpid()}",
        "title": "Probe Tea House",
        "description": "tea, local, 4 stars",
    }
    r = httpx.post(
        f"{first}/tokenize",
        json={"items": [item]},
        timeout=120,
        headers={"Authorization": f"Bearer {args.key}"},
    )
    check(r.status_code == 200, f"/tokenize on {first} is 200", f"{r.status_code} {r.text[:300]}")
    codes = r.json()["items"][0]["codes"]

    def visible() -> bool:
        got = httpx.get(f"{second}/items/{item['item_id']}", timeout=5)
        return got.status_code == 200 and got.json()["codes"] == codes

    wait_until(f"the item tokenized on {first} is served by {second}", visible, 30)
    passed(f"the item tokenized on {first} is served by {second} with the same codes {codes}")
    r = httpx.post(
        f"{second}/tokenize",
        json={"items": [item]},
        timeout=120,
        headers={"Authorization": f"Bearer {args.key}"},
    )
    check(
        r.status_code == 200 and r.json()["items"][0]["status"] == "existing",
        f"{second} knows the item as existing (one shared catalogue)",
        r.text[:300],
    )

    (redis,) = compose_containers(project, "redis")
    aof = docker("exec", redis, "redis-cli", "CONFIG", "GET", "appendonly").split()
    check(aof == ["appendonly", "yes"], "Redis runs with AOF (appendonly yes)", str(aof))
    check("appendonly" in docker("exec", redis, "ls", "/data"), "the AOF lives on the /data volume")

    prom = f"http://127.0.0.1:{args.prometheus_port}"
    state: dict[str, Any] = {}

    def scraped() -> bool:
        targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        mine = [t for t in targets if t["labels"].get("job") == "letterrec"]
        state["targets"] = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in mine]
        return len(mine) == len(bases) and all(t["health"] == "up" for t in mine)

    try:
        wait_until("Prometheus scrapes every replica", scraped, 90, every=2)
    except ProbeFailed as err:
        raise ProbeFailed(f"{err}: targets {state.get('targets')}") from None
    passed(f"Prometheus scrapes both replicas, up: {[t[0] for t in state['targets']]}")

    def ready_series() -> bool:
        q = httpx.get(
            f"{prom}/api/v1/query", params={"query": "sum(letterrec_ready)"}, timeout=5
        ).json()
        result = q["data"]["result"]
        return bool(result) and float(result[0]["value"][1]) == len(bases)

    wait_until("Prometheus has letterrec_ready from every replica", ready_series, 60, every=2)
    passed(f"Prometheus: sum(letterrec_ready) == {len(bases)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("single")
    s.add_argument("--container", required=True)
    s.add_argument("--bundle", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--work", required=True, help="folder for the host server's log")
    c = sub.add_parser("compose")
    c.add_argument("--project", required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--ports", required=True, help="the replicas' published ports, A,B")
    c.add_argument("--prometheus-port", required=True, type=int)
    f = sub.add_parser("free-port")
    f.add_argument("--consecutive", type=int, default=1)
    args = parser.parse_args()
    try:
        if args.cmd == "single":
            probe_single(args)
        elif args.cmd == "compose":
            probe_compose(args)
        else:
            print(free_port(args.consecutive))
    except ProbeFailed as err:
        print(f"  FAIL {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
