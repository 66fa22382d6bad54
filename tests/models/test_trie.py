"""ItemTrie: hand-checked cases, and randomized parity with the dict ReferenceTrie."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models.trie as trie_mod
from models.trie import ItemTrie
from models.trie_reference import ReferenceTrie
from tests.lmfactory import random_catalogue

# Three items over N=3 codes, two levels: 0->{1,2}, 1->{0}.
TINY = np.array([[0, 1], [0, 2], [1, 0]])


@pytest.fixture(params=["dense", "sparse"])
def layout(request, monkeypatch):
    """Run a test with dense tables and again with every level sparse (CSR + delta runs)."""
    if request.param == "sparse":
        monkeypatch.setattr(trie_mod, "DENSE_MAX_ENTRIES", 0)
        monkeypatch.setattr(trie_mod, "_MERGE_MIN", 3)
    return request.param


def test_tiny_counts_and_lookup(layout):
    trie = ItemTrie.from_codes(TINY, 3)
    assert (len(trie), trie.n_active, trie.levels, trie.codebook_size) == (3, 3, 2, 3)
    assert trie.child_count([]).tolist() == [2, 1, 0]
    assert trie.child_count([0]).tolist() == [0, 1, 1]
    assert trie.child_count([2]).tolist() == [0, 0, 0]
    assert [trie.lookup(c) for c in ([0, 1], [0, 2], [1, 0], [2, 2])] == [0, 1, 2, None]
    assert trie.codes_of(1) == (0, 2)
    assert trie.is_active(2)


def test_tiny_tensor_queries(layout):
    tt = ItemTrie.from_codes(TINY, 3).tensors("cpu")
    keys = torch.tensor([[0, 1, 2]])  # prefixes (0,), (1,), (2,)  [1, 3]
    assert tt.child_counts(keys, 1).tolist() == [[[0, 1, 1], [1, 0, 0], [0, 0, 0]]]
    assert tt.child_counts(torch.zeros(2, dtype=torch.long), 0).tolist() == [[2, 1, 0]] * 2
    full = torch.tensor([0 * 3 + 2, 1 * 3 + 0, 2 * 3 + 2])
    assert tt.items_of(full).tolist() == [1, 2, -1]


def test_add_deactivate_and_readd(layout):
    trie = ItemTrie.from_codes(TINY, 3)
    v0 = trie.version
    assert trie.add([2, 2]) == 3
    assert trie.child_count([]).tolist() == [2, 1, 1]
    trie.deactivate(0)
    assert trie.version == v0 + 2
    assert trie.lookup([0, 1]) is None and not trie.is_active(0)
    assert trie.child_count([0]).tolist() == [0, 0, 1]
    assert (len(trie), trie.n_active) == (4, 3)
    assert trie.add([0, 1]) == 4  # freed codes take a new item index
    assert trie.lookup([0, 1]) == 4
    assert trie.tensors().items_of(torch.tensor([1])).tolist() == [4]
    with pytest.raises(ValueError, match="already belong to active item 4"):
        trie.add([0, 1])


def test_tensors_follow_updates(layout):
    trie = ItemTrie.from_codes(TINY, 3)
    before = trie.tensors()
    trie.add([2, 1])
    after = trie.tensors()
    assert after is not before
    assert after.child_counts(torch.tensor([2]), 1).tolist() == [[0, 1, 0]]
    assert trie.tensors() is after


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (np.array([[0, 1], [1, 1], [0, 1]]), "rows 0 and 2 share"),
        (np.array([[0, 1], [0, 3]]), "row 1 .* outside 0..2"),
        (np.array([[0, -1]]), "row 0"),
        (np.array([0, 1, 2]), "shape"),
        (np.array([[0.5, 1.0]]), "integers"),
    ],
)
def test_from_codes_rejects(codes, match):
    with pytest.raises(ValueError, match=match):
        ItemTrie.from_codes(codes, 3)


def test_add_rejects_bad_codes():
    trie = ItemTrie.from_codes(TINY, 3)
    for bad in ([0], [0, 3], [0, 1, 2]):
        with pytest.raises(ValueError, match="must be 2 ints in 0..2"):
            trie.add(bad)
    with pytest.raises(IndexError, match="item index 9"):
        trie.deactivate(9)


def test_empty_trie_then_add(layout):
    trie = ItemTrie(3, 4)
    assert len(trie) == 0 and trie.lookup([1, 2, 3]) is None
    assert trie.tensors().child_counts(torch.tensor([0]), 0).tolist() == [[0, 0, 0, 0]]
    assert trie.add([1, 2, 3]) == 0
    assert trie.child_count([1, 2]).tolist() == [0, 0, 0, 1]


def test_bytes_round_trip(layout):
    trie = ItemTrie.from_codes(random_catalogue(300, 3, 8, seed=1), 8)
    trie.deactivate(5)
    free = next(c for c in np.ndindex(8, 8, 8) if trie.lookup(c) is None)
    trie.add(list(free))
    back = ItemTrie.from_bytes(trie.to_bytes())
    assert (len(back), back.n_active, back.version) == (len(trie), trie.n_active, trie.version)
    assert np.array_equal(back.codes_array(), trie.codes_array())
    for prefix in ([], [3], [3, 4], list(free[:2])):
        assert np.array_equal(back.child_count(prefix), trie.child_count(prefix))
    assert back.lookup(list(free)) == len(trie) - 1
    back.deactivate(0)  # a loaded trie stays mutable
    assert back.add(list(trie.codes_of(0))) == len(trie)


def test_from_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="not a serialised ItemTrie"):
        ItemTrie.from_bytes(b"not a trie")


def _assert_same(fast: ItemTrie, ref: ReferenceTrie, rng: np.random.Generator) -> None:
    assert (len(fast), fast.n_active) == (len(ref), ref.n_active)
    levels, n = fast.levels, fast.codebook_size
    tt = fast.tensors()
    for depth in range(levels):
        prefixes = rng.integers(0, n, size=(24, depth))
        # Also query prefixes of real items so non-empty rows are covered.
        real = fast.codes_array()[rng.integers(0, len(fast), size=8), :depth].astype(np.int64)
        prefixes = np.concatenate([prefixes, real])
        want = np.stack([ref.child_count(p.tolist()) for p in prefixes])
        keys = torch.from_numpy(prefixes @ (n ** np.arange(depth - 1, -1, -1)))
        assert np.array_equal(tt.child_counts(keys, depth).numpy(), want)
        assert np.array_equal(np.stack([fast.child_count(p.tolist()) for p in prefixes]), want)
    probes = np.concatenate(
        [fast.codes_array()[rng.integers(0, len(fast), size=16)], rng.integers(0, n, (16, levels))]
    )
    full = torch.from_numpy(probes.astype(np.int64) @ (n ** np.arange(levels - 1, -1, -1)))
    want_items = [ref.lookup(p.tolist()) for p in probes]
    assert [fast.lookup(p.tolist()) for p in probes] == want_items
    assert tt.items_of(full).tolist() == [-1 if w is None else w for w in want_items]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_reference(layout, seed):
    rng = np.random.default_rng(seed)
    levels, n = int(rng.integers(1, 4)), int(rng.integers(2, 7))
    codes = random_catalogue(int(rng.integers(1, n**levels)), levels, n, seed)
    fast, ref = ItemTrie.from_codes(codes, n), ReferenceTrie.from_codes(codes, n)
    _assert_same(fast, ref, rng)
    for _ in range(60):
        if rng.random() < 0.5 and fast.n_active:
            victim = int(rng.choice(np.flatnonzero(fast.active_mask())))
            fast.deactivate(victim)
            ref.deactivate(victim)
        else:
            cand = rng.integers(0, n, size=levels).tolist()
            if ref.lookup(cand) is None:
                assert fast.add(cand) == ref.add(cand)
            else:
                with pytest.raises(ValueError):
                    fast.add(cand)
        if rng.random() < 0.2:
            _assert_same(fast, ref, rng)
    _assert_same(fast, ref, rng)
    _assert_same(ItemTrie.from_bytes(fast.to_bytes()), ref, rng)


def test_large_catalogue_is_compact():
    """1M-item trie memory is covered by the benchmark; here 100k items stay well under 10 MB."""
    trie = ItemTrie.from_codes(random_catalogue(100_000, 4, 256, seed=0), 256)
    assert trie.nbytes() < 10_000_000
    assert len(trie.to_bytes()) < 10_000_000
