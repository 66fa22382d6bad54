"""Fault injection with real processes, shared by the fault tests (tests/service/test_faults.py)
and the reliability benchmark (benchmarks/reliability.py), so both exercise the same faults and
check the same invariants. It lives beside the benchmark, not under tests/: benchmarks never
import from tests/, and the tests may import from here.

Real `redis-server` (AOF, fsync always), real `letterrec serve` replicas as subprocesses (each
with its decode child), a steady request stream (`Traffic`), and one fake: `DelayProxy`, a TCP
proxy between the replicas and Redis that delays the bytes it forwards (a slow Redis or
network). Each scenario of `SCENARIOS` injects one fault under traffic, recovers, and returns a
`FaultResult`; `check_converged` is the invariant every scenario ends with: every /tokenize that
was answered 2xx is on every replica, with the acknowledged codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.02
) -> float:
    """Seconds until `predicate()` held; TimeoutError naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(step_s)
    return time.monotonic() - start


class DelayProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, each chunk held `reply_delay_s` (server to
    client) or `request_delay_s` (client to server) after it arrived. Delays are latency, not
    throughput: chunks keep their order and do not queue behind each other's sleeps. Runs its
    own event loop in a thread; the delays can be changed at any time."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.reply_delay_s = 0.0
        self.request_delay_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        up = asyncio.create_task(self._pipe(client_r, server_w, lambda: self.request_delay_s))
        down = asyncio.create_task(self._pipe(server_r, client_w, lambda: self.reply_delay_s))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy is stopping
        finally:
            for task in (up, down):
                task.cancel()
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Callable[[], float]
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    writer.write_eof()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(forward())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + delay(), chunk))
                if not chunk:
                    break
            await sender
        except (OSError, asyncio.CancelledError):
            sender.cancel()


# ---- processes ------------------------------------------------------------------------------


class RedisProc:
    """A real redis-server with the append-only file on and fsync'd at every write, so a full
    restart (Redis and every replica) keeps every acknowledged write."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self.ping, timeout_s, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)


class Replica:
    """`letterrec serve` as an operator runs it (a subprocess, its decode child included)."""

    def __init__(self, bundle: Path, redis_url: str | None, env: dict[str, str], log: Path) -> None:
        self.bundle = bundle
        self.redis_url = redis_url
        self.env = env
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        env = {**os.environ, **self.env}
        if self.redis_url:
            env["LETTERREC_REDIS_URL"] = self.redis_url
        cli = Path(sys.executable).with_name("letterrec")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(cli), "serve", "--bundle", str(self.bundle), "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 240.0) -> float:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"replica exited ({self.proc.returncode}); see {self.log}")
            return self.ready()

        return wait_for(up, timeout_s, f"replica on port {self.port} ready", 0.1)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def decode_children(self) -> list[int]:
        """The pids of the replica's decode children (multiprocessing spawn children)."""
        assert self.proc is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid), "-f", "spawn_main"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if not out:
            raise RuntimeError(f"no decode child of {self.proc.pid}")
        return sorted(int(pid) for pid in out)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


# ---- traffic ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the request stream saw while one fault was injected."""

    recommend: int = 0
    recommend_failed: list[str] = field(default_factory=list)
    tokenize: int = 0
    tokenize_refused: int = 0
    acknowledged: dict[str, list[int]] = field(default_factory=dict)
    """item_id -> codes of every /tokenize answered 2xx."""


