"""Repeat-aware recommendations: the beam's items plus the user's recent items, each scored
exactly by the model, combined with a repeat prior fitted on validation.

Generative recommenders place little probability on identifiers the user already has, while on
data with repeat visits (Yelp: 6.5% of test targets are among the last 20 items) those are the
easiest hits. This mode keeps the model's score for every item and adds a small prior to
history items:

    score(i) = log p_model(identifier of i | history) + [i in history] * prior(i)
    prior(i) = bias + recency * log(position of i's latest visit, 1 = newest)
                    + frequency * log(visits of i in the history)

`log p_model` is the sum over the identifier's L tokens of the full-vocabulary log-softmax, the
beam's own scoring rule (for an allowed token the masked log-softmax is the plain one), so a
history item that the beam also found gets exactly the beam's score. Candidates are the beam's
items and the user's distinct recent items; exclusions and inactive items are dropped first.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.beam import BeamSearchOutput, NewItemBonus, beam_search
from models.decoders import Decoder, Prefilled, make_decoder, prefills
from models.trie import ItemTrie
from models.vocab import CodeVocab


@dataclass(frozen=True)
class RepeatPrior:
    """The prior's parameters (fitted on validation, stored in the bundle manifest)."""

    bias: float = 0.0
    recency: float = 0.0
    frequency: float = 0.0

    def of(self, position: np.ndarray, visits: np.ndarray) -> np.ndarray:
        """Prior of history items at `position` (1 = newest) with `visits` in the history."""
        return self.bias + self.recency * np.log(position) + self.frequency * np.log(visits)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RepeatPrior:
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})


def history_candidates(history: Sequence[int], history_items: int) -> tuple[list[int], ...]:
    """The distinct items of the last `history_items`, newest first, with the position of the
    latest visit (1 = newest) and the number of visits in that window."""
    recent = list(history[-history_items:]) if history_items > 0 else []
    items: list[int] = []
    position: list[int] = []
    visits: dict[int, int] = {}
    for pos, item in enumerate(reversed(recent), start=1):
        if item not in visits:
            items.append(item)
            position.append(pos)
            visits[item] = 0
        visits[item] += 1
    return items, position, [visits[i] for i in items]


@torch.inference_mode()
def identifier_log_probs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    prefilled: tuple[torch.Tensor, Any] | None = None,
) -> torch.Tensor:
    """Exact log-probabilities of given identifiers: codes [B, C, L] (one row of candidates per
    prompt) -> [B, C] float32, the sum over levels of the full-vocabulary log-softmax of each
    code token given the prompt and the identifier's earlier codes (teacher forcing through the
    same decoder the beam search uses). `prefilled`: the decoder's (logits, state) of `prompts`
    when the caller already ran the prefill (an unstepped state)."""
    decoder: Decoder = model if hasattr(model, "prefill") else make_decoder(model)
    codes_t = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    b, c, levels = codes_t.shape
    if b == 0 or c == 0:
        return torch.zeros(b, c)
    logits, state = prefilled if prefilled is not None else decoder.prefill(prompts)  # [B, V']
    codes_t = codes_t.to(logits.device)
    step = logits[:, None, :]  # [B, 1, V'] shared by the candidates
    total = torch.zeros(b, c, device=logits.device)
    parents = torch.zeros(b, c, dtype=torch.long, device=logits.device)
    for t in range(levels):
        tokens = codes_t[:, :, t] + vocab.level_start(t)  # [B, C]
        lp = F.log_softmax(step.float(), dim=-1)  # [B, 1 or C, V']
        total += lp.expand(b, c, -1).gather(2, tokens[:, :, None]).squeeze(-1)
        if t < levels - 1:
            step = decoder.step(state, parents, tokens)  # [B, C, V']
            parents = torch.arange(c, device=logits.device).expand(b, c)
    return total.float().cpu()


