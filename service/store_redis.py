"""The Redis-backed catalogue store: tokenized items shared by every replica.

Keys, under `P = <namespace>:<bundle fingerprint>` (replicas of different bundles never mix):
- `P:epoch`    a random token naming the current log; gone after Redis lost its data.
- `P:log`      list of Entry JSON, append-only; its length is the store version.
- `P:snapshot` hash {epoch, version, trie, rows}: the serialized trie and the tokenized rows
               after `version` entries, so a new replica starts without replaying or rebuilding.
- `P:events`   pub/sub channel; a commit publishes the new version to wake the other replicas.
- `P:commit:<token>` the outcome of one commit (its log length, or -3: fenced, never applied),
               kept 10 minutes, so that a commit whose answer was lost is settled exactly.

Writes are Lua scripts, atomic on the server: a commit appends only if the log still has the
epoch and length this replica synced to (optimistic concurrency; otherwise sync and retry), so
every replica applies the same entries in the same order. Replicas poll the version every
`sync_interval_s` and are woken early by pub/sub.

Failure handling: a Redis error makes /tokenize answer 503 (an item is applied locally only
after Redis stored it, so nothing unstored is acknowledged) while /recommend keeps serving the
in-process trie. A commit whose answer is lost (timeout, dropped connection) is settled: its
outcome is read back, or its token fenced so that it cannot apply later; only when Redis cannot
be asked at all is the outcome reported unknown (503, nothing acknowledged; the next sync applies
it if it was stored). If Redis comes back empty (restart without persistence), the first replica
to notice re-seeds a new epoch with every tokenized item it holds; the others adopt that log and
re-commit what only they held or held in a later version (`Entry.stamp`), so all replicas
converge on every acknowledged write with no manual step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from models.bundle import Catalogue
from models.trie import ItemTrie
from service.metrics import Metrics
from service.store import (
    CatalogueStore,
    CommitUnknown,
    Entry,
    LiveCatalogue,
    StaleVersion,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)

_COMMIT = """
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return -2 end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
local n = redis.call('LLEN', KEYS[2])
redis.call('SET', KEYS[3], n, 'EX', 600)
redis.call('PUBLISH', ARGV[3], n)
return n
"""

# A commit carries a random token. The commit records its outcome under P:commit:<token>, and
# a commit whose token already has an outcome returns it instead of running again (redis-py's
# retry after a lost reply). _SETTLE, run after an unanswered commit, reads that outcome, or
# fences the token (-3) so that a commit still on its way to Redis can never apply later: the
# answer to the client is then exact, stored or not stored, never a guess.
_SETTLE = """
local done = redis.call('GET', KEYS[1])
if done then return tonumber(done) end
redis.call('SET', KEYS[1], -3, 'EX', 600)
return -3
"""

_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[1], ARGV[1])
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
local n = redis.call('LLEN', KEYS[2])
redis.call('PUBLISH', ARGV[2], n)
return n
"""

SNAPSHOT_MIN_INTERVAL_S = 1.0
REDIS_OPS = ("load", "sync", "commit", "snapshot", "pubsub")
"""Values of the `op` label of letterrec_redis_errors_total."""


def bundle_fingerprint(catalogue: Catalogue, created_at: str) -> str:
    """Names the bundle in Redis keys: same items, codes and build -> same fingerprint."""
    h = hashlib.sha256(created_at.encode())
    h.update("\n".join(catalogue.item_ids).encode())
    h.update(catalogue.codes.astype("<i8").tobytes())
    return h.hexdigest()[:16]


