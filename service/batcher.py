"""Micro-batching: concurrent requests are gathered into one decoding batch.

One worker task feeds the engine. When a decoding slot is free (`parallel` of them: one per
decode process of the engine) and a request arrives, it waits up to `max_wait_s` for company (or
until `max_batch` requests are pending; 0, the service's default, waits not at all), then decodes
the batch in a worker thread so the event loop keeps accepting requests. While every slot is
busy, new requests pile up and form the next batch at once. The pending queue is bounded: a
submit that does not fit raises `QueueFull` (the route answers 503 + Retry-After). A request past its timeout (or whose
caller went away) stops counting toward that bound at once, is skipped when its turn comes (or
its result discarded) and raises `asyncio.TimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.metrics import Metrics

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFull(Exception):
    """The pending queue cannot take the request now."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"decoding queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The batcher no longer accepts requests."""


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued_at: float = field(default_factory=time.perf_counter)
    counted: bool = True
    """Still counted in `MicroBatcher.depth` (queued and wanted)."""


class MicroBatcher(Generic[In, Out]):
    """Gathers `submit`ted items into batches for `run_batch` (a blocking function)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        metrics: Metrics | None = None,
        engine_name: str = "engine",
        parallel: int = 1,
    ) -> None:
        """`parallel`: batches decoded at once; `run_batch` must then be safe to call from that
        many threads (an engine with as many decode processes)."""
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self._run_batch = run_batch
        self.parallel = parallel
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._metrics = metrics
        self._engine_name = engine_name
        self._pending: collections.deque[_Pending[In, Out]] = collections.deque()
        self._waiting = 0  # entries of _pending still counted (not taken, not abandoned)
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="decode")
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._last_batch_s = 0.05

    @property
    def depth(self) -> int:
        """Requests waiting for decoding; abandoned ones do not count."""
        return self._waiting

    def _uncount(self, p: _Pending[In, Out]) -> None:
        if p.counted:
            p.counted = False
            self._waiting -= 1

    def start(self) -> None:
        if self._worker is None:
            self._slots = asyncio.Semaphore(self.parallel)
            self._worker = asyncio.create_task(self._loop(), name="micro-batcher")

    async def submit(self, item: In, timeout_s: float) -> Out:
        return (await self.submit_many([item], timeout_s))[0]

    async def submit_many(self, items: Sequence[In], timeout_s: float) -> list[Out]:
        """Queue all of `items` (all or none) and wait for their results, in order."""
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        if self._waiting + len(items) > self.queue_size:
            raise QueueFull(self.retry_after_s(len(items)))
        if len(self._pending) > 2 * self.queue_size:  # mostly abandoned entries: drop them
            self._pending = collections.deque(p for p in self._pending if p.counted)
        loop = asyncio.get_running_loop()
        entries = [_Pending[In, Out](it, loop.create_future()) for it in items]
        self._pending.extend(entries)
        self._waiting += len(entries)
        self._set_depth()
        self._arrived.set()
        futures = [e.future for e in entries]
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*futures))
        except BaseException:
            for e in entries:
                e.future.cancel()  # the worker skips it; a running batch's result is dropped
                self._uncount(e)
            self._set_depth()
            raise

    def retry_after_s(self, extra: int = 0) -> int:
        """Seconds until the queue has likely drained enough for `extra` more requests."""
        batches = (self._waiting + extra) / max(1, self.max_batch) / self.parallel
        return max(1, math.ceil(batches * self._last_batch_s))

    async def close(self, timeout_s: float) -> None:
        """Stop accepting, finish what is queued (up to `timeout_s`), then stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
            except TimeoutError:
                log.warning("shutdown: %d queued requests did not finish in time", self.depth)
                self._worker.cancel()
                for p in self._pending:
                    if not p.future.done():
                        p.future.set_exception(ShuttingDown("the service is shutting down"))
                self._pending.clear()
                self._waiting = 0
        self._executor.shutdown(wait=True, cancel_futures=False)

    async def _loop(self) -> None:
        assert self._slots is not None
        while True:
            if not self._pending:
                if self._closing:
                    if self._inflight:  # close() returns once every batch has answered
                        await asyncio.gather(*self._inflight, return_exceptions=True)
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._slots.acquire()  # a decoder is free
            await self._gather()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._decode_in_slot(batch), name="decode-batch")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _decode_in_slot(self, batch: list[_Pending[In, Out]]) -> None:
        assert self._slots is not None
        try:
            await self._decode(batch)
        finally:
            self._slots.release()

    async def _gather(self) -> None:
        """Wait until the batch is full or its oldest request has waited `max_wait_s`."""
        deadline = self._pending[0].enqueued_at + self.max_wait_s
        while self._waiting < self.max_batch and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[In, Out]]:
        batch: list[_Pending[In, Out]] = []
        now = time.perf_counter()
        while self._pending and len(batch) < self.max_batch:
            p = self._pending.popleft()
            self._uncount(p)
            if p.future.done():  # cancelled: its caller timed out or went away
                continue
            batch.append(p)
            if self._metrics is not None:
                self._metrics.queue_wait.observe(now - p.enqueued_at)
        self._set_depth()
        return batch

    async def _decode(self, batch: list[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [p.item for p in batch]
            )
        except Exception as e:  # an engine failure fails this batch, not the service
            log.exception("decoding a batch of %d failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        elapsed = time.perf_counter() - start
        if len(results) != len(batch):
            err = RuntimeError(f"engine returned {len(results)} results for {len(batch)} requests")
            log.error("%s", err)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        self._last_batch_s = elapsed
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            self._metrics.decode_seconds.labels(self._engine_name).observe(elapsed)
        for p, result in zip(batch, results, strict=False):
            if not p.future.done():
                p.future.set_result(result)

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._waiting)
