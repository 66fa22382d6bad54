"""The live catalogue: append-only rows, replacements, code ownership; the embedded store."""

from __future__ import annotations

import threading
import time

import pytest

from models.bundle import Catalogue
from service.store import CatalogueStore, Entry, LiveCatalogue, text_hash
from tests.lmfactory import random_catalogue

pytestmark = pytest.mark.anyio


def catalogue(n: int = 20) -> Catalogue:
    codes = random_catalogue(n, 3, 8, seed=1)
    return Catalogue([f"b{i}" for i in range(n)], codes, [f"Bundle {i}" for i in range(n)])


def free_codes(live: LiveCatalogue, count: int) -> list[tuple[int, ...]]:
    out = []
    for a in range(8):
        for b in range(8):
            for c in range(8):
                if live.trie.lookup((a, b, c)) is None and len(out) < count:
                    out.append((a, b, c))
    return out


def entry(item_id: str, codes: tuple[int, ...], text: str = "t") -> Entry:
    return Entry(item_id, codes, f"title {item_id}", text_hash(text))


def apply_all(live: LiveCatalogue, *entries: Entry) -> None:
    with live.lock.write():
        for e in entries:
            live.apply(e)


def test_bundle_rows_are_trie_items() -> None:
    cat = catalogue()
    live = LiveCatalogue.from_bundle(cat, 8)
    assert len(live) == live.n_active == 20
    row = live.row_of("b7")
    assert row == 7
    view = live.item(7)
    assert view.codes == tuple(cat.codes[7]) and view.source == "bundle" and view.text_hash is None
    assert live.trie.lookup(view.codes) == 7
    assert live.row_of("nope") is None


def test_apply_creates_replaces_and_repeats() -> None:
    live = LiveCatalogue.from_bundle(catalogue(), 8)
    c1, c2, c3 = free_codes(live, 3)
    with live.lock.write():
        assert live.apply(entry("new", c1)) == "created"
        assert live.apply(entry("new", c1, "again")) == "existing"
        assert live.apply(entry("new", c2, "other")) == "replaced"
        assert live.apply(entry("b3", c3, "bundle item re-tokenized")) == "replaced"
    assert live.row_of("new") == 21 and live.item(21).codes == c2
    assert not live.trie.is_active(20) and not live.trie.is_active(3)
    assert live.trie.lookup(c1) is None  # the retired identifier is free again
    assert live.row_of("b3") == 22 and live.item(22).source == "tokenized"
    assert live.n_active == 21 and len(live) == 23
    assert [e.item_id for e in live.tokenized_entries()] == ["new", "b3"]


def test_codes_rows_mixes_bundle_and_tokenized_rows_in_order() -> None:
    cat = catalogue()
    live = LiveCatalogue.from_bundle(cat, 8)
    c1, c2 = free_codes(live, 2)
    apply_all(live, entry("x", c1), entry("y", c2))
    got = live.codes_rows([21, 4, 20, 4, 19])
    assert got.dtype.name == "int64" and got.shape == (5, 3)
    assert [tuple(r) for r in got.tolist()] == [
        c2,
        tuple(cat.codes[4]),
        c1,
        tuple(cat.codes[4]),
        tuple(cat.codes[19]),
    ]
    assert live.codes_rows([]).shape == (0, 3)
    assert all(isinstance(c, int) for c in live.item(3).codes)


def test_apply_retires_another_holder_of_the_codes() -> None:
    live = LiveCatalogue.from_bundle(catalogue(), 8)
    taken = live.item(5).codes
    with live.lock.write():
        assert live.apply(entry("intruder", taken)) == "created"
    assert live.row_of("b5") is None and live.trie.lookup(taken) == live.row_of("intruder")


def test_is_taken_ignores_free_rows() -> None:
    live = LiveCatalogue.from_bundle(catalogue(), 8)
    codes = live.item(4).codes
    assert live.is_taken(codes)
    assert not live.is_taken(codes, frozenset({4}))
    assert not live.is_taken(free_codes(live, 1)[0])


def test_snapshot_rows_rebuild_the_same_catalogue() -> None:
    cat = catalogue()
    live = LiveCatalogue.from_bundle(cat, 8)
    c1, c2 = free_codes(live, 2)
    apply_all(live, entry("x", c1), entry("x", c2, "v2"))
    from models.trie import ItemTrie

    copy = LiveCatalogue(cat, ItemTrie.from_bytes(live.trie.to_bytes()), live.snapshot_rows())
    assert copy.row_of("x") == live.row_of("x") == 21
    assert copy.n_active == live.n_active
    with pytest.raises(ValueError, match="trie has"):
        LiveCatalogue(cat, ItemTrie.from_bytes(live.trie.to_bytes()), [])


def test_entry_json_round_trip() -> None:
    e = Entry("ü/1", (1, 2, 3), "Tïtle", text_hash("x"))
    assert Entry.from_json(e.to_json()) == e


async def test_embedded_store_commits_locally() -> None:
    live = LiveCatalogue.from_bundle(catalogue(), 8)
    store = CatalogueStore(live)
    c1, c2 = free_codes(live, 2)
    async with store.writer:
        await store.sync()
        assert await store.commit([entry("a", c1), entry("b", c2)]) == ["created", "created"]
    assert store.version == 2 and store.healthy
    assert live.row_of("a") == 20 and live.row_of("b") == 21


def test_the_catalogue_lock_shares_reads_and_writers_wait_for_them_then_go_first() -> None:
    from service.store import ReadWriteLock

    lock = ReadWriteLock()
    order: list[str] = []
    first_read = threading.Event()
    release = threading.Event()

    def reader(name: str, hold: threading.Event | None) -> None:
        with lock.read():
            order.append(f"{name} in")
            if hold is not None:
                first_read.set()
                hold.wait(5)
            order.append(f"{name} out")

    def writer() -> None:
        with lock.write():
            order.append("w in")
            order.append("w out")

    r1 = threading.Thread(target=reader, args=("r1", release))
    r1.start()
    assert first_read.wait(5)
    with lock.read():  # a second reader enters while the first holds the lock
        order.append("r2 in")
    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 5
    while not lock._writers_waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    r3 = threading.Thread(target=reader, args=("r3", None))
    r3.start()  # arrives after the writer: waits for it
    time.sleep(0.1)
    assert order == ["r1 in", "r2 in"]
    release.set()
    for t in (r1, w, r3):
        t.join(5)
    assert order == ["r1 in", "r2 in", "r1 out", "w in", "w out", "r3 in", "r3 out"]
