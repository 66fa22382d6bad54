"""`letterrec serve` with its default child decode process, as an operator runs it: Ctrl+C
(SIGINT to the whole process group) still finishes the requests in flight, and leaves no
process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.service.conftest import API_KEY, free_port, wait_until


def test_ctrl_c_finishes_in_flight_requests_and_stops_the_decode_child(tiny_bundle: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LETTERREC_API_KEYS": API_KEY, "LETTERREC_TORCH_THREADS": "1"}
    env.pop("LETTERREC_DECODE_PROCESS", None)  # the default: a child process
    cli = Path(sys.executable).with_name("letterrec")
    proc = subprocess.Popen(
        [str(cli), "serve", "--bundle", str(tiny_bundle), "--port", str(port)],
        env=env,
        start_new_session=True,  # its own process group, like a shell job
    )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 180, 0.2)
        children = subprocess.run(
            ["pgrep", "-g", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert len(children) >= 2, children  # the server and its decode worker

        results: list[int | str] = []

        def call() -> None:
            try:
                body = {"requests": [{"k": 50}] * 64}
                results.append(
                    httpx.post(f"{url}/recommend/batch", json=body, timeout=120).status_code
                )
            except httpx.HTTPError as e:
                results.append(repr(e))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()

        def inflight() -> float:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            line = next(x for x in text.splitlines() if x.startswith("letterrec_inflight_requests"))
            return float(line.split()[-1]) - 1  # this scrape counts itself

        wait_until(lambda: inflight() >= 1, 60, 0.01)
        os.killpg(proc.pid, signal.SIGINT)
        for t in threads:
            t.join(120)
        # uvicorn re-raises SIGINT once its graceful shutdown is done: 128 + 2, as shells expect.
        assert proc.wait(60) in (0, 130)
        assert results.count(200) >= 1, results
        assert all(r in (200, 503) or isinstance(r, str) for r in results), results

        def group() -> str:
            ps = ["ps", "-o", "pid=,args=", "-g", str(proc.pid)]
            return subprocess.run(ps, capture_output=True, text=True).stdout.strip()

        try:  # the decode child (and multiprocessing's resource tracker) follow the server out
            wait_until(lambda: group() == "", 15, 0.1)
        except AssertionError:
            raise AssertionError(f"still running after the server exited:\n{group()}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
