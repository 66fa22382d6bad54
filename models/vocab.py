"""The recommender's token layout (DESIGN.md, "Vocabulary of the recommender").

Special tokens first, then one contiguous range per code level:
token(level, code) = code_offset + level * codebook_size + code. Levels never share ids, so a
position in the trie is never ambiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


@dataclass(frozen=True)
class CodeVocab:
    """Layout of the code vocabulary; saved in the bundle manifest as `vocab`."""

    levels: int = 4
    """Code levels per identifier (L)."""
    codebook_size: int = 256
    """Codes per level (N)."""
    history_items: int = 20
    """A prompt holds the codes of at most this many most recent history items."""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    code_offset: int = 3
    """Id of code 0 at level 0."""

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codebook_size < 2 or self.history_items < 0:
            raise ValueError(f"invalid vocabulary layout: {self}")
        if self.code_offset <= max(self.pad_id, self.bos_id, self.eos_id):
            raise ValueError("code_offset must follow the special tokens")

    @property
    def vocab_size(self) -> int:
        return self.code_offset + self.levels * self.codebook_size

    def level_start(self, level: int) -> int:
        """First token id of `level`."""
        return self.code_offset + level * self.codebook_size

    def tokens(self, codes: np.ndarray) -> np.ndarray:
        """Codes [..., L] -> token ids [..., L]."""
        codes = np.asarray(codes, dtype=np.int64)
        return (
            codes + self.code_offset + np.arange(self.levels, dtype=np.int64) * self.codebook_size
        )

    def codes(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids [..., L] -> codes [..., L]; inverse of `tokens`."""
        tokens = np.asarray(tokens, dtype=np.int64)
        return (
            tokens - self.code_offset - np.arange(self.levels, dtype=np.int64) * self.codebook_size
        )

    def prompt(self, history_codes: Sequence[Sequence[int]] | np.ndarray) -> list[int]:
        """`[bos]` + the code tokens of the last `history_items` items, oldest first."""
        hist = np.asarray(history_codes, dtype=np.int64).reshape(-1, self.levels)
        if self.history_items == 0:
            hist = hist[:0]
        else:
            hist = hist[-self.history_items :]
        return [self.bos_id, *self.tokens(hist).reshape(-1).tolist()]

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> CodeVocab:
        known = {k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
