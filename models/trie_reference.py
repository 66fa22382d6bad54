"""Plain references for the fast trie and beam search: a dict trie and HF `generate`.

`ReferenceTrie` is the obvious nested-dict trie the LETTER / TIGER code uses; `ItemTrie` must
agree with it on every query (randomized parity test). `reference_beam_search` is the reference
decoding approach: `transformers` beam search with `prefix_allowed_tokens_fn` over that trie.
Both are slow on purpose: they are the yardstick, not the service path.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

from models.vocab import CodeVocab

_COUNT = -1  # key under which a node stores its number of active items


class ReferenceTrie:
    """Nested dicts code -> child; every node keeps the count of active items below it."""

    def __init__(self, levels: int, codebook_size: int) -> None:
        self.levels = levels
        self.codebook_size = codebook_size
        self.root: dict[int, Any] = {_COUNT: 0}
        self.codes: list[tuple[int, ...]] = []
        self.active: list[bool] = []
        self.leaf_item: dict[tuple[int, ...], int] = {}

    @classmethod
    def from_codes(cls, codes: np.ndarray, codebook_size: int) -> ReferenceTrie:
        codes = np.asarray(codes)
        trie = cls(codes.shape[1], codebook_size)
        for row in codes.tolist():
            trie.add(row)
        return trie

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def n_active(self) -> int:
        return self.root[_COUNT]

    def add(self, codes: Sequence[int]) -> int:
        key = tuple(int(c) for c in codes)
        if len(key) != self.levels or not all(0 <= c < self.codebook_size for c in key):
            raise ValueError(f"bad codes {key}")
        if key in self.leaf_item:
            raise ValueError(f"codes {key} already belong to item {self.leaf_item[key]}")
        self._walk(key, +1)
        self.leaf_item[key] = len(self.codes)
        self.codes.append(key)
        self.active.append(True)
        return len(self.codes) - 1

    def deactivate(self, item_index: int) -> None:
        if self.active[item_index]:
            self.active[item_index] = False
            self._walk(self.codes[item_index], -1)
            del self.leaf_item[self.codes[item_index]]

    def _walk(self, key: tuple[int, ...], delta: int) -> None:
        node = self.root
        node[_COUNT] += delta
        for c in key:
            node = node.setdefault(c, {_COUNT: 0})
            node[_COUNT] += delta

    def lookup(self, codes: Sequence[int]) -> int | None:
        return self.leaf_item.get(tuple(int(c) for c in codes))

    def codes_of(self, item_index: int) -> tuple[int, ...]:
        return self.codes[item_index]

    def is_active(self, item_index: int) -> bool:
        return self.active[item_index]

    def child_count(self, prefix: Sequence[int]) -> np.ndarray:
        """Active items under prefix + (c,) for each code c: [N]."""
        out = np.zeros(self.codebook_size, dtype=np.int32)
        node = self._node(prefix)
        if node is not None:
            for c, child in node.items():
                if c != _COUNT:
                    out[c] = child[_COUNT]
        return out

    def _node(self, prefix: Sequence[int]) -> dict[int, Any] | None:
        node: dict[int, Any] | None = self.root
        for c in prefix:
            node = node.get(int(c)) if node is not None else None
        return node

    def allowed(self, prefix: Sequence[int], exclude: Collection[int] = ()) -> list[int]:
        """Codes that continue `prefix` into an active item not in `exclude`."""
        counts = self.child_count(prefix)
        d = len(prefix)
        for item in exclude:
            if 0 <= item < len(self.codes) and self.active[item]:
                codes = self.codes[item]
                if tuple(codes[:d]) == tuple(prefix):
                    counts[codes[d]] -= 1
        return [int(c) for c in np.flatnonzero(counts > 0)]


@torch.inference_mode()
def reference_beam_search(
    model: Any,
    prompts: Sequence[Sequence[int]],
    trie: ReferenceTrie,
    vocab: CodeVocab,
    beam_width: int = 20,
    k: int = 10,
    excludes: Sequence[Collection[int]] | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """HF `generate` beam search constrained by `trie`; per prompt: top-k items and scores.

    Prompts are left-padded into one batch. Beams HF fills with its -1e9 placeholder when fewer
    than `beam_width` real continuations exist are dropped, so fewer than k items may come back.
    """
    width = max(beam_width, k)
    excludes = excludes or [()] * len(prompts)
    p_max = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), p_max), vocab.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, p_max - len(p) :] = torch.tensor(p)
        mask[i, p_max - len(p) :] = 1
    ex = [frozenset(e) for e in excludes]

    def allowed_tokens(batch_id: int, sent: torch.Tensor) -> list[int]:
        generated = sent[p_max:].tolist()
        d = len(generated)
        codes = [t - vocab.level_start(level) for level, t in enumerate(generated)]
        if not all(0 <= c < vocab.codebook_size for c in codes):
            return [vocab.eos_id]  # a dead beam (score -inf); any token keeps it dead
        return [vocab.level_start(d) + c for c in trie.allowed(codes, ex[batch_id])] or [
            vocab.eos_id
        ]

    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        num_beams=width,
        num_return_sequences=width,
        max_new_tokens=vocab.levels,
        prefix_allowed_tokens_fn=allowed_tokens,
        length_penalty=0.0,
        do_sample=False,
        early_stopping=False,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
    )
    seqs = out.sequences[:, p_max:].view(len(prompts), width, -1).cpu()
    scores = out.sequences_scores.view(len(prompts), width).float().cpu()
    items: list[list[int]] = []
    item_scores: list[list[float]] = []
    for b in range(len(prompts)):
        row_items: list[int] = []
        row_scores: list[float] = []
        for w in range(width):
            if scores[b, w] < -1e8 or seqs.shape[-1] != vocab.levels:
                continue  # an HF placeholder beam or a -inf beam
            codes = vocab.codes(seqs[b, w].numpy())
            item = trie.lookup(codes.tolist()) if (codes >= 0).all() else None
            if item is not None and len(row_items) < k:
                row_items.append(item)
                row_scores.append(float(scores[b, w]))
        items.append(row_items)
        item_scores.append(row_scores)
    return items, item_scores
