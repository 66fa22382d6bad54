"""Choosing the recommendation mode on validation: plain beam search (the paper's protocol),
history excluded inside the search, or repeat-aware (models/repeat.py) with its prior fitted on
validation users. The choice and the prior go into the bundle manifest (`recommend`), where the
service reads its defaults."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.beam import BeamSearchOutput, beam_search
from models.decoders import make_decoder
from models.repeat import RepeatCandidates, RepeatPrior, fit_prior, repeat_candidates, rerank
from models.trie import ItemTrie
from models.vocab import CodeVocab
from training.lm import history_prompts
from training.metrics import bootstrap_se, gains_at, ranks_from_lists, summarize

log = logging.getLogger(__name__)

MODES = ("plain", "exclude_history", "repeat")


def candidates(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    trie: ItemTrie,
    beam_width: int = 20,
    batch_size: int = 256,
    progress: bool = False,
) -> RepeatCandidates:
    """Repeat candidates (beam + exactly scored recent items) for every history of `pairs`."""
    decoder = make_decoder(model)
    parts = []
    starts = range(0, len(pairs), batch_size)
    for s in tqdm(starts, desc="beam + history scores", unit="batch", disable=not progress):
        chunk = pairs[s : s + batch_size]
        prompts = history_prompts([h for h, _ in chunk], codes, vocab)
        hist = [h for h, _ in chunk]
        # k = the width: all beams are candidates, as the service's engine keeps them.
        parts.append(repeat_candidates(decoder, prompts, hist, trie, vocab, beam_width, beam_width))
    return concat(parts)


def concat(parts: Sequence[RepeatCandidates]) -> RepeatCandidates:
    k = max((p.beam.items.shape[1] for p in parts), default=0)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)

    return RepeatCandidates(
        BeamSearchOutput(
            torch.cat([pad(p.beam.items, -1) for p in parts]) if parts else torch.zeros(0, 0),
            torch.cat([pad(p.beam.scores, float("-inf")) for p in parts])
            if parts
            else torch.zeros(0, 0),
        ),
        [i for p in parts for i in p.items],
        [s for p in parts for s in p.scores],
        [s for p in parts for s in p.position],
        [s for p in parts for s in p.visits],
    )


def excluded_lists(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    trie: ItemTrie,
    beam_width: int = 20,
    batch_size: int = 256,
) -> list[list[int]]:
    """Top-10 lists with the (last `history_items`) history excluded inside the search."""
    decoder = make_decoder(model)
    out: list[list[int]] = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        prompts = history_prompts([h for h, _ in chunk], codes, vocab)
        ex = [set(h[-vocab.history_items :]) if vocab.history_items else set() for h, _ in chunk]
        res = beam_search(decoder, prompts, trie, vocab, beam_width, 10, ex)
        out.extend([[i for i in row if i >= 0] for row in res.items.tolist()])
    return out


def choose_mode(
    model: torch.nn.Module,
    valid: Sequence[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    beam_width: int = 20,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the repeat prior on `valid` and pick the served mode on validation NDCG@10
    (`pick_mode`). Returns the manifest's `recommend` entry."""
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    targets = [t for _, t in valid]
    cand = candidates(model, valid, codes, vocab, trie, beam_width, progress=progress)
    prior, _, _ = fit_prior(cand, targets)
    lists = {
        "plain": [[i for i in r if i >= 0][:10] for r in cand.beam.items.tolist()],
        "exclude_history": excluded_lists(model, valid, codes, vocab, trie, beam_width),
        "repeat": rerank(cand, prior, 10)[0],
    }
    gains = {m: gains_at(ranks_from_lists(r, targets), 10) for m, r in lists.items()}
    figures = {
        m: {**summarize(ranks_from_lists(r, targets)), "se_ndcg@10": bootstrap_se(gains[m])}
        for m, r in lists.items()
    }
    best = pick_mode(gains)
    log.info(
        "recommendation mode on %d validation users: %s (NDCG@10 %s)",
        len(valid),
        best,
        {m: round(f["ndcg@10"], 5) for m, f in figures.items()},
    )
    return {
        "mode": best,
        "repeat_prior": prior.to_dict(),
        "validation": {"users": len(valid), **figures},
    }


def pick_mode(gains: dict[str, np.ndarray]) -> str:
    """The served default from per-user validation NDCG gains of each mode: modes in order of
    simplicity (plain, exclude_history, repeat), each replacing the current choice only when it
    beats it by more than two standard errors of the paired difference, so noise never switches
    a default and a tie goes to the simpler mode."""
    best = "plain"
    for mode in ("exclude_history", "repeat"):
        diff = gains[mode] - gains[best]
        if diff.mean() > 2 * bootstrap_se(diff):
            best = mode
    return best


def default_prior(recommend: dict[str, Any]) -> RepeatPrior:
    return RepeatPrior.from_dict(recommend.get("repeat_prior", {}))
