"""A real Prometheus (Debian's `prometheus`) scrapes a real letterrec service on localhost.

The service serves a tiny real bundle (tests/bundlefactory.py) as `python -m service` (what
`letterrec serve` runs); Prometheus runs with docker/prometheus/prometheus.yml, its alert rules
included, the scrape target pointed at that service. Everything listens on 127.0.0.1 only and
both processes are stopped at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import PROMETHEUS_DIR, ROOT, tool

pytestmark = pytest.mark.slow

N_ITEMS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if http(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {seconds:.0f}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.bundlefactory import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle"), n_items=N_ITEMS, seed=0)
    port = free_port()
    log = tmp_path_factory.mktemp("service") / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTERREC_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LETTERREC_LOG_LEVEL="warning")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--bundle", str(bundle), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--engine", "torch"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/readyz", proc, log, seconds=240)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus with the compose configuration, the letterrec job aimed at `service`."""
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    port = free_port()
    for job in config["scrape_configs"]:
        if job["job_name"] == "letterrec":
            job.pop("dns_sd_configs")
            job["static_configs"] = [{"targets": [urllib.parse.urlsplit(service).netloc]}]
        else:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            cwd=work, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/-/ready", proc, log, seconds=60)
        yield base
    finally:
        stop(proc)


def query(prom: str, promql: str) -> list[dict[str, Any]]:
    status, body = http(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    payload = json.loads(body)
    assert status == 200 and payload["status"] == "success", payload
    return payload["data"]["result"]


def eventually(prom: str, promql: str, seconds: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        result = query(prom, promql)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1)


def recommend(service: str, n: int) -> None:
    for i in range(n):
        status, body = http(f"{service}/recommend", {"history": [f"item-{i}"], "k": 5}, timeout=60)
        assert status == 200, body[:500]


def test_prometheus_collects_latency_and_catalogue_size(service: str, prometheus: str) -> None:
    recommend(service, 5)
    assert eventually(prometheus, 'up{job="letterrec"} == 1'), "the service target is not up"

    buckets = eventually(
        prometheus,
        'letterrec_http_request_duration_seconds_bucket{route="/recommend",status="200"}',
    )
    assert buckets, "the latency histogram was not collected"
    assert {s["metric"]["method"] for s in buckets} == {"POST"}
    assert {s["metric"]["job"] for s in buckets} == {"letterrec"}
    inf = [s for s in buckets if s["metric"]["le"] == "+Inf"]
    assert inf and float(inf[0]["value"][1]) >= 5

    (catalogue,) = eventually(prometheus, 'letterrec_catalogue_items{job="letterrec"}')
    assert float(catalogue["value"][1]) == N_ITEMS

    (ready,) = eventually(prometheus, 'letterrec_ready{job="letterrec"}')
    assert float(ready["value"][1]) == 1

    # More traffic after the series was first scraped: Prometheus sees the counter grow.
    recommend(service, 5)
    grown = eventually(
        prometheus,
        'sum(increase(letterrec_http_request_duration_seconds_count{route="/recommend"}[1m])) > 0',
        seconds=30,
    )
    assert grown, "Prometheus did not see the request counter grow"


def test_alert_rules_load_and_evaluate_cleanly(service: str, prometheus: str) -> None:
    status, body = http(f"{prometheus}/api/v1/rules")
    groups = json.loads(body)["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = {r.get("name") for r in rules}
    assert {"LetterrecRecommendLatencyHigh", "LetterrecErrorRatioHigh",
            "LetterrecRedisUnreachable", "LetterrecNoReadyReplicas"} <= names  # fmt: skip
    # Let every group evaluate at least once against the real series.
    time.sleep(3)
    status, body = http(f"{prometheus}/api/v1/rules")
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
    bad = {r["name"]: r.get("lastError") for r in rules if r.get("health") != "ok"}
    assert not bad, bad
    # A ready replica is up: the no-ready-replicas alert is neither pending nor firing.
    firing = query(prometheus, 'ALERTS{alertname="LetterrecNoReadyReplicas"}')
    assert firing == [], firing
