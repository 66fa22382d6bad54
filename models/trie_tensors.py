"""`TrieTensors`: an `ItemTrie`'s per-level arrays as torch tensors on a device, so the valid next
codes of a whole batch of beams come from one gather (dense levels) or `searchsorted` (sparse
levels) on CPU or CUDA. Read-only: `ItemTrie.tensors` rebuilds it after every add/deactivate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class _LevelTensors:
    counts: torch.Tensor  # dense [N^d] or sparse [M] int32
    keys: torch.Tensor | None  # [M] int64 sorted
    dkeys: torch.Tensor | None  # [m] int64 sorted
    dcounts: torch.Tensor | None  # [m] int32
    items: torch.Tensor | None  # leaf only, aligned with counts
    ditems: torch.Tensor | None  # leaf only, aligned with dcounts


def _t(a: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    # from_numpy shares memory on CPU: a view costs nothing to build.
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)


@dataclass(frozen=True)
class TrieTensors:
    """Read-only tensor view of an ItemTrie for batched masking; see `child_counts`."""

    levels: int
    codebook_size: int
    per_level: tuple[_LevelTensors, ...]  # index d-1: prefixes of length d

    @classmethod
    def from_levels(cls, levels: list[Any], n_levels: int, n: int, device) -> TrieTensors:
        """`levels`: the trie's per-depth `_Level` records (numpy arrays)."""
        dev = torch.device(device)
        per = tuple(
            _LevelTensors(
                torch.from_numpy(np.ascontiguousarray(lv.counts)).to(dev),
                *(_t(a, dev) for a in (lv.keys, lv.dkeys, lv.dcounts, lv.items, lv.ditems)),
            )
            for lv in levels
        )
        return cls(n_levels, n, per)

    def child_counts(self, prefix_keys: torch.Tensor, depth: int) -> torch.Tensor:
        """Active items under each child of each prefix.

        prefix_keys: [...] int64 packed prefixes of length `depth` (0 <= depth < L).
        Returns [..., N] int32: entry c counts the active items under prefix + (c,).
        """
        n = self.codebook_size
        lv = self.per_level[depth]
        child0 = prefix_keys * n  # [...]
        if lv.keys is None:
            idx = child0.unsqueeze(-1) + torch.arange(n, device=child0.device)  # [..., N]
            return lv.counts[idx]
        out = _sparse_children(lv.keys, lv.counts, child0, n)
        if lv.dkeys is not None and lv.dkeys.numel():
            assert lv.dcounts is not None
            out = out + _sparse_children(lv.dkeys, lv.dcounts, child0, n)
        return out

    def items_of(self, full_keys: torch.Tensor) -> torch.Tensor:
        """Packed full identifiers [...] int64 -> active item index [...] int64 (-1 if none)."""
        lv = self.per_level[-1]
        if lv.keys is None:
            assert lv.items is not None
            return torch.where(lv.counts[full_keys] > 0, lv.items[full_keys], -1)
        out = _sparse_lookup(lv.keys, lv.counts, lv.items, full_keys)
        if lv.dkeys is not None and lv.dkeys.numel():
            out = torch.maximum(out, _sparse_lookup(lv.dkeys, lv.dcounts, lv.ditems, full_keys))
        return out


def _sparse_children(
    keys: torch.Tensor, counts: torch.Tensor, child0: torch.Tensor, n: int
) -> torch.Tensor:
    """Scatter the counts of keys in [child0, child0 + n) into [..., n] (a CSR row gather)."""
    shape = child0.shape
    flat0 = child0.reshape(-1)  # [P]
    out = torch.zeros(flat0.numel(), n, dtype=counts.dtype, device=flat0.device)  # [P, N]
    if keys.numel() == 0 or flat0.numel() == 0:
        return out.view(*shape, n)
    lo = torch.searchsorted(keys, flat0)  # [P]
    hi = torch.searchsorted(keys, flat0 + n)  # [P]
    width = int((hi - lo).max())  # the widest row; deep levels are narrow
    if width > 0:
        pos = lo.unsqueeze(1) + torch.arange(width, device=lo.device)  # [P, width]
        inside = pos < hi.unsqueeze(1)
        pos = pos.clamp_(max=keys.numel() - 1)
        code = torch.where(inside, keys[pos] - flat0.unsqueeze(1), 0)  # [P, width]
        src = torch.where(inside, counts[pos], 0)
        out.scatter_add_(1, code, src)
    return out.view(*shape, n)


def _sparse_lookup(keys, counts, items, query: torch.Tensor) -> torch.Tensor:
    """Item index per query key among sorted `keys`, -1 where absent or count 0."""
    if keys.numel() == 0:
        return torch.full_like(query, -1)
    pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
    hit = (keys[pos] == query) & (counts[pos] > 0)
    return torch.where(hit, items[pos], -1)
