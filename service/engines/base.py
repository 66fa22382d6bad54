"""The interface every decoding engine implements; the service only talks to this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from models.beam import BeamSearchOutput, NewItemBonus
from models.new_items import NewItemSlots, place
from models.repeat import RepeatPrior
from models.trie import ItemTrie


@dataclass(frozen=True)
class DecodeRequest:
    """One user's question: a prompt (token ids, `[bos] + history codes`) and exact exclusions."""

    prompt: list[int]
    k: int
    exclude: frozenset[int] = field(default_factory=frozenset)
    """Catalogue rows (trie item indices) that must not be returned."""
    history: tuple[int, ...] = ()
    """The known history as catalogue rows, oldest first (the repeat-aware mode's candidates)."""
    prior: RepeatPrior | None = None
    """Repeat-aware mode (models/repeat.py) with this prior; None = the plain beam search."""
    new_bonus: float = 0.0
    """Log-probability bonus of items added after training (rows >= `new_from`), applied
    exactly inside the search (models.beam.NewItemBonus); 0 = none."""
    new_from: int = 0
    """The first catalogue row added after training (the bundle's catalogue size)."""
    new_slots: NewItemSlots = field(default_factory=NewItemSlots)
    """Places of the top-k reserved for the best new items (rows >= `new_from`) when their
    score comes within the margin of the item they displace (models.new_items); none by
    default."""


@dataclass(frozen=True)
class Recommendation:
    item_index: int
    score: float
    """Sum over the L tokens of the masked log-softmax (plus the repeat prior for an item of the
    history in the repeat-aware mode, plus the new-item bonus for an item added after
    training)."""
    from_history: bool = False
    """Added by the repeat-aware mode as one of the user's recent items."""


def new_item_bonus(requests: Sequence[DecodeRequest]) -> NewItemBonus | None:
    """The batch's new-item bonus for `models.beam`, None when no request asks for one."""
    if not any(r.new_bonus > 0 for r in requests):
        return None
    firsts = {r.new_from for r in requests if r.new_bonus > 0}
    if len(firsts) > 1:
        raise ValueError(f"requests of one batch name different first new rows {sorted(firsts)}")
    return NewItemBonus(firsts.pop(), [r.new_bonus for r in requests])


def new_item_slots(requests: Sequence[DecodeRequest]) -> tuple[int, int] | None:
    """(first new row, most slots) of the batch's requests that ask for new-item slots; None
    when none does."""
    asking = [r for r in requests if r.new_slots.active]
    if not asking:
        return None
    firsts = {r.new_from for r in asking}
    if len(firsts) > 1:
        raise ValueError(f"requests of one batch name different first new rows {sorted(firsts)}")
    return firsts.pop(), max(r.new_slots.slots for r in asking)


def place_new_items(
    requests: Sequence[DecodeRequest], lists: list[list[Recommendation]], fresh: BeamSearchOutput
) -> list[list[Recommendation]]:
    """Each request's list with its new-item slots filled from `fresh` (the new-item search of
    the batch, catalogue rows; `models.new_items.place`), cut to k."""
    out = []
    new_items, new_scores = fresh.items.tolist(), fresh.scores.tolist()
    for b, (r, row) in enumerate(zip(requests, lists, strict=True)):
        if not r.new_slots.active:
            out.append(row[: r.k])
            continue
        history = {x.item_index for x in row if x.from_history}
        merged = place(
            [x.item_index for x in row],
            [x.score for x in row],
            new_items[b],
            new_scores[b],
            r.new_slots,
            r.k,
            r.new_from,
        )
        out.append([Recommendation(i, s, i in history) for i, s, _ in merged])
    return out


DTYPES = ("float32", "bfloat16", "float16")
"""Weight dtypes every engine accepts (the setting `LETTERREC_DTYPE`)."""


def check_engine_args(dtype: str, beam_width: int, max_batch: int) -> None:
    """The constructor arguments all engines share, checked the same way."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if beam_width < 1 or max_batch < 1:
        raise ValueError(f"beam_width and max_batch must be >= 1, got {beam_width}, {max_batch}")


class DecodeEngine(ABC):
    """Batched, trie-constrained beam search over item identifiers."""

    name: str = "abstract"

    @abstractmethod
    def recommend(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        """Top-k items per request, best first, in request order."""

    def warmup(self, trie: ItemTrie) -> None:  # noqa: B027 - optional hook
        """Run once before serving so the first real request is not slow."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes and memory."""
