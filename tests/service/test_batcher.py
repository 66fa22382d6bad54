"""Micro-batching: grouping, bounds, timeouts, failures, graceful close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from service.batcher import MicroBatcher, QueueFull, ShuttingDown
from service.metrics import Metrics

pytestmark = pytest.mark.anyio


class Recorder:
    """run_batch that doubles its inputs and records each batch (optionally slowly)."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, items: Sequence[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        self.batches.append(list(items))
        return [2 * x for x in items]


def make(run, **kw) -> MicroBatcher[int, int]:
    opts = {"max_batch": 8, "max_wait_s": 0.05, "queue_size": 64, "metrics": Metrics()}
    opts.update(kw)
    return MicroBatcher(run, **opts)


async def test_concurrent_requests_share_one_batch() -> None:
    rec = Recorder()
    b = make(rec)
    b.start()
    out = await asyncio.gather(*(b.submit(i, 5) for i in range(5)))
    assert out == [0, 2, 4, 6, 8]
    assert rec.batches == [[0, 1, 2, 3, 4]]
    await b.close(5)


async def test_batches_never_exceed_max_batch_and_keep_order() -> None:
    rec = Recorder()
    b = make(rec, max_batch=4)
    b.start()
    out = await b.submit_many(list(range(10)), 5)
    assert out == [2 * i for i in range(10)]
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    await b.close(5)


async def test_full_queue_raises_queue_full_with_retry_after() -> None:
    gate = threading.Event()
    rec = Recorder(gate=gate)
    b = make(rec, max_batch=1, max_wait_s=0, queue_size=2)
    b.start()
    first = asyncio.create_task(b.submit(1, 5))  # taken by the worker, blocked on the gate
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(b.submit(i, 5)) for i in (2, 3)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull) as err:
        await b.submit(4, 5)
    assert err.value.retry_after_s >= 1
    with pytest.raises(QueueFull):
        await b.submit_many([5, 6, 7], 5)  # all or nothing
    gate.set()
    assert await first == 2 and [await q for q in queued] == [4, 6]
    await b.close(5)


async def test_timed_out_requests_are_dropped_from_the_queue() -> None:
    gate = threading.Event()
    rec = Recorder(gate=gate)
    b = make(rec, max_batch=1, max_wait_s=0)
    b.start()
    blocked = asyncio.create_task(b.submit(1, 5))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await b.submit(2, 0.05)
    assert b.depth == 0  # abandoned: it no longer counts, though the deque still holds it
    gate.set()
    assert await blocked == 2
    assert await b.submit(3, 5) == 6
    assert [x for batch in rec.batches for x in batch] == [1, 3]  # 2 was never decoded
    await b.close(5)


async def test_engine_failure_fails_its_batch_only() -> None:
    calls = {"n": 0}

    def flaky(items: Sequence[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return list(items)

    b = make(flaky, max_wait_s=0)
    b.start()
    with pytest.raises(RuntimeError, match="boom"):
        await b.submit(1, 5)
    assert await b.submit(7, 5) == 7


async def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    b = make(lambda items: [], max_wait_s=0)
    b.start()
    with pytest.raises(RuntimeError, match="0 results for 1"):
        await b.submit(1, 5)
    await b.close(5)


async def test_close_finishes_queued_requests_then_refuses() -> None:
    rec = Recorder(delay_s=0.05)
    b = make(rec, max_batch=2, max_wait_s=0)
    b.start()
    pending = [asyncio.create_task(b.submit(i, 5)) for i in range(6)]
    await asyncio.sleep(0.01)
    await b.close(5)
    assert [p.result() for p in pending] == [0, 2, 4, 6, 8, 10]
    with pytest.raises(ShuttingDown):
        await b.submit(1, 5)


async def test_metrics_record_batches_and_depth() -> None:
    m = Metrics()
    b = make(Recorder(), metrics=m, engine_name="fake")
    b.start()
    await asyncio.gather(*(b.submit(i, 5) for i in range(3)))
    reg = m.registry
    assert reg.get_sample_value("letterrec_batch_size_count") == 1
    assert reg.get_sample_value("letterrec_batch_size_sum") == 3
    assert reg.get_sample_value("letterrec_decode_seconds_count", {"engine": "fake"}) == 1
    assert reg.get_sample_value("letterrec_queue_wait_seconds_count") == 3
    assert reg.get_sample_value("letterrec_queue_depth") == 0
    await b.close(5)


async def test_abandoned_requests_stop_counting_toward_the_queue_bound_at_once() -> None:
    """While the engine is busy, requests that timed out leave room for new ones immediately,
    not only when the worker reaches them."""
    gate = threading.Event()
    rec = Recorder(gate=gate)
    b = make(rec, max_batch=1, max_wait_s=0.0, queue_size=2)
    b.start()
    try:
        busy = asyncio.create_task(b.submit(1, 10))  # taken at once; blocks in the engine
        while b.depth != 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        for x in (2, 3):
            with pytest.raises(TimeoutError):
                await b.submit(x, 0.01)
        assert b.depth == 0
        fresh = asyncio.gather(b.submit(4, 10), b.submit(5, 10))  # fits: nothing waits
        await asyncio.sleep(0.01)
        gate.set()
        assert await busy == 2 and await fresh == [8, 10]
        assert [x for batch in rec.batches for x in batch] == [1, 4, 5]  # 2, 3 never decoded
    finally:
        gate.set()
        await b.close(5)


class Overlap:
    """run_batch that records how many of its calls ran at once."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.running, self.most = delay_s, 0, 0
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[int]) -> list[int]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.delay_s)
        with self.lock:
            self.running -= 1
        return [2 * x for x in items]


@pytest.mark.parametrize("parallel", [1, 2, 3])
async def test_parallel_slots_decode_that_many_batches_at_once(parallel: int) -> None:
    run = Overlap(0.1)
    b = make(run, max_batch=2, max_wait_s=0.0, parallel=parallel)
    b.start()
    results = await asyncio.gather(*(b.submit(i, 10) for i in range(12)))
    assert results == [2 * i for i in range(12)]
    assert run.most == parallel
    await b.close(5)


async def test_close_waits_for_every_batch_in_flight() -> None:
    run = Overlap(0.2)
    b = make(run, max_batch=1, max_wait_s=0.0, parallel=2)
    b.start()
    tasks = [asyncio.create_task(b.submit(i, 10)) for i in range(4)]
    await asyncio.sleep(0.05)
    await b.close(5)
    assert [t.result() for t in tasks] == [0, 2, 4, 6]
    with pytest.raises(ShuttingDown):
        await b.submit(9, 1)


def test_parallel_must_be_positive() -> None:
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        make(Recorder(), parallel=0)
