"""Trie-constrained beam search over item identifiers, batched over users.

Scoring is the reference's (HF `generate` with `prefix_allowed_tokens_fn`, `length_penalty=0`):
at each of the L steps, log-softmax over the whole vocabulary in float32, disallowed codes set to
-inf (no renormalisation), cumulative sum, top-W over all W x N continuations of a user.

The language model is run by a `Decoder` (models/decoders.py): the shared-prefix decoders keep
one history KV cache per user for all its beams; `FusedDecoder` (models/fused_decoder.py, the
default for Llama/Qwen2) does so over weights re-laid out for fewer, larger kernels.

New items (rows added after training, e.g. by POST /tokenize) can be favoured by a per-request
bonus b >= 0 in log-probability units: the search ranks identifiers by log P(identifier) + b when
the item is new. It stays exact in the sense of the beam: a prefix is ranked by its log-probability
plus b when some new item lies under it (an upper bound on the bonus any completion can collect,
so no prefix leading to a new item is pruned for lacking a bonus it would get), and at the last
level that is exactly the bonused score of the item. With b = 0 the search is the plain one.

Per-request exclusions are exact: a code is allowed iff the active items under the extended prefix
outnumber the excluded active items under it, so a prefix whose items are all excluded is masked
at every level, exactly as if the excluded items were not in the trie.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from models.decoders import Decoder, make_decoder
from models.trie import ItemTrie
from models.vocab import CodeVocab


@dataclass(frozen=True)
class BeamSearchOutput:
    items: torch.Tensor  # [B, k] int64 item indices, best first; -1 where fewer than k exist
    scores: torch.Tensor  # [B, k] float32 summed masked log-probs; -inf where items is -1


@dataclass(frozen=True)
class NewItemBonus:
    """Favour the items of rows >= `first_row` (added after training) by `bonus[b]` for prompt
    b (log-probability units, >= 0)."""

    first_row: int
    bonus: Sequence[float]

    def __post_init__(self) -> None:
        bad = [b for b in self.bonus if not (b >= 0 and b < float("inf"))]
        if bad:
            raise ValueError(f"new-item bonus must be finite and >= 0, got {bad[0]}")

    @property
    def active(self) -> bool:
        return any(b > 0 for b in self.bonus)


# ---- pure steps ----------------------------------------------------------------------------
def allowed_codes(
    child_counts: torch.Tensor,  # [B, W, N] active items under prefix + (c,)
    beam_keys: torch.Tensor,  # [B, W] packed prefix of each beam
    ex_keys: torch.Tensor,  # [B, E] packed prefix (same length) of each excluded item
    ex_next: torch.Tensor,  # [B, E] next code of each excluded item
    ex_valid: torch.Tensor,  # [B, E] bool, False for padding
) -> torch.Tensor:
    """[B, W, N] bool: codes leading to at least one active, non-excluded item."""
    if ex_keys.shape[1] == 0:
        return child_counts > 0
    match = (beam_keys[:, :, None] == ex_keys[:, None, :]) & ex_valid[:, None, :]  # [B, W, E]
    index = ex_next[:, None, :].expand_as(match)  # [B, W, E]
    excluded = torch.zeros_like(child_counts).scatter_add_(2, index, match.to(child_counts.dtype))
    return child_counts > excluded


def masked_log_probs(
    logits: torch.Tensor, level_start: int, codebook_size: int, allowed: torch.Tensor
) -> torch.Tensor:
    """logits [..., V] -> [..., N] float32: full-vocabulary log-softmax of this level's codes,
    -inf where not `allowed` [..., N] (broadcastable)."""
    lp = F.log_softmax(logits.float(), dim=-1)[..., level_start : level_start + codebook_size]
    return lp.masked_fill(~allowed, float("-inf"))


def select_beams(
    scores: torch.Tensor, log_probs: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [B, W] + log_probs [B, W, N] -> best `width` continuations per user:
    (scores [B, width] descending, parent beam [B, width], code [B, width])."""
    n = log_probs.shape[-1]
    cand = (log_probs + scores[:, :, None]).flatten(1)  # [B, W*N]
    top, idx = torch.topk(cand, width, dim=1)
    return top, idx // n, idx % n