class Traffic:
    """A steady stream: /recommend every `recommend_every_s` to the live replicas in turn and
    /tokenize of a fresh item every `tokenize_every_s`, each from its own thread. `replicas()`
    names the replicas a load balancer would route to at that moment (the scenario marks a
    killed replica out, as a readiness probe would)."""

    def __init__(
        self,
        replicas: Callable[[], list[Replica]],
        api_key: str,
        recommend_every_s: float = 0.05,
        tokenize_every_s: float = 0.25,
        prefix: str = "fault",
    ) -> None:
        self.replicas = replicas
        self.auth = {"Authorization": f"Bearer {api_key}"}
        self.recommend_every_s = recommend_every_s
        self.tokenize_every_s = tokenize_every_s
        self.prefix = prefix
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.tally = Tally()
        self.acknowledged_total: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[Tally]:
        """Traffic while the block runs; the tally of that stretch."""
        self.tally = Tally()
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._recommend_loop, daemon=True),
            threading.Thread(target=self._tokenize_loop, daemon=True),
        ]
        for t in self._threads:
            t.start()
        try:
            yield self.tally
        finally:
            self._stop.set()
            for t in self._threads:
                t.join(60)
            self.acknowledged_total.update(self.tally.acknowledged)

    def _paced(self, every_s: float) -> Iterator[int]:
        n = 0
        start = time.monotonic()
        while not self._stop.is_set():
            yield n
            n += 1
            self._stop.wait(max(0.0, start + n * every_s - time.monotonic()))

    def _recommend_loop(self) -> None:
        with httpx.Client(timeout=60) as c:
            for n in self._paced(self.recommend_every_s):
                live = self.replicas()
                if not live:
                    continue
                target = live[n % len(live)]
                self.tally.recommend += 1
                try:
                    r = c.post(f"{target.url}/recommend", json={"k": 5})
                    failure = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    failure = repr(e)
                # A request in flight to a replica killed under it fails with its process (no
                # trie answered it); a load balancer retries it elsewhere. Not a failure of a
                # replica that could answer.
                if failure is not None and target in self.replicas():
                    self.tally.recommend_failed.append(failure)

    def _tokenize_loop(self) -> None:
        with httpx.Client(timeout=60) as c:
            for n in self._paced(self.tokenize_every_s):
                live = self.replicas()
                if not live:
                    continue
                target = live[n % len(live)]
                item_id = f"{self.prefix}-{next(self._ids)}"
                body = {"items": [{"item_id": item_id, "title": f"New place number {item_id}"}]}
                self.tally.tokenize += 1
                try:
                    r = c.post(f"{target.url}/tokenize", json=body, headers=self.auth)
                except httpx.HTTPError:
                    self.tally.tokenize_refused += 1  # no answer: not acknowledged
                    continue
                if 200 <= r.status_code < 300:
                    self.tally.acknowledged[item_id] = r.json()["items"][0]["codes"]
                else:
                    self.tally.tokenize_refused += 1


def _present(c: httpx.Client, item_id: str, codes: list[int]) -> bool:
    r = c.get(f"/items/{item_id}")
    return r.status_code == 200 and r.json()["codes"] == codes


def check_converged(
    replicas: list[Replica],
    acknowledged: dict[str, list[int]],
    timeout_s: float,
    recent: dict[str, list[int]] | None = None,
) -> tuple[float, list[str]]:
    """(seconds until every replica served every `recent` acknowledged item (default: all),
    acknowledged items still missing on some replica after `timeout_s`: the writes lost).
    Each (replica, item) is checked until it is seen once (items are never deleted), so the
    time measured is that of the last arrival plus one cheap poll, not of a full sweep."""
    start = time.monotonic()
    clients = [httpx.Client(base_url=r.url, timeout=10) for r in replicas]
    try:
        todo = recent if recent is not None else acknowledged
        pending = {(k, i) for k in range(len(clients)) for i in todo}
        while pending and time.monotonic() - start <= timeout_s:
            pending = {(k, i) for k, i in pending if not _present(clients[k], i, todo[i])}
            if pending:
                time.sleep(0.02)
        seconds = time.monotonic() - start
        missing = {i for _, i in pending}
        for c in clients:  # then everything ever acknowledged, once
            missing |= {i for i, codes in acknowledged.items() if not _present(c, i, codes)}
        return seconds, sorted(missing)
    finally:
        for c in clients:
            c.close()


def probes(replica: Replica) -> tuple[int, int, dict[str, Any]]:
    """(/healthz status, /readyz status, /readyz body)."""
    h = httpx.get(f"{replica.url}/healthz", timeout=5)
    r = httpx.get(f"{replica.url}/readyz", timeout=5)
    return h.status_code, r.status_code, r.json()


# ---- the cluster and its faults ------------------------------------------------------------


@dataclass
class FaultResult:
    """One row of the reliability report (its JSON shape is a public contract)."""

    fault: str
    requests: int
    recommend_failures: int
    tokenize_acknowledged: int
    acknowledged_lost: int
    converge_seconds: float
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("notes")
        return d


REPLICA_ENV = {
    "LETTERREC_TORCH_THREADS": "1",
    "LETTERREC_SYNC_INTERVAL_S": "0.1",
    "LETTERREC_REDIS_TIMEOUT_S": "0.5",
    "LETTERREC_DECODE_TIMEOUT_S": "2",
    "LETTERREC_WRITE_RATE_PER_S": "0",
    "LETTERREC_LOG_LEVEL": "warning",
}


