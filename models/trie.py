"""The item trie: which code continues a prefix into a real, active catalogue item.

Layout (after STATIC, arXiv 2602.22647): a prefix of length d is packed into one int64 key,
key = sum_l code_l * N^(d-1-l), and every prefix length d = 1..L keeps the number of active items
under each of its prefixes:

- dense levels (N^d <= DENSE_MAX_ENTRIES, e.g. d <= 2 for N = 256): a table of N^d counts, so the
  N children of a prefix p are the slice [p*N, p*N + N);
- sparse levels: the sorted unique keys that occur plus their counts. The children of p form the
  contiguous run of keys in [p*N, p*N + N), found with one `searchsorted`: a CSR row whose row
  pointers are implicit. New keys go to a small sorted delta run beside the main one, merged when it
  grows past a fraction of the main run, so adding an item never rewrites a million-entry array.

Counts (rather than a bitmask) make deactivation and per-request exclusions exact: a prefix is a
valid continuation iff its count, minus the excluded active items under it, is positive.

`TrieTensors` (models/trie_tensors.py) is the same data as torch tensors on a device, so the valid
next codes of a whole batch of beams come from a gather or a `searchsorted` (see `child_counts`). On CPU the tensors
share memory with the arrays; `ItemTrie.tensors` rebuilds the view after every add/deactivate.
Mutating a trie while a search reads it is not supported: serialise updates with decoding (or
decode on a copy, `ItemTrie.from_bytes(trie.to_bytes())`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.trie_tensors import TrieTensors

log = logging.getLogger(__name__)

DENSE_MAX_ENTRIES = 1 << 20
"""A prefix level is stored as a dense table when it has at most this many possible prefixes."""
_MERGE_MIN = 4096
_FORMAT = 1


@dataclass
class _Level:
    """Active-item counts for all prefixes of one length (dense table or sorted sparse keys)."""

    counts: np.ndarray  # dense: [N^d] int32 indexed by key; sparse: [M] int32 aligned with keys
    keys: np.ndarray | None = None  # sparse only: [M] int64, sorted, unique
    dkeys: np.ndarray | None = None  # sparse delta run: [m] int64, sorted, disjoint from keys
    dcounts: np.ndarray | None = None  # [m] int32
    items: np.ndarray | None = None  # leaf level only: item index per entry, -1 when none active
    ditems: np.ndarray | None = None  # leaf level only, aligned with dkeys

    @property
    def dense(self) -> bool:
        return self.keys is None

    def find(self, key: int) -> tuple[str, int] | None:
        """Where `key` is stored: ("dense" | "main" | "delta", position), or None."""
        if self.keys is None:
            return ("dense", key)
        for part, keys in (("main", self.keys), ("delta", self.dkeys)):
            assert keys is not None
            pos = int(np.searchsorted(keys, key))
            if pos < keys.size and keys[pos] == key:
                return (part, pos)
        return None

    def _arrays(self, part: str) -> tuple[np.ndarray, np.ndarray | None]:
        if part == "delta":
            assert self.dcounts is not None
            return self.dcounts, self.ditems
        return self.counts, self.items

    def bump(self, key: int, delta: int, item: int | None = None) -> None:
        """Add `delta` to the count of `key` (inserting it into the delta run if new)."""
        where = self.find(key)
        if where is None:
            self._insert(key, delta, item)
            return
        counts, items = self._arrays(where[0])
        counts[where[1]] += delta
        if items is not None and item is not None:
            items[where[1]] = item

    def _insert(self, key: int, count: int, item: int | None) -> None:
        assert self.dkeys is not None and self.dcounts is not None and self.keys is not None
        pos = int(np.searchsorted(self.dkeys, key))
        self.dkeys = np.insert(self.dkeys, pos, key)
        self.dcounts = np.insert(self.dcounts, pos, np.int32(count))
        if self.ditems is not None:
            self.ditems = np.insert(self.ditems, pos, -1 if item is None else item)
        if self.dkeys.size > max(_MERGE_MIN, self.keys.size // 16):
            self.merge()

    def merge(self) -> None:
        """Fold the delta run into the main run (O(M), amortised over many inserts)."""
        if self.keys is None or self.dkeys is None or self.dkeys.size == 0:
            return
        assert self.dcounts is not None
        pos = np.searchsorted(self.keys, self.dkeys)
        self.keys = np.insert(self.keys, pos, self.dkeys)
        self.counts = np.insert(self.counts, pos, self.dcounts)
        if self.items is not None and self.ditems is not None:
            self.items = np.insert(self.items, pos, self.ditems)
            self.ditems = self.ditems[:0]
        self.dkeys = self.dkeys[:0]
        self.dcounts = self.dcounts[:0]

    def nbytes(self) -> int:
        arrays = (self.counts, self.keys, self.dkeys, self.dcounts, self.items, self.ditems)
        return sum(a.nbytes for a in arrays if a is not None)


def _build_level(sorted_keys: np.ndarray, depth: int, levels: int, n: int, order: np.ndarray):
    """Counts of all length-`depth` prefixes of the sorted full keys."""
    prefix = sorted_keys // (n ** (levels - depth))
    leaf = depth == levels
    if n**depth <= DENSE_MAX_ENTRIES:
        counts = np.bincount(prefix, minlength=n**depth).astype(np.int32)
        items = None
        if leaf:
            items = np.full(n**depth, -1, dtype=np.int64)
            items[prefix] = order
        return _Level(counts=counts, items=items)
    starts = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]]) if prefix.size else prefix
    counts = np.diff(np.r_[starts, prefix.size]).astype(np.int32)
    empty_i64 = np.zeros(0, dtype=np.int64)
    return _Level(
        counts=counts,
        keys=prefix[starts],
        dkeys=empty_i64,
        dcounts=np.zeros(0, dtype=np.int32),
        items=order.astype(np.int64) if leaf else None,
        ditems=empty_i64.copy() if leaf else None,
    )


class ItemTrie:
    """Active catalogue items by their code tuples; row i of the catalogue is item index i."""

    def __init__(self, levels: int, codebook_size: int) -> None:
        if levels < 1 or codebook_size < 2:
            raise ValueError(
                f"need levels >= 1 and codebook_size >= 2, got {levels}, {codebook_size}"
            )
        if levels * np.log2(codebook_size) > 62:
            raise ValueError(
                f"{levels} levels of {codebook_size} codes do not fit a packed int64 key; "
                "use fewer levels or a smaller codebook"
            )
        self.levels = levels
        self.codebook_size = codebook_size
        self.version = 0
        self._codes = np.zeros((0, levels), dtype=np.int32)
        self._active = np.zeros(0, dtype=bool)
        self._n = 0
        self._n_active = 0
        empty = np.zeros(0, dtype=np.int64)
        self._levels: list[_Level] = [  # index d-1 holds prefixes of length d
            _build_level(empty, d, levels, codebook_size, empty) for d in range(1, levels + 1)
        ]
        self._tensors: dict[str, tuple[int, TrieTensors]] = {}
        self._since: tuple[int, int, ItemTrie, np.ndarray] | None = None

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: np.ndarray, codebook_size: int) -> ItemTrie:
        """Build from catalogue codes [n, L]; row i becomes item index i."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise ValueError(f"codes must have shape [n_items, levels], got {codes.shape}")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        codes = codes.astype(np.int64, copy=False)
        bad = np.flatnonzero(((codes < 0) | (codes >= codebook_size)).any(axis=1))
        if bad.size:
            row = int(bad[0])
            raise ValueError(
                f"codes row {row} {codes[row].tolist()} is outside 0..{codebook_size - 1}"
            )
        trie = cls(codes.shape[1], codebook_size)
        keys = trie._pack(codes)  # [n]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if dup.size:
            a, b = int(order[dup[0]]), int(order[dup[0] + 1])
            raise ValueError(
                f"codes rows {a} and {b} share the identifier {codes[b].tolist()}; "
                "item identifiers must be unique"
            )
        n, levels = codes.shape
        trie._n = trie._n_active = n
        trie._store_rows(codes, np.ones(n, dtype=bool))
        trie._levels = [
            _build_level(sorted_keys, d, levels, codebook_size, order) for d in range(1, levels + 1)
        ]
        return trie

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        """Codes [..., d] -> packed int64 prefix keys [...]."""
        codes = np.asarray(codes, dtype=np.int64)
        d = codes.shape[-1]
        powers = self.codebook_size ** np.arange(d - 1, -1, -1, dtype=np.int64)
        return codes @ powers

    def _check_codes(self, codes: Sequence[int]) -> np.ndarray:
        arr = np.asarray(codes, dtype=np.int64).reshape(-1)
        if arr.size != self.levels or ((arr < 0) | (arr >= self.codebook_size)).any():
            raise ValueError(
                f"codes {list(codes)} must be {self.levels} ints in 0..{self.codebook_size - 1}"
            )
        return arr

    # ---- queries ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def n_active(self) -> int:
        return self._n_active

    def lookup(self, codes: Sequence[int]) -> int | None:
        """The active item with these codes, or None."""
        arr = self._check_codes(codes)
        leaf = self._levels[-1]
        where = leaf.find(int(self._pack(arr)))
        if where is None:
            return None
        counts, items = leaf._arrays(where[0])
        assert items is not None
        return int(items[where[1]]) if counts[where[1]] > 0 else None

    def codes_of(self, item_index: int) -> tuple[int, ...]:
        self._check_index(item_index)
        return tuple(int(c) for c in self._codes[item_index])

    def is_active(self, item_index: int) -> bool:
        self._check_index(item_index)
        return bool(self._active[item_index])

    def codes_array(self) -> np.ndarray:
        """Codes of all item slots [len, L] int32 (deactivated rows included; read-only view)."""
        view = self._codes[: self._n]
        view.flags.writeable = False
        return view

    def active_mask(self) -> np.ndarray:
        """[len] bool, read-only view."""
        view = self._active[: self._n]
        view.flags.writeable = False
        return view

    def since(self, first_row: int) -> ItemTrie:
        """The active items of rows >= `first_row` as a trie of their own (renumbered from 0;
        its counts say which prefixes lead to such an item). Cached until the next
        add/deactivate."""
        return self._since_pair(first_row)[0]

    def since_rows(self, first_row: int) -> np.ndarray:
        """The rows of `since(first_row)`'s items, in its order: its item i is row `rows[i]`."""
        return self._since_pair(first_row)[1]

    def _since_pair(self, first_row: int) -> tuple[ItemTrie, np.ndarray]:
        cached = self._since
        if cached is not None and cached[:2] == (self.version, first_row):
            return cached[2], cached[3]
        start = min(max(first_row, 0), self._n)
        rows = start + np.flatnonzero(self._active[start : self._n])
        sub = (
            ItemTrie.from_codes(self._codes[rows], self.codebook_size)
            if rows.size
            else ItemTrie(self.levels, self.codebook_size)
        )
        self._since = (self.version, first_row, sub, rows)
        return sub, rows

    def child_count(self, prefix: Sequence[int]) -> np.ndarray:
        """Active items under prefix + (c,) for every code c: [N] int32 (0 <= len(prefix) < L)."""
        d = len(prefix)
        if not 0 <= d < self.levels:
            raise ValueError(f"prefix length must be in 0..{self.levels - 1}, got {d}")
        out = np.zeros(self.codebook_size, dtype=np.int32)
        base = int(self._pack(np.asarray(prefix, dtype=np.int64))) * self.codebook_size
        for c in range(self.codebook_size):
            where = self._levels[d].find(base + c)
            if where is not None:
                out[c] = self._levels[d]._arrays(where[0])[0][where[1]]
        return out

    def _check_index(self, item_index: int) -> None:
        if not 0 <= item_index < self._n:
            raise IndexError(f"item index {item_index} is outside 0..{self._n - 1}")

    def nbytes(self) -> int:
        """Bytes held by the trie's arrays (codes, flags, all levels)."""
        return self._codes.nbytes + self._active.nbytes + sum(lv.nbytes() for lv in self._levels)

    # ---- updates ----------------------------------------------------------------------------
    def add(self, codes: Sequence[int]) -> int:
        """Append an item; returns its index (the previous len). O(L log n), no rebuild."""
        arr = self._check_codes(codes)
        existing = self.lookup(arr.tolist())
        if existing is not None:
            raise ValueError(f"codes {arr.tolist()} already belong to active item {existing}")
        index = self._n
        self._grow(index + 1)
        self._codes[index] = arr
        self._active[index] = True
        self._n += 1
        self._n_active += 1
        for d in range(1, self.levels + 1):
            item = index if d == self.levels else None
            self._levels[d - 1].bump(int(self._pack(arr[:d])), 1, item)
        self.version += 1
        return index

    def _store_rows(self, codes: np.ndarray, active: np.ndarray) -> None:
        """Item rows with 1/8 spare capacity, so the first adds after a build do not copy."""
        cap = len(codes) + max(1024, len(codes) // 8)
        self._codes = np.zeros((cap, self.levels), dtype=np.int32)
        self._codes[: len(codes)] = codes
        self._active = np.zeros(cap, dtype=bool)
        self._active[: len(codes)] = active

    def _grow(self, size: int) -> None:
        if size <= self._codes.shape[0]:
            return
        cap = max(size, 2 * self._codes.shape[0], 16)
        codes = np.zeros((cap, self.levels), dtype=np.int32)
        codes[: self._n] = self._codes[: self._n]
        active = np.zeros(cap, dtype=bool)
        active[: self._n] = self._active[: self._n]
        self._codes, self._active = codes, active

    def deactivate(self, item_index: int) -> None:
        """Remove an item from decoding; its codes become free for a new item."""
        self._check_index(item_index)
        if not self._active[item_index]:
            return
        arr = self._codes[item_index].astype(np.int64)
        self._active[item_index] = False
        self._n_active -= 1
        for d in range(1, self.levels + 1):
            item = -1 if d == self.levels else None
            self._levels[d - 1].bump(int(self._pack(arr[:d])), -1, item)
        self.version += 1

    # ---- serialisation ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A self-contained npz (no pickle); `from_bytes` restores it without a rebuild."""
        # Any: numpy's stub would otherwise read a key as its `allow_pickle` flag.
        arrays: dict[str, Any] = {
            "meta": np.array([_FORMAT, self.levels, self.codebook_size, self._n, self.version]),
            "codes": self._codes[: self._n],
            "active": self._active[: self._n],
        }
        for d, level in enumerate(self._levels, start=1):
            level.merge()
            arrays[f"counts{d}"] = level.counts
            if level.keys is not None:
                arrays[f"keys{d}"] = level.keys
            if level.items is not None:
                arrays[f"items{d}"] = level.items
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ItemTrie:
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            fmt, levels, n_codes, n, version = (int(x) for x in npz["meta"])
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"not a serialised ItemTrie: {err}") from err
        if fmt != _FORMAT:
            raise ValueError(f"serialised ItemTrie has format {fmt}, this code reads {_FORMAT}")
        trie = cls(levels, n_codes)
        trie._levels = []
        active = npz["active"].astype(bool)
        trie._n, trie._n_active, trie.version = n, int(active.sum()), version
        trie._store_rows(npz["codes"], active)
        for d in range(1, levels + 1):
            keys = npz.get(f"keys{d}")
            items = npz.get(f"items{d}")
            level = _Level(counts=npz[f"counts{d}"].copy(), keys=keys, items=items)
            if keys is not None:
                level.dkeys = np.zeros(0, np.int64)
                level.dcounts = np.zeros(0, np.int32)
                level.ditems = np.zeros(0, np.int64) if items is not None else None
            trie._levels.append(level)
        return trie

    # ---- tensors for batched decoding -------------------------------------------------------
    def tensors(self, device: str | torch.device = "cpu") -> TrieTensors:
        """The trie as tensors on `device`, cached until the next add/deactivate."""
        key = str(torch.device(device))
        cached = self._tensors.get(key)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        tt = TrieTensors.from_levels(self._levels, self.levels, self.codebook_size, device)
        self._tensors[key] = (self.version, tt)
        return tt
