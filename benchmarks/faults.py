"""Fault injection with real processes, shared by the fault tests (tests/service/test_faults.py)
and the reliability benchmark (benchmarks/reliability.py).

Real `redis-server` (with or without AOF), real `letterrec serve` replicas as subprocesses
(each with its decode child), a steady request stream in a thread, and one fake: `DelayProxy`,
a TCP proxy that delays the bytes it forwards, standing in for a slow network or a slow Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Callable

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