class Cluster:
    """Redis (behind a `DelayProxy`) and `n` replicas of one bundle."""

    def __init__(self, bundle: Path, workdir: Path, api_key: str, n: int = 2) -> None:
        self.bundle = bundle
        self.workdir = workdir
        self.api_key = api_key
        self.redis = RedisProc(workdir / "redis")
        self.redis.start()
        self.proxy = DelayProxy(self.redis.port).start()
        env = {**REPLICA_ENV, "LETTERREC_API_KEYS": api_key}
        # Replica 0 decodes in a child process (the default, and the decode-child faults'
        # target); the others in process, which starts faster (no second torch import).
        self.replicas = [
            Replica(
                bundle,
                self.proxy.url,
                env if i == 0 else {**env, "LETTERREC_DECODE_PROCESS": "0"},
                workdir / f"replica-{i}.log",
            )
            for i in range(n)
        ]
        self.down: set[int] = set()
        self.traffic = Traffic(self.routable, api_key)

    def routable(self) -> list[Replica]:
        return [r for i, r in enumerate(self.replicas) if i not in self.down]

    def start(self) -> None:
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready()

    def close(self) -> None:
        for r in self.replicas:
            r.stop()
        self.proxy.stop()
        self.redis.stop()

    def converge(self, timeout_s: float = 10.0) -> tuple[float, list[str]]:
        """Convergence on what the running stretch acknowledged, then a check of all."""
        everything = {**self.traffic.acknowledged_total, **self.traffic.tally.acknowledged}
        return check_converged(
            self.routable(), everything, timeout_s, dict(self.traffic.tally.acknowledged)
        )


def _result(name: str, tally: Tally, converge: tuple[float, list[str]]) -> FaultResult:
    seconds, missing = converge
    return FaultResult(
        fault=name,
        requests=tally.recommend + tally.tokenize,
        recommend_failures=len(tally.recommend_failed),
        tokenize_acknowledged=len(tally.acknowledged),
        acknowledged_lost=len(missing),
        converge_seconds=round(seconds, 3),
        notes=[*tally.recommend_failed[:5], *(f"lost {m}" for m in missing[:5])],
    )


def _redis_reachable_everywhere(cluster: Cluster, timeout_s: float = 10.0) -> None:
    def healthy() -> bool:
        return all(not probes(r)[2].get("degraded") for r in cluster.replicas)

    wait_for(healthy, timeout_s, "every replica reaching Redis again", 0.05)


def _check_probes(cluster: Cluster, degraded_ok: bool) -> list[str]:
    """/healthz 200 and /readyz 200 on every routable replica (degraded allowed or not)."""
    bad = []
    for r in cluster.routable():
        h, ready, body = probes(r)
        if h != 200 or ready != 200 or (body.get("degraded") and not degraded_ok):
            bad.append(f"{r.url}: healthz {h}, readyz {ready} {body.get('degraded')}")
    return bad


def redis_outage(cluster: Cluster, name: str, hold_s: float = 1.5) -> FaultResult:
    """Redis killed (SIGKILL, then restarted from its AOF), paused (SIGSTOP/SIGCONT) or
    restarted (SIGTERM, then started again)."""
    with cluster.traffic.running() as tally:
        time.sleep(0.5)
        if name == "redis_killed":
            cluster.redis.kill()
        elif name == "redis_paused":
            cluster.redis.signal(signal.SIGSTOP)
        else:
            cluster.redis.stop()
        time.sleep(hold_s)
        probe_errors = _check_probes(cluster, degraded_ok=True)
        if name == "redis_paused":
            cluster.redis.signal(signal.SIGCONT)
        else:
            cluster.redis.start()
        _redis_reachable_everywhere(cluster)
        converged = cluster.converge()
        time.sleep(0.3)
    result = _result(name, tally, converged)
    result.notes += probe_errors
    return result


def redis_slow(cluster: Cluster, delay_s: float = 0.8, hold_s: float = 2.0) -> FaultResult:
    """Every Redis answer delayed past the replicas' socket timeout (0.5 s), then not."""
    with cluster.traffic.running() as tally:
        time.sleep(0.5)
        cluster.proxy.reply_delay_s = delay_s
        time.sleep(hold_s)
        probe_errors = _check_probes(cluster, degraded_ok=True)
        cluster.proxy.reply_delay_s = 0.0
        time.sleep(delay_s)  # answers already in the proxy arrive late once more
        _redis_reachable_everywhere(cluster)
        converged = cluster.converge()
        time.sleep(0.3)
    result = _result("redis_slow", tally, converged)
    result.notes += probe_errors
    return result