# ---- the search ----------------------------------------------------------------------------
def _exclusion_codes(
    trie: ItemTrie, excludes: Sequence[Collection[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of each request's excluded ACTIVE items: ([B, E, L] int64, valid [B, E] bool)."""
    active = trie.active_mask()
    rows = [sorted(i for i in ex if 0 <= i < len(trie) and active[i]) for ex in excludes]
    e = max((len(r) for r in rows), default=0)
    codes = torch.zeros(len(rows), e, trie.levels, dtype=torch.int64)
    valid = torch.zeros(len(rows), e, dtype=torch.bool)
    table = trie.codes_array()
    for b, r in enumerate(rows):
        if r:
            codes[b, : len(r)] = torch.from_numpy(table[r].astype("int64"))
            valid[b, : len(r)] = True
    return codes.to(device), valid.to(device)


class LevelScorer(Protocol):
    """What the search needs from a model: the log-probabilities of one level's codes.

    `log_probs(level, parent, code, allowed)`: for level 0 `parent` and `code` are None and the
    result is [B, 1, N] (one live beam per user) or [B, W, N]; for level t > 0 they are the
    previous level's selection ([B, W] parent beam and code of each surviving beam) and the
    result is [B, W, N]. Values are the full-vocabulary log-softmax of each code (float32), -inf
    where `allowed` [B, W, N] is False (dead beams have nothing allowed). A scorer may skip the
    model for disallowed codes; it must not renormalise over the allowed ones.
    """

    def log_probs(
        self,
        level: int,
        parent: torch.Tensor | None,
        code: torch.Tensor | None,
        allowed: torch.Tensor,
    ) -> torch.Tensor: ...


class DecoderScorer:
    """`LevelScorer` over a `Decoder`: the prompts' prefill, then one decoder step per level."""

    def __init__(
        self,
        decoder: Decoder,
        prompts: Sequence[Sequence[int]],
        vocab: CodeVocab,
        prefilled: tuple[torch.Tensor, Any] | None = None,
    ):
        """`prefilled`: the (logits, state) of `decoder.prefill(prompts)` when the caller ran it
        (the state must not have been stepped)."""
        self.decoder, self.vocab = decoder, vocab
        logits, self.state = prefilled if prefilled is not None else decoder.prefill(prompts)
        self.logits = logits[:, None, :]  # [B, 1, V], broadcast over the beams
        self.device = logits.device

    def log_probs(
        self,
        level: int,
        parent: torch.Tensor | None,
        code: torch.Tensor | None,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        if level > 0:
            assert parent is not None and code is not None
            token = code + self.vocab.level_start(level - 1)
            self.logits = self.decoder.step(self.state, parent, token)  # [B, W, V]
        n = self.vocab.codebook_size
        return masked_log_probs(self.logits, self.vocab.level_start(level), n, allowed)


@torch.inference_mode()
def beam_search(
    model: Any,
    prompts: Sequence[Sequence[int]],
    trie: ItemTrie,
    vocab: CodeVocab,
    beam_width: int = 20,
    k: int = 10,
    excludes: Sequence[Collection[int]] | None = None,
    new_items: NewItemBonus | None = None,
    prefilled: tuple[torch.Tensor, Any] | None = None,
) -> BeamSearchOutput:
    """Top-k active items per prompt by constrained beam search (width max(beam_width, k)).

    `model` is an HF causal LM (a decoder is chosen by `make_decoder`) or a `Decoder`.
    `new_items`: favour items added after training (see the module docstring); the returned
    scores then include the bonus. `prefilled`: the decoder's prefill of `prompts`, when the
    caller already ran it (see `DecoderScorer`).
    """
    _check_trie(trie, vocab)
    if len(prompts) == 0:
        return BeamSearchOutput(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    decoder: Decoder = model if hasattr(model, "prefill") else make_decoder(model)
    scorer = DecoderScorer(decoder, prompts, vocab, prefilled)
    return search(
        scorer, len(prompts), trie, vocab, beam_width, k, excludes, new_items, scorer.device
    )


def _check_trie(trie: ItemTrie, vocab: CodeVocab) -> None:
    if trie.levels != vocab.levels or trie.codebook_size != vocab.codebook_size:
        raise ValueError(
            f"trie ({trie.levels} x {trie.codebook_size}) does not match the vocabulary "
            f"({vocab.levels} x {vocab.codebook_size})"
        )


def search(
    scorer: LevelScorer,
    b: int,
    trie: ItemTrie,
    vocab: CodeVocab,
    beam_width: int = 20,
    k: int = 10,
    excludes: Sequence[Collection[int]] | None = None,
    new_items: NewItemBonus | None = None,
    device: torch.device | str = "cpu",
) -> BeamSearchOutput:
    """The search loop over any `LevelScorer` for `b` users: the trie's allowed codes (with
    exclusions), the new-item lift, the top-W selection and the final ranking. Every engine
    runs this loop; they differ only in how the model scores a level."""
    _check_trie(trie, vocab)
    width, n = max(beam_width, k), vocab.codebook_size
    if b == 0:
        return BeamSearchOutput(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    device = torch.device(device)
    tt = trie.tensors(device)
    ex_codes, ex_valid = _exclusion_codes(trie, excludes or [()] * b, device)
    ex_keys = torch.zeros(ex_valid.shape, dtype=torch.int64, device=device)  # [B, E]
    # Only beam 0 is live before the first step, so each first code is chosen once.
    scores = torch.full((b, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    keys = torch.zeros(b, width, dtype=torch.int64, device=device)  # [B, W]
    fresh, bonus = None, None
    if new_items is not None and new_items.active:
        if len(new_items.bonus) != b:
            raise ValueError(f"{len(new_items.bonus)} new-item bonuses for {b} prompts")
        fresh = trie.since(new_items.first_row).tensors(device)
        bonus = torch.tensor(list(new_items.bonus), dtype=torch.float32, device=device)[:, None]
    ranked = scores
    parent: torch.Tensor | None = None
    code: torch.Tensor | None = None
    for t in range(vocab.levels):
        counts = tt.child_counts(keys, t)  # [B, W, N]
        allowed = allowed_codes(counts, keys, ex_keys, ex_codes[:, :, t], ex_valid)
        allowed &= torch.isfinite(scores)[:, :, None]  # dead beams extend to nothing
        if t == 0:
            allowed = allowed[:, :1]  # one live beam per user
        lp = scorer.log_probs(t, parent, code, allowed)  # [B, W or 1, N]
        if fresh is None:
            ranked, parent, code = select_beams(scores, lp, width)
            scores = ranked
        else:
            assert bonus is not None
            # Rank by log-prob + the bonus of a prefix with a new item under it; carry the
            # log-prob alone to the next level.
            lift = (fresh.child_counts(keys, t) > 0) * bonus[:, :, None]  # [B, W, N]
            ranked, parent, code = select_beams(scores, lp + lift, width)
            scores = ranked - lift.flatten(1).gather(1, parent * n + code)
        keys = keys.gather(1, parent) * n + code
        ex_keys = ex_keys * n + ex_codes[:, :, t]
    return _finish(tt.items_of(keys), ranked, k)


def _finish(items: torch.Tensor, scores: torch.Tensor, k: int) -> BeamSearchOutput:
    """Drop dead beams (-inf) and keys without an active item; best first; pad to k."""
    ok = (items >= 0) & torch.isfinite(scores)  # [B, W]
    scores = torch.where(ok, scores, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    scores, items = scores.gather(1, order), items.gather(1, order)
    items = torch.where(torch.isfinite(scores), items, -1)
    return BeamSearchOutput(items.cpu(), scores.float().cpu())