def connect(url: str, timeout_s: float) -> Redis:
    """A client that fails fast: one quick retry, short socket timeouts."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
        health_check_interval=10,
    )


class RedisStore(CatalogueStore):
    kind = "redis"

    def __init__(
        self,
        live: LiveCatalogue,
        redis: Redis,
        prefix: str,
        metrics: Metrics,
        sync_interval_s: float,
        timeout_s: float = 1.0,
    ) -> None:
        super().__init__(live)
        self.redis = redis
        self.metrics = metrics
        self.sync_interval_s = sync_interval_s
        self.k_epoch, self.k_log = f"{prefix}:epoch", f"{prefix}:log"
        self.k_snapshot, self.channel = f"{prefix}:snapshot", f"{prefix}:events"
        self.timeout_s = timeout_s
        self.k_commit = f"{prefix}:commit"
        self._commit_script = redis.register_script(_COMMIT)
        self._settle_script = redis.register_script(_SETTLE)
        self._seed_script = redis.register_script(_SEED)
        self._epoch: str | None = None
        self._ok = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot_dirty = False
        self._snapshot_at = 0.0
        self._recommit: dict[str, Entry] = {}
        for op in REDIS_OPS:  # export every series from the start, at 0
            metrics.redis_errors.labels(op)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        catalogue: Catalogue,
        codebook_size: int,
        *,
        url: str,
        namespace: str,
        fingerprint: str,
        metrics: Metrics,
        timeout_s: float,
        sync_interval_s: float,
    ) -> RedisStore:
        """Start from Redis' snapshot when there is a usable one, else from the bundle."""
        redis = connect(url, timeout_s)
        prefix = f"{namespace}:{fingerprint}"
        live, epoch, version = None, None, 0
        try:
            live, epoch, version = await _load_snapshot(redis, prefix, catalogue)
        except REDIS_ERRORS as e:
            metrics.redis_errors.labels("load").inc()
            log.warning("Redis unreachable at start-up (%s); starting from the bundle", e)
        if live is None:
            live = await asyncio.to_thread(LiveCatalogue.from_bundle, catalogue, codebook_size)
        store = cls(live, redis, prefix, metrics, sync_interval_s, timeout_s)
        store._epoch, store.version = epoch, version
        return store

    async def start(self) -> None:
        await self._sync_round()
        self._tasks = [
            asyncio.create_task(self._sync_loop(), name="redis-sync"),
            asyncio.create_task(self._pubsub_loop(), name="redis-pubsub"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS):
                await t
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.aclose()

    @property
    def healthy(self) -> bool:
        return self._ok

    # ---- sync -----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Apply what other replicas committed; re-seed or adopt after a Redis reset."""
        try:
            await self._sync()
        except REDIS_ERRORS as e:
            self.metrics.redis_errors.labels("sync").inc()
            self._set_ok(False, e)
            raise StoreUnavailable(f"catalogue store (Redis) unreachable: {e}") from e
        self._set_ok(True)

    async def _sync(self) -> None:
        for _ in range(3):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.k_epoch)
                pipe.llen(self.k_log)
                epoch_raw, length = await pipe.execute()
            epoch = epoch_raw.decode() if epoch_raw is not None else None
            if epoch is None:
                await self._seed()
            elif epoch != self._epoch or length < self.version:
                await self._adopt(epoch)
                return
            else:
                if length > self.version:
                    await self._apply_range(self.version, length)
                await self._recommit_missing()
                return

    async def _apply_range(self, start: int, stop: int) -> None:
        raw = await self.redis.lrange(self.k_log, start, stop - 1)
        entries = [Entry.from_json(r) for r in raw]
        for e in entries:  # someone stored it, or a later version of it: the log's wins
            pending = self._recommit.get(e.item_id)
            if pending is not None and e.stamp >= pending.stamp:
                del self._recommit[e.item_id]
        await self.apply_local([e for e in entries if e.item_id not in self._recommit])
        self.version = start + len(raw)

    async def _seed(self) -> None:
        """Redis has no log (fresh or reset): start one holding every item this replica has."""
        entries = self.live.tokenized_entries()
        epoch = uuid.uuid4().hex
        n = await self._seed_script(
            keys=[self.k_epoch, self.k_log, self.k_snapshot],
            args=[epoch, self.channel, *[e.to_json() for e in entries]],
        )
        if int(n) >= 0:
            log.info(
                "Redis log started (epoch %s) with %d tokenized items", epoch[:8], len(entries)
            )
            self._epoch, self.version = epoch, int(n)
            self._snapshot_dirty = True

    async def _adopt(self, epoch: str) -> None:
        """Take over another epoch's log. Items only this replica holds, or holds in a later
        version than the log's (a replacement the re-seeding replica had not seen), are
        re-committed, and the log's older versions of them are not applied meanwhile."""
        raw = await self.redis.lrange(self.k_log, 0, -1)
        entries = [Entry.from_json(r) for r in raw]
        latest = {e.item_id: e for e in entries}
        self._recommit = {}
        for mine in self.live.tokenized_entries():
            theirs = latest.get(mine.item_id)
            if theirs is None or (
                mine.stamp > theirs.stamp
                and (mine.codes, mine.text_hash) != (theirs.codes, theirs.text_hash)
            ):
                self._recommit[mine.item_id] = mine
        await self.apply_local([e for e in entries if e.item_id not in self._recommit])
        self._epoch, self.version = epoch, len(entries)
        log.info("adopted Redis log %s (%d entries)", epoch[:8], len(entries))
        await self._recommit_missing()

    async def _recommit_missing(self) -> None:
        """Push acknowledged items the current log lacks; a lost race retries next round."""
        if not self._recommit:
            return
        log.info("re-committing %d items the Redis log lacks", len(self._recommit))
        with contextlib.suppress(StaleVersion):
            await self.commit(list(self._recommit.values()))
            self._recommit.clear()

    async def commit(self, entries: Sequence[Entry]) -> list[str]:
        if self._epoch is None:
            raise StoreUnavailable("catalogue store (Redis) not synced yet")
        token = uuid.uuid4().hex
        try:
            n = int(
                await self._commit_script(
                    keys=[self.k_epoch, self.k_log, f"{self.k_commit}:{token}"],
                    args=[self._epoch, self.version, self.channel, *[e.to_json() for e in entries]],
                )
            )
        except REDIS_ERRORS as e:
            self.metrics.redis_errors.labels("commit").inc()
            self._set_ok(False, e)
            n = await self._settle(token, e)
        if n == -3:
            raise StoreUnavailable(
                "catalogue store (Redis) did not answer in time; nothing was stored"
            )
        if n < 0:
            raise StaleVersion("the Redis log moved on; sync and retry")
        statuses = await self.apply_local(entries)
        self.version = n
        self._snapshot_dirty = True
        return statuses

    async def _settle(self, token: str, err: BaseException) -> int:
        """The outcome of an unanswered commit: its log length when it was stored, -3 when it
        was not (and now never will be). Retried while Redis times out, up to 3 socket
        timeouts; CommitUnknown when Redis cannot be asked."""
        deadline = time.monotonic() + 3 * self.timeout_s
        while True:
            try:
                return int(await self._settle_script(keys=[f"{self.k_commit}:{token}"]))
            except REDIS_ERRORS as e:
                err = e
                timed_out = isinstance(e, asyncio.TimeoutError | RedisTimeoutError)
                if not timed_out or time.monotonic() >= deadline:
                    break
        raise CommitUnknown(
            f"catalogue store (Redis) did not confirm the write ({err}): it may or may not be "
            "stored; repeat the same request (it answers 'existing' for what was stored)"
        ) from err

    async def _sync_round(self) -> None:
        async with self.writer:
            with contextlib.suppress(StoreUnavailable):
                await self.sync()
                await self._maybe_snapshot()

    async def _sync_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sync_interval_s)
            self._wake.clear()
            try:
                await self._sync_round()
            except Exception:  # the loop must outlive any surprise
                log.exception("Redis sync round failed")

    async def _pubsub_loop(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None:
                        self._wake.set()
            except REDIS_ERRORS:
                self.metrics.redis_errors.labels("pubsub").inc()
                await asyncio.sleep(max(self.sync_interval_s, 0.2))
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()

    # ---- snapshot -------------------------------------------------------------------------

    async def _maybe_snapshot(self) -> None:
        if not self._snapshot_dirty or self._epoch is None:
            return
        if time.monotonic() - self._snapshot_at < SNAPSHOT_MIN_INTERVAL_S:
            return
        trie_bytes, rows = await asyncio.to_thread(self._capture)
        try:
            await self.redis.hset(
                self.k_snapshot,
                mapping={
                    "epoch": self._epoch,
                    "version": self.version,
                    "trie": trie_bytes,
                    "rows": json.dumps([json.loads(e.to_json()) for e in rows]),
                },
            )
        except REDIS_ERRORS:
            self.metrics.redis_errors.labels("snapshot").inc()
            return
        self._snapshot_dirty = False
        self._snapshot_at = time.monotonic()

    def _capture(self) -> tuple[bytes, list[Entry]]:
        with self.live.lock.read():
            return self.live.trie.to_bytes(), self.live.snapshot_rows()

    def status(self) -> dict[str, Any]:
        return {**super().status(), "epoch": (self._epoch or "")[:8]}

    def _set_ok(self, ok: bool, err: BaseException | None = None) -> None:
        if ok and not self._ok:
            log.info("Redis reachable; catalogue store in sync at version %d", self.version)
        elif not ok and self._ok:
            log.warning("Redis unreachable (%s): serving from the in-process trie", err)
        self._ok = ok


async def _load_snapshot(
    redis: Redis, prefix: str, catalogue: Catalogue
) -> tuple[LiveCatalogue | None, str | None, int]:
    # The client is built without decode_responses: keys and values are bytes.
    snap = cast(dict[bytes, bytes], await redis.hgetall(f"{prefix}:snapshot"))
    epoch = cast(bytes | None, await redis.get(f"{prefix}:epoch"))
    if not snap or epoch is None or snap.get(b"epoch") != epoch:
        return None, None, 0
    try:
        rows = [Entry.from_json(json.dumps(d)) for d in json.loads(snap[b"rows"])]
        trie = await asyncio.to_thread(ItemTrie.from_bytes, snap[b"trie"])
        live = LiveCatalogue(catalogue, trie, rows)
    except (KeyError, ValueError, TypeError) as e:
        log.warning("ignoring unusable Redis snapshot: %s", e)
        return None, None, 0
    version = int(snap[b"version"])
    log.info(
        "started from the Redis snapshot at version %d (%d tokenized rows)", version, len(rows)
    )
    return live, epoch.decode(), version
