"""New-item slots: up to `slots` of a top-k list's last places go to the best items added after
training (rows >= the bundle's catalogue size, e.g. by POST /tokenize), each scored exactly by
the model, when its score comes within `margin` of the item it would displace.

Why not only a bonus (models.beam.NewItemBonus): a model trained without an item puts little
probability on its identifier, and a bonus large enough to lift the right new item into the top
10 lifts every new item, so they crowd out the warm items that most users want (on Yelp a bonus
of 16 finds 4.8% of validation cold targets and costs 80% of overall recall). Slots bound that
cost: the list keeps at least k - slots warm items, and the displaced ones are the list's last.

The new items are found by a second exact beam search over the trie of new items only
(`ItemTrie.since`): its best identifiers by the same score the main search uses, so a new item
the main search pruned for a weaker prefix is still found. The lists are merged by score, so a
new item keeps its own place when its score earns one; an admitted item whose score is below
the warm items it joins lands last.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.beam import BeamSearchOutput, beam_search
from models.decoders import Decoder, Prefilled
from models.trie import ItemTrie
from models.vocab import CodeVocab


@dataclass(frozen=True)
class NewItemSlots:
    """`slots` places at most for new items, each admitted when its log-probability plus `margin`
    reaches the score of the item it displaces (inf: always, when a new item exists)."""

    slots: int = 0
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.slots < 0:
            raise ValueError(f"new-item slots must be >= 0, got {self.slots}")
        if self.margin != self.margin:  # NaN
            raise ValueError("new-item margin must be a number, got NaN")

    @property
    def active(self) -> bool:
        return self.slots > 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> NewItemSlots:
        d = d or {}
        return cls(int(d.get("slots", 0)), float(d.get("margin", 0.0)))


def new_item_trie(
    trie: ItemTrie, first_row: int, excludes: Sequence[Collection[int]] | None = None
) -> tuple[ItemTrie, np.ndarray, list[set[int]] | None]:
    """The trie of the active items of rows >= `first_row` (`ItemTrie.since`), its items' rows,
    and `excludes` (catalogue rows) as its own item indices."""
    sub, rows = trie.since(first_row), trie.since_rows(first_row)
    if excludes is None:
        return sub, rows, None
    sub_ex = []
    for ex in excludes:
        new = np.asarray(sorted(i for i in ex if i >= first_row), dtype=np.int64)
        at = np.searchsorted(rows, new)
        hit = (at < len(rows)) & (rows[np.minimum(at, max(len(rows) - 1, 0))] == new)
        sub_ex.append(set(at[hit].tolist()))
    return sub, rows, sub_ex


def to_rows(out: BeamSearchOutput, rows: np.ndarray) -> BeamSearchOutput:
    """A search over `new_item_trie`'s trie with its item indices mapped to catalogue rows."""
    if len(rows) == 0:
        return BeamSearchOutput(torch.full_like(out.items, -1), out.scores)
    table = torch.as_tensor(rows, dtype=torch.long)
    items = torch.where(out.items >= 0, table[out.items.clamp(min=0)], -1)
    return BeamSearchOutput(items, out.scores)


def new_item_search(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    trie: ItemTrie,
    vocab: CodeVocab,
    first_row: int,
    k: int,
    beam_width: int = 20,
    excludes: Sequence[Collection[int]] | None = None,
    prefilled: Prefilled | None = None,
) -> BeamSearchOutput:
    """The top-k active items of rows >= `first_row` per prompt (catalogue rows; -1 / -inf
    where fewer exist), by the beam search over their own trie; `excludes` as catalogue rows."""
    sub, rows, sub_ex = new_item_trie(trie, first_row, excludes)
    b = len(prompts)
    if len(rows) == 0 or b == 0:
        return BeamSearchOutput(
            torch.full((b, k), -1, dtype=torch.long), torch.full((b, k), float("-inf"))
        )
    out = beam_search(decoder, prompts, sub, vocab, beam_width, k, sub_ex, None, prefilled)
    return to_rows(out, rows)


def place(
    items: Sequence[int],
    scores: Sequence[float],
    new_items: Sequence[int],
    new_scores: Sequence[float],
    slots: NewItemSlots,
    k: int,
    first_row: int,
) -> list[tuple[int, float, bool]]:
    """One list's top-k (item, score, placed by a slot): the main search's `items` (best first;
    -1 = none) with `new_items` (best first) admitted until the list holds `slots.slots` new
    items (rows >= `first_row`; those the main list has on merit count). Free places (a main
    list shorter than k) admit a new item outright; otherwise each admission displaces the
    list's last remaining warm item and needs new score + margin >= that item's score. The
    result is ordered by score (ties: main items first)."""
    main = [(int(i), float(s)) for i, s in zip(items, scores, strict=True) if i >= 0][:k]
    present = {i for i, _ in main}
    candidates = [
        (int(i), float(s))
        for i, s in zip(new_items, new_scores, strict=True)
        if i >= 0 and int(i) not in present
    ]
    # Warm items may be displaced, the last first; new items listed on merit stay.
    warm = [j for j, (i, _) in enumerate(main) if i < first_row]
    wanted = max(0, slots.slots - (len(main) - len(warm)))
    admitted: list[tuple[int, float]] = []
    dropped: set[int] = set()
    for item, score in candidates[:wanted]:
        if len(main) - len(dropped) + len(admitted) < k:
            admitted.append((item, score))
        elif len(dropped) < len(warm) and score + slots.margin >= main[warm[-1 - len(dropped)]][1]:
            dropped.add(warm[-1 - len(dropped)])
            admitted.append((item, score))
        else:
            break  # later candidates score lower and would displace higher-scored items
    kept = [(i, s, False) for j, (i, s) in enumerate(main) if j not in dropped]
    merged = kept + [(i, s, True) for i, s in admitted]
    return sorted(merged, key=lambda r: -r[1])  # stable: main items first on ties