def decode_child_fault(cluster: Cluster, name: str) -> FaultResult:
    """A decode child of replica 0 killed (SIGKILL: the replica starts a new one at once), or
    every decode child hung (SIGSTOP: whichever takes the next batch is killed after
    LETTERREC_DECODE_TIMEOUT_S and the batch decoded again on a new one; the others are let go
    once that happened)."""
    replica = cluster.replicas[0]
    with cluster.traffic.running() as tally:
        time.sleep(0.5)
        children = replica.decode_children()
        targets = children[:1] if name == "decode_child_killed" else children
        for pid in targets:
            os.kill(pid, signal.SIGKILL if name == "decode_child_killed" else signal.SIGSTOP)

        def replaced() -> bool:
            try:
                now = replica.decode_children()
            except RuntimeError:
                return False
            return len(now) >= len(children) and not set(targets) <= set(now)

        wait_for(replaced, 120, "a new decode child", 0.1)
        for pid in targets:  # hung children that no batch reached: let them go on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        probe_errors = _check_probes(cluster, degraded_ok=False)
        converged = cluster.converge()
        time.sleep(0.5)
    result = _result(name, tally, converged)
    result.notes += probe_errors
    return result


def replica_killed(cluster: Cluster, restart: bool = True) -> FaultResult:
    """Replica 1 killed (SIGKILL) while /tokenize calls are in flight, taken out of routing as
    its readiness probe would, then (with `restart`) started again: it must come back with every
    item acknowledged meanwhile, and nothing it acknowledged may be lost."""
    victim = 1
    with cluster.traffic.running() as tally:
        time.sleep(0.6)
        cluster.down.add(victim)
        cluster.replicas[victim].kill()
        if not restart:
            time.sleep(1.0)  # writes go on elsewhere while it is gone
            return _result("replica_killed", tally, (0.0, []))
        cluster.replicas[victim].start()
        cluster.replicas[victim].wait_ready()
        cluster.down.discard(victim)
        converged = cluster.converge()
        time.sleep(0.3)
    return _result("replica_killed", tally, converged)


def full_restart(cluster: Cluster, start: list[int] | None = None) -> FaultResult:
    """Everything killed at once (Redis with SIGKILL, every replica), then Redis and the
    replicas `start` (default: all) started again: every acknowledged item comes back, from
    Redis' append-only file."""
    with cluster.traffic.running() as tally:
        time.sleep(0.5)
    for r in cluster.replicas:
        r.kill()
    cluster.redis.kill()
    cluster.redis.start()
    back = list(range(len(cluster.replicas))) if start is None else start
    cluster.down = set(range(len(cluster.replicas))) - set(back)
    for i in back:
        cluster.replicas[i].start()
    for i in back:
        cluster.replicas[i].wait_ready()
    seconds, missing = check_converged(cluster.routable(), cluster.traffic.acknowledged_total, 10.0)
    return _result("full_restart_aof", tally, (seconds, missing))


def bad_bundle(bundle: Path, workdir: Path, kind: str, timeout_s: float = 120.0) -> FaultResult:
    """`letterrec serve` on a copy of the bundle with manifest.json missing or its catalogue
    corrupted: it must exit non-zero with an error naming the file, and never answer ready."""
    broken = workdir / f"bundle-{kind}"
    shutil.copytree(bundle, broken, dirs_exist_ok=True)
    if kind == "missing":
        (broken / "manifest.json").unlink()
        expect = "manifest.json"
    else:
        (broken / "catalogue.parquet").write_bytes(b"PAR1 this is not parquet")
        expect = ".parquet"  # the CLI may shorten the path in the middle
    log = workdir / f"bad-bundle-{kind}.log"
    replica = Replica(broken, None, {**REPLICA_ENV, "LETTERREC_API_KEYS": "k" * 20}, log)
    replica.start()
    ever_ready = False
    assert replica.proc is not None
    deadline = time.monotonic() + timeout_s
    while replica.proc.poll() is None and time.monotonic() < deadline:
        ever_ready |= replica.ready()
        time.sleep(0.2)
    code = replica.proc.poll()
    replica.kill()
    text = log.read_text(errors="replace")
    notes = []
    if code in (None, 0):
        notes.append(f"exit code {code}")
    if ever_ready:
        notes.append("answered ready")
    if expect not in text:
        notes.append(f"the error does not name {expect}: {text[-500:]}")
    if "Traceback" in text:
        notes.append("a traceback instead of a clear error")
    return FaultResult(f"bundle_{kind}", 0, 0, 0, 0, 0.0, notes)


SCENARIOS: dict[str, Callable[[Cluster], FaultResult]] = {
    "redis_killed": lambda c: redis_outage(c, "redis_killed"),
    "redis_paused": lambda c: redis_outage(c, "redis_paused"),
    "redis_restarted": lambda c: redis_outage(c, "redis_restarted"),
    "redis_slow": redis_slow,
    "decode_child_killed": lambda c: decode_child_fault(c, "decode_child_killed"),
    "decode_child_hung": lambda c: decode_child_fault(c, "decode_child_hung"),
    "replica_killed": replica_killed,
    "full_restart_aof": full_restart,
}
"""Scenarios on a running cluster, in the order they run (each leaves it recovered)."""
