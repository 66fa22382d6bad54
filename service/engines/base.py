"""The interface every decoding engine implements; the service only talks to this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from models.beam import NewItemBonus
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