@dataclass(frozen=True)
class RepeatCandidates:
    """Per user: the beam's items and the recent items, with model scores and prior features."""

    beam: BeamSearchOutput
    items: list[list[int]]
    """Distinct recent items (allowed ones only), newest first."""
    scores: list[np.ndarray]
    position: list[np.ndarray]
    visits: list[np.ndarray]


def repeat_candidates(
    model: Any,
    prompts: Sequence[Sequence[int]],
    histories: Sequence[Sequence[int]],
    trie: ItemTrie,
    vocab: CodeVocab,
    beam_width: int = 20,
    k: int = 10,
    excludes: Sequence[Collection[int]] | None = None,
    new_items: NewItemBonus | None = None,
    prefilled: Sequence[Prefilled | None] | None = None,
) -> RepeatCandidates:
    """Beam search plus the exact scores of each user's recent, allowed items (with the
    new-item bonus where one applies, as the beam scores them). Both decodes start from one
    prefill of the prompts where the decoder can fork its state (`models.decoders.prefills`;
    `prefilled`: the caller's two, for the beam and for the history scores)."""
    decoder: Decoder = model if hasattr(model, "prefill") else make_decoder(model)
    if prefilled is None:
        has_history = len(prompts) and any(len(h) for h in histories)
        prefilled = prefills(decoder, prompts, 2) if has_history else [None, None]
    beam = beam_search(
        decoder, prompts, trie, vocab, beam_width, k, excludes, new_items, prefilled[0]
    )
    table, active = trie.codes_array(), trie.active_mask()
    per_user = []
    for u, hist in enumerate(histories):
        ex = excludes[u] if excludes is not None else ()
        items, pos, vis = history_candidates(hist, vocab.history_items)
        keep = [j for j, i in enumerate(items) if 0 <= i < len(trie) and active[i] and i not in ex]
        per_user.append(([items[j] for j in keep], [pos[j] for j in keep], [vis[j] for j in keep]))
    width = max((len(p[0]) for p in per_user), default=0)
    cand = np.zeros((len(prompts), width, vocab.levels), dtype=np.int64)
    for u, (items, _, _) in enumerate(per_user):
        if items:
            cand[u, : len(items)] = table[items]
    lp = (
        identifier_log_probs(decoder, prompts, cand, vocab, prefilled[1]).numpy() if width else None
    )
    if lp is not None and new_items is not None and new_items.active:
        for u, (items, _, _) in enumerate(per_user):
            is_new = np.asarray(items, dtype=np.int64) >= new_items.first_row
            lp[u, : len(items)] += new_items.bonus[u] * is_new
    return RepeatCandidates(
        beam,
        [p[0] for p in per_user],
        [lp[u, : len(p[0])] if lp is not None else np.zeros(0) for u, p in enumerate(per_user)],
        [np.asarray(p[1], dtype=np.float64) for p in per_user],
        [np.asarray(p[2], dtype=np.float64) for p in per_user],
    )


