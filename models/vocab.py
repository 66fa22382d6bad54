"""The recommender's token layout (DESIGN.md, "Vocabulary of the recommender").

Special tokens first, then one contiguous range per code level:
token(level, code) = code_offset + level * codebook_size + code. Levels never share ids, so a
position in the trie is never ambiguous.

A from-scratch recommender's prompt is `[bos]` + the history's codes. A pretrained LLM's code
tokens are appended to its own vocabulary (`code_offset` = its tokenizer's length, anywhere
after its special tokens), and its prompt is an instruction template tokenized once at training
time: `prompt_prefix` + the history's codes + `prompt_suffix`, so whoever builds a prompt
(the service) needs no text tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
    prompt_prefix: tuple[int, ...] | None = None
    """Token ids before the history's codes (an LLM's tokenized instruction template, its bos
    included if its tokenizer adds one); None = `(bos_id,)`, the from-scratch layout."""
    prompt_suffix: tuple[int, ...] = ()
    """Token ids after the history's codes (the rest of the template); empty from scratch."""

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codebook_size < 2 or self.history_items < 0:
            raise ValueError(f"invalid vocabulary layout: {self}")
        if self.code_offset <= max(self.pad_id, self.bos_id, self.eos_id):
            raise ValueError("code_offset must follow the special tokens")
        if self.prompt_prefix is not None:
            object.__setattr__(self, "prompt_prefix", tuple(int(t) for t in self.prompt_prefix))
        object.__setattr__(self, "prompt_suffix", tuple(int(t) for t in self.prompt_suffix))
        template = (*self.head, *self.prompt_suffix)
        if not self.head or any(not 0 <= t < self.code_offset for t in template):
            raise ValueError(
                f"prompt template ids {template} must be non-empty before the history and lie in"
                f" 0..{self.code_offset - 1} (below the code tokens)"
            )

    @property
    def head(self) -> tuple[int, ...]:
        """Token ids before the history's codes."""
        return (self.bos_id,) if self.prompt_prefix is None else self.prompt_prefix

    @property
    def max_prompt_len(self) -> int:
        """Tokens of the longest prompt (a full history of `history_items` items)."""
        return len(self.head) + self.history_items * self.levels + len(self.prompt_suffix)

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
        """Prefix (`[bos]` by default) + the code tokens of the last `history_items` items,
        oldest first, + suffix (none by default)."""
        hist = np.asarray(history_codes, dtype=np.int64).reshape(-1, self.levels)
        if self.history_items == 0:
            hist = hist[:0]
        else:
            hist = hist[-self.history_items :]
        return [*self.head, *self.tokens(hist).reshape(-1).tolist(), *self.prompt_suffix]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `vocab`; the template keys only when set, so a from-scratch bundle's
        manifest is what it always was."""
        d: dict[str, Any] = asdict(self)
        if self.prompt_prefix is None and not self.prompt_suffix:
            del d["prompt_prefix"], d["prompt_suffix"]
        else:
            d["prompt_prefix"], d["prompt_suffix"] = list(self.head), list(self.prompt_suffix)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodeVocab:
        known: dict[str, Any] = {
            k: tuple(v) if k.startswith("prompt_") else int(v)
            for k, v in d.items()
            if k in cls.__dataclass_fields__ and v is not None
        }
        return cls(**known)
