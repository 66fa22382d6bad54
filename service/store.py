"""The live catalogue (bundle items + tokenized items + the trie over both) and its stores.

Rows are append-only: row i of the catalogue is item i of the trie, forever. Re-tokenizing an
item retires its row (trie.deactivate) and appends a new one, so a row number handed to the
engine never changes meaning.

Threads: the engine decodes in worker threads while the event loop may apply new items, so
every decode holds `LiveCatalogue.lock` shared (`lock.read()`: several decode workers at once)
and every trie mutation holds it alone (`lock.write()`). Writers (tokenize, Redis sync)
are serialized by `CatalogueStore.writer` (an asyncio lock), so reads of the catalogue made while
holding it see a state no one else changes.

Stores: `EmbeddedStore` keeps everything in-process. `service.store_redis.RedisStore` shares the
tokenized items between replicas through Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from models.bundle import Catalogue
from models.trie import ItemTrie

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The shared store cannot be reached; nothing was stored."""


class CommitUnknown(StoreUnavailable):
    """The store took the write but its answer was lost (a timeout, a dropped connection) and
    could not be read back: the entries may or may not be stored. Nothing was acknowledged or
    applied locally; if they were stored, the next sync applies them everywhere, and a client
    that repeats the request is answered `existing`."""


class StaleVersion(Exception):
    """Another replica wrote first; sync and try again."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One tokenized item as stored: the item's current identifier and text fingerprint."""

    item_id: str
    codes: tuple[int, ...]
    title: str
    text_hash: str
    stamp: int = 0
    """When this version of the item was written (ns since the epoch), and always above the
    stamp of the version it replaces: after Redis lost its data, replicas re-seed it from
    memory, and the stamp says which of two versions of an item is the later one, so an
    acknowledged replacement is never rolled back by a replica that missed it."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Entry:
        d = json.loads(raw)
        return cls(
            str(d["item_id"]),
            tuple(int(c) for c in d["codes"]),
            str(d["title"]),
            str(d["text_hash"]),
            int(d.get("stamp", 0)),
        )


@dataclass(frozen=True)
class ItemView:
    row: int
    item_id: str
    codes: tuple[int, ...]
    title: str
    text_hash: str | None
    """None for bundle items (the bundle does not keep their text)."""
    source: Literal["bundle", "tokenized"]


class ReadWriteLock:
    """Shared readers, exclusive writers; a waiting writer holds new readers back, so a
    steady stream of decodes cannot starve /tokenize. (The standard library has no such lock;
    it is a dozen lines over `threading.Condition`.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class LiveCatalogue:
    """Bundle catalogue + tokenized rows + the trie; row numbers are trie item indices."""

    def __init__(self, catalogue: Catalogue, trie: ItemTrie, extra: Sequence[Entry] = ()) -> None:
        if len(trie) != len(catalogue) + len(extra):
            raise ValueError(
                f"trie has {len(trie)} items, catalogue {len(catalogue)} + {len(extra)} tokenized"
            )
        self.lock = ReadWriteLock()
        self.trie = trie
        self.n_bundle = len(catalogue)
        self._bundle_codes = catalogue.codes
        self._ids: list[str] = list(catalogue.item_ids)
        self._titles: list[str] = list(catalogue.titles)
        self._extra: list[Entry] = list(extra)
        self._active: dict[str, int] = {}
        for row, item_id in enumerate(self._ids + [e.item_id for e in self._extra]):
            if trie.is_active(row):
                self._active[item_id] = row

    @classmethod
    def from_bundle(cls, catalogue: Catalogue, codebook_size: int) -> LiveCatalogue:
        return cls(catalogue, ItemTrie.from_codes(catalogue.codes, codebook_size))

    def __len__(self) -> int:
        return self.n_bundle + len(self._extra)

    @property
    def n_active(self) -> int:
        return len(self._active)

    def row_of(self, item_id: str) -> int | None:
        return self._active.get(item_id)

    def item(self, row: int) -> ItemView:
        if row < self.n_bundle:
            codes = tuple(self._bundle_codes[row].tolist())
            return ItemView(row, self._ids[row], codes, self._titles[row], None, "bundle")
        e = self._extra[row - self.n_bundle]
        return ItemView(row, e.item_id, e.codes, e.title, e.text_hash, "tokenized")

    def codes_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Codes of `rows`, [len(rows), L]."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self._bundle_codes.shape[1]), dtype=np.int64)
        in_bundle = idx < self.n_bundle  # one gather for these (the hot path of /recommend)
        out[in_bundle] = self._bundle_codes[idx[in_bundle]]
        for i in np.flatnonzero(~in_bundle):
            out[i] = self._extra[int(idx[i]) - self.n_bundle].codes
        return out

    def is_taken(self, codes: tuple[int, ...], free_rows: frozenset[int] = frozenset()) -> bool:
        """Whether an active item other than `free_rows` holds `codes`."""
        row = self.trie.lookup(codes)
        return row is not None and row not in free_rows

    def stamp_of(self, item_id: str) -> int:
        """The stamp of the item's current version (0 for bundle items and unknown ids)."""
        row = self._active.get(item_id)
        if row is None or row < self.n_bundle:
            return 0
        return self._extra[row - self.n_bundle].stamp

    def tokenized_entries(self) -> list[Entry]:
        """The active tokenized items, oldest first (what a replica re-seeds Redis with)."""
        return [
            e for i, e in enumerate(self._extra) if self._active.get(e.item_id) == i + self.n_bundle
        ]

    def apply(self, entry: Entry) -> str:
        """Make `entry` the item's current state; returns created/existing/replaced.

        The caller holds `lock`. A different active item holding the same codes is retired: the
        store's log is the truth, and this happens only while replicas reconcile after a reset.
        """
        row = self._active.get(entry.item_id)
        if row is not None and self.item(row).codes == entry.codes:
            if row >= self.n_bundle:
                self._extra[row - self.n_bundle] = entry
            return "existing"
        holder = self.trie.lookup(entry.codes)
        if holder is not None:
            log.warning(
                "item %r takes codes %s from item %r (store log wins)",
                entry.item_id,
                entry.codes,
                self.item(holder).item_id,
            )
            self._retire(holder)
        if row is not None:
            self._retire(row)
        new = self.trie.add(list(entry.codes))
        if new != len(self):
            raise RuntimeError(f"trie appended row {new}, catalogue expected {len(self)}")
        self._extra.append(entry)
        self._active[entry.item_id] = new
        return "created" if row is None else "replaced"

    def _retire(self, row: int) -> None:
        self.trie.deactivate(row)
        item_id = self.item(row).item_id
        if self._active.get(item_id) == row:
            del self._active[item_id]

    def snapshot_rows(self) -> list[Entry]:
        """All tokenized rows in row order (retired ones too: they keep the numbering)."""
        return list(self._extra)


class CatalogueStore:
    """Where committed tokenized items live. The embedded store: this process only."""

    kind = "embedded"

    def __init__(self, live: LiveCatalogue) -> None:
        self.live = live
        self.writer = asyncio.Lock()
        self.version = 0

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        """Load shared state and start background sync (nothing to do in-process)."""

    async def close(self) -> None:
        """Stop background work and release connections."""

    async def sync(self) -> None:
        """Bring the live catalogue up to the store's latest version. Caller holds `writer`."""

    async def commit(self, entries: Sequence[Entry]) -> list[str]:
        """Store `entries` durably, then apply them locally. Caller holds `writer` and has
        synced; raises StoreUnavailable (nothing stored) or StaleVersion (sync and retry)."""
        statuses = await self.apply_local(entries)
        self.version += len(entries)
        return statuses

    async def apply_local(self, entries: Iterable[Entry]) -> list[str]:
        entries = list(entries)
        if not entries:
            return []
        return await asyncio.to_thread(self._apply_locked, entries)

    def _apply_locked(self, entries: list[Entry]) -> list[str]:
        with self.live.lock.write():
            return [self.live.apply(e) for e in entries]

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "healthy": self.healthy}