def rerank_one(
    beam_items: Sequence[int],
    beam_scores: Sequence[float],
    items: Sequence[int],
    scores: Sequence[float] | np.ndarray,
    position: np.ndarray,
    visits: np.ndarray,
    prior: RepeatPrior,
    k: int,
) -> list[tuple[int, float, bool]]:
    """One user's top-k (item, combined score, from the history) over the beam's items and the
    recent items; a beam item that is also a recent item is scored once, with the prior. Ties
    go to the lower item index."""
    merged: dict[int, tuple[float, bool]] = {
        i: (float(s), False) for i, s in zip(beam_items, beam_scores, strict=True) if i >= 0
    }
    if len(items):
        boost = prior.of(np.asarray(position, dtype=np.float64), np.asarray(visits, np.float64))
        for i, s, p in zip(items, scores, boost, strict=True):
            merged[int(i)] = (float(s + p), True)
    ranked = sorted(merged.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
    return [(i, s, h) for i, (s, h) in ranked]


def rerank(
    cand: RepeatCandidates, prior: RepeatPrior, k: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k items and their combined scores per user (`rerank_one` with one prior for all)."""
    out_items, out_scores = [], []
    beam_items, beam_scores = cand.beam.items.tolist(), cand.beam.scores.tolist()
    for u in range(len(cand.items)):
        ranked = rerank_one(
            beam_items[u],
            beam_scores[u],
            cand.items[u],
            cand.scores[u],
            cand.position[u],
            cand.visits[u],
            prior,
            k,
        )
        out_items.append([i for i, _, _ in ranked])
        out_scores.append([s for _, s, _ in ranked])
    return out_items, out_scores


HISTORY_FIRST = 1000.0
"""A bias (and, divided by 10, a recency weight) large enough to dominate any model score: the
grid's corner that puts every recent item first, newest first, as the Recent-history baseline;
its negative drops history items below every other candidate."""


def _merged(cand: RepeatCandidates) -> tuple[np.ndarray, ...]:
    """Padded per-user candidate arrays (as `rerank` merges them): ids [U, C] (-1 = padding),
    model score, is-history, log position, log visits."""
    beam_items, beam_scores = cand.beam.items.tolist(), cand.beam.scores.tolist()
    rows = []
    for u in range(len(cand.items)):
        beam = zip(beam_items[u], beam_scores[u], strict=True)
        merged = {i: (s, 0, 0.0, 0.0) for i, s in beam if i >= 0}
        for i, s, p, v in zip(
            cand.items[u], cand.scores[u], cand.position[u], cand.visits[u], strict=True
        ):
            merged[i] = (float(s), 1, math.log(p), math.log(v))
        rows.append(merged)
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    feats = np.zeros((4, len(rows), width))
    feats[0] = -np.inf
    for u, merged in enumerate(rows):
        ids[u, : len(merged)] = list(merged)
        for j, f in enumerate(zip(*merged.values(), strict=True)) if merged else ():
            feats[j, u, : len(merged)] = f
    return ids, *feats


def fit_prior(
    cand: RepeatCandidates,
    targets: Sequence[int],
    biases: Sequence[float] = (-HISTORY_FIRST, *np.arange(-4.0, 16.01, 0.5), HISTORY_FIRST),
    recencies: Sequence[float] = (0.0, -0.25, -0.5, -1.0, -1.5, -2.0, -3.0, -HISTORY_FIRST / 10),
    frequencies: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    k: int = 10,
) -> tuple[RepeatPrior, float, float]:
    """Grid search for the prior with the best NDCG@k on (validation) `targets`; returns it, its
    NDCG@k and the plain beam's NDCG@k on the same users. Vectorised: for each prior, the rank
    of each target among its user's merged candidates (ties broken by item id, as `rerank`)."""
    plain = _ndcg([r[:k] for r in cand.beam.items.tolist()], targets, k)
    ids, base, hist, logpos, logvis = _merged(cand)
    tgt = np.asarray(targets, dtype=np.int64)[:, None]
    at = ids == tgt  # [U, C]
    found = at.any(1)
    col = at.argmax(1)
    rows = np.arange(len(ids))
    best, best_ndcg = RepeatPrior(), -1.0
    for r in recencies:
        for f in frequencies:
            shape = r * logpos + f * logvis  # [U, C]
            for b in biases:
                total = base + hist * (b + shape)
                t = total[rows, col][:, None]
                ahead = (total > t) | ((total == t) & (ids < tgt) & (ids >= 0))
                rank = ahead.sum(1)
                gain = np.where(found & (rank < k), 1.0 / np.log2(rank + 2.0), 0.0)
                ndcg = float(gain.mean()) if len(gain) else 0.0
                if ndcg > best_ndcg + 1e-12:
                    best, best_ndcg = RepeatPrior(float(b), float(r), float(f)), ndcg
    return best, best_ndcg, plain


def _ndcg(recs: Sequence[Sequence[int]], targets: Sequence[int], k: int) -> float:
    gains = [
        1.0 / math.log2(list(r[:k]).index(t) + 2) if t in list(r[:k]) else 0.0
        for r, t in zip(recs, targets, strict=True)
    ]
    return float(np.mean(gains)) if gains else 0.0
