"""The interface every decoding engine implements; the service only talks to this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from models.trie import ItemTrie


@dataclass(frozen=True)
class DecodeRequest:
    """One user's question: a prompt (token ids, `[bos] + history codes`) and exact exclusions."""

    prompt: list[int]
    k: int
    exclude: frozenset[int] = field(default_factory=frozenset)
    """Catalogue rows (trie item indices) that must not be returned."""


@dataclass(frozen=True)
class Recommendation:
    item_index: int
    score: float
    """Sum over the L tokens of the masked log-softmax."""


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
