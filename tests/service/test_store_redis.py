"""The Redis store against a real redis-server: ordering, optimistic commits, snapshots, resets."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.faults import DelayProxy
from models.bundle import Catalogue
from service.metrics import Metrics
from service.store import CommitUnknown, Entry, StaleVersion, StoreUnavailable, text_hash
from service.store_redis import RedisStore, bundle_fingerprint
from tests.lmfactory import random_catalogue
from tests.service.conftest import RedisServer

pytestmark = pytest.mark.anyio

N = 8  # codebook size


def catalogue() -> Catalogue:
    codes = random_catalogue(30, 3, N, seed=2)
    return Catalogue([f"b{i}" for i in range(30)], codes, [f"B{i}" for i in range(30)])


def free(store: RedisStore, count: int, skip: int = 0) -> list[tuple[int, ...]]:
    out = []
    for flat in range(N**3):
        codes = (flat // N // N, flat // N % N, flat % N)
        if store.live.trie.lookup(codes) is None:
            out.append(codes)
    return out[skip : skip + count]


async def make(server: RedisServer, namespace: str, metrics: Metrics | None = None) -> RedisStore:
    cat = catalogue()
    store = await RedisStore.create(
        cat,
        N,
        url=server.url,
        namespace=namespace,
        fingerprint=bundle_fingerprint(cat, "t"),
        metrics=metrics or Metrics(),
        timeout_s=0.5,
        sync_interval_s=0.05,
    )
    await store.start()
    return store


def entry(item_id: str, codes: tuple[int, ...], text: str = "t") -> Entry:
    return Entry(item_id, codes, item_id.upper(), text_hash(text))


async def commit(store: RedisStore, entries: list[Entry]) -> list[str]:
    async with store.writer:
        await store.sync()
        return await store.commit(entries)


async def eventually(predicate, timeout_s: float = 2.0) -> float:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        assert loop.time() - start < timeout_s, "replicas did not converge"
        await asyncio.sleep(0.02)
    return loop.time() - start


async def test_replicas_see_each_others_items_in_order(redis_server: RedisServer) -> None:
    a, b = await make(redis_server, "order"), await make(redis_server, "order")
    try:
        assert a.healthy and b.healthy
        c1, c2 = free(a, 2)
        assert await commit(a, [entry("x", c1)]) == ["created"]
        assert await commit(b, [entry("y", c2)]) == ["created"]  # b synced x first
        # the item becomes visible (applied in a worker thread) a loop turn before the version
        # moves: wait for both
        took = await eventually(lambda: a.live.row_of("y") is not None and a.version == 2)
        assert took < 1.0
        assert a.live.row_of("x") == b.live.row_of("x") == 30
        assert a.live.row_of("y") == b.live.row_of("y") == 31
        assert a.version == b.version == 2
    finally:
        await a.close()
        await b.close()


async def test_a_stale_commit_is_refused_and_stores_nothing(redis_server: RedisServer) -> None:
    a, b = await make(redis_server, "stale"), await make(redis_server, "stale")
    try:
        (c1,) = free(a, 1)
        await commit(a, [entry("x", c1)])
        async with b.writer:  # b does not sync first: its view is one entry behind
            b.version = 0
            with pytest.raises(StaleVersion):
                await b.commit([entry("z", c1)])
        assert redis_server.client().llen(a.k_log) == 1
    finally:
        await a.close()
        await b.close()


async def test_new_replica_starts_from_the_snapshot(redis_server: RedisServer) -> None:
    a = await make(redis_server, "snap")
    try:
        codes = free(a, 3)
        for i, c in enumerate(codes):
            await commit(a, [entry(f"n{i}", c)])
        await commit(a, [entry("n0", free(a, 1, skip=0)[0], "changed")])  # a replacement
        a._snapshot_at = 0.0
        await eventually(lambda: not a._snapshot_dirty)
        assert redis_server.client().hget(a.k_snapshot, "version") == b"4"
        b = await make(redis_server, "snap")
        try:
            assert b.version == 4
            assert len(b.live) == len(a.live) == 34
            for item in ("n0", "n1", "n2", "b5"):
                assert b.live.row_of(item) == a.live.row_of(item)
        finally:
            await b.close()
    finally:
        await a.close()


async def test_redis_down_commit_fails_and_recovery_reseeds(redis_server: RedisServer) -> None:
    metrics = Metrics()
    a, b = await make(redis_server, "reset", metrics), await make(redis_server, "reset")
    try:
        c1, c2 = free(a, 2)
        await commit(a, [entry("kept", c1)])
        await eventually(lambda: b.live.row_of("kept") is not None)
        redis_server.stop()  # no persistence: everything in Redis is lost
        with pytest.raises(StoreUnavailable):
            await commit(a, [entry("lost", c2)])
        assert a.live.row_of("lost") is None  # never applied without being stored
        await eventually(lambda: not a.healthy and not b.healthy)
        assert (
            metrics.registry.get_sample_value("letterrec_redis_errors_total", {"op": "sync"}) >= 1
        )
        redis_server.start()
        await eventually(lambda: a.healthy and b.healthy, 5.0)
        log = redis_server.client().lrange(a.k_log, 0, -1)
        assert [Entry.from_json(r).item_id for r in log] == ["kept"]  # re-seeded exactly once
        assert await commit(b, [entry("after", c2)]) == ["created"]
        # The row appears while the version is still being set (apply_local awaits a thread).
        await eventually(lambda: a.live.row_of("after") is not None and a.version == 2)
        assert a.version == b.version == 2
    finally:
        await a.close()
        await b.close()


async def test_after_a_reset_every_replica_recommits_what_only_it_held(
    redis_server: RedisServer,
) -> None:
    a = await make(redis_server, "adopt")
    b = await make(redis_server, "adopt")
    try:
        c1, c2, c3 = free(a, 3)
        await commit(a, [entry("shared", c1)])
        await eventually(lambda: b.live.row_of("shared") is not None)
        # Each replica holds an item the other never saw (acknowledged just before a reset).
        async with a.writer:
            await a.apply_local([entry("only-a", c2)])
        async with b.writer:
            await b.apply_local([entry("only-b", c3)])
        client = redis_server.client()
        client.delete(a.k_epoch, a.k_log, a.k_snapshot)
        await eventually(lambda: client.llen(a.k_log) == 3, 5.0)
        ids = sorted(Entry.from_json(r).item_id for r in client.lrange(a.k_log, 0, -1))
        assert ids == ["only-a", "only-b", "shared"]
        for store in (a, b):
            await eventually(lambda s=store: s.live.n_active == 33 and s.version == 3)
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_at_start_serves_the_bundle() -> None:
    cat = catalogue()
    metrics = Metrics()
    store = await RedisStore.create(
        cat,
        N,
        url="redis://127.0.0.1:1/0",
        namespace="x",
        fingerprint="f",
        metrics=metrics,
        timeout_s=0.2,
        sync_interval_s=0.05,
    )
    await store.start()
    try:
        assert not store.healthy and store.live.n_active == 30
        assert (
            metrics.registry.get_sample_value("letterrec_redis_errors_total", {"op": "load"}) == 1
        )
    finally:
        await store.close()


async def test_a_commit_whose_answer_is_late_is_settled_as_stored(
    redis_server: RedisServer,
) -> None:
    """Redis applies the commit but its answer comes after the socket timeout: the write is
    reported stored (it is), once, and not as '503 nothing was stored'."""
    with DelayProxy(redis_server.port) as proxy:
        cat = catalogue()
        store = await RedisStore.create(
            cat,
            N,
            url=proxy.url,
            namespace="late",
            fingerprint=bundle_fingerprint(cat, "t"),
            metrics=Metrics(),
            timeout_s=0.4,
            sync_interval_s=0.05,
        )
        await store.start()
        try:
            c0, c1 = free(store, 2)
            await commit(store, [entry("first", c0)])  # Redis has the script cached now
            async with store.writer:
                await store.sync()
                proxy.reply_delay_s = 0.7  # answers arrive after the 0.4 s timeout ...
                loop = asyncio.get_running_loop()
                loop.call_later(0.9, setattr, proxy, "reply_delay_s", 0.0)  # ... for a while
                assert await store.commit([entry("late", c1)]) == ["created"]
            assert store.live.row_of("late") is not None and store.version == 2
            log = redis_server.client().lrange(store.k_log, 0, -1)
            assert [Entry.from_json(r).item_id for r in log] == ["first", "late"]  # once
        finally:
            await store.close()


async def test_an_unsettled_commit_says_its_outcome_is_unknown_and_is_never_lost(
    redis_server: RedisServer,
) -> None:
    """Redis stays too slow to settle the commit: 'may or may not be stored' (not 'nothing
    was stored'); once Redis answers again, the stored item is applied by the sync."""
    with DelayProxy(redis_server.port) as proxy:
        cat = catalogue()
        store = await RedisStore.create(
            cat,
            N,
            url=proxy.url,
            namespace="unsettled",
            fingerprint=bundle_fingerprint(cat, "t"),
            metrics=Metrics(),
            timeout_s=0.2,
            sync_interval_s=0.05,
        )
        await store.start()
        try:
            c0, c1 = free(store, 2)
            await commit(store, [entry("first", c0)])
            async with store.writer:
                await store.sync()
                proxy.reply_delay_s = 5.0
                with pytest.raises(CommitUnknown, match="may or may not be stored"):
                    await store.commit([entry("maybe", c1)])
                assert store.live.row_of("maybe") is None  # not acknowledged, not applied
                proxy.reply_delay_s = 0.0
            await eventually(lambda: store.live.row_of("maybe") is not None, 8.0)
        finally:
            await store.close()


async def test_a_replacement_survives_a_reset_reseeded_by_a_replica_that_missed_it(
    redis_server: RedisServer,
) -> None:
    """a replaces an item; Redis loses its data before b syncs; b re-seeds Redis from memory
    with the old version. The acknowledged replacement must win everywhere."""
    a, b = await make(redis_server, "replace"), await make(redis_server, "replace")
    try:
        c1, c2 = free(a, 2)
        await commit(a, [entry("x", c1, "old")])
        await eventually(lambda: b.live.row_of("x") is not None)
        client = redis_server.client()
        async with b.writer:  # b's sync rounds wait: it misses the replacement
            new = Entry("x", c2, "X", text_hash("new"), stamp=time.time_ns())
            assert await commit(a, [new]) == ["replaced"]
            client.delete(a.k_epoch, a.k_log, a.k_snapshot)
            await b.sync()  # b notices first and re-seeds with what it holds: the old x
        for store in (a, b):
            await eventually(lambda s=store: s.live.item(s.live.row_of("x")).codes == c2, 5.0)
        await eventually(
            lambda: Entry.from_json(client.lrange(a.k_log, -1, -1)[0]).codes == c2, 5.0
        )
        assert a.live.is_taken(c1) is False and b.live.is_taken(c1) is False
    finally:
        await a.close()
        await b.close()
