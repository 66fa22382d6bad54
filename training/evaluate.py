"""Evaluation harness: leave-one-out test, full ranking over the catalogue, Recall/NDCG@5/10,
plus coverage and popularity bias of the recommended items."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from models.repeat import RepeatPrior, rerank
from models.trie import ItemTrie
from models.vocab import CodeVocab
from training.metrics import ranks_from_lists, repeats, standard_errors, summarize
from training.repeat import candidates, excluded_lists


def item_popularity(train: list[list[int]], n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for s in train:
        np.add.at(counts, s, 1)
    return counts


def beyond_accuracy(recs: list[list[int]], popularity: np.ndarray) -> dict[str, float]:
    """coverage@10: share of the catalogue recommended to anyone; arp@10: mean training count
    of recommended items; pop_percentile@10: their mean popularity percentile (1 = most popular)."""
    flat = np.array([i for r in recs for i in r[:10]], dtype=np.int64)
    if len(flat) == 0:
        return {"coverage@10": 0.0, "arp@10": 0.0, "pop_percentile@10": 0.0}
    pct = popularity.argsort().argsort() / max(1, len(popularity) - 1)
    return {
        "coverage@10": float(len(np.unique(flat)) / len(popularity)),
        "arp@10": float(popularity[flat].mean()),
        "pop_percentile@10": float(pct[flat].mean()),
    }


def evaluate_popularity(
    train: list[list[int]], pairs: list[tuple[list[int], int]], n_items: int
) -> dict[str, Any]:
    pop = item_popularity(train, n_items)
    top = np.argsort(-pop, kind="stable")[:10].tolist()
    recs = [top] * len(pairs)
    ranks = ranks_from_lists(recs, [t for _, t in pairs])
    return {
        **summarize(ranks),
        **standard_errors(ranks),
        **beyond_accuracy(recs, pop),
        **repeats(recs, pairs),
    }


def recent_items(
    history: list[int], fill: list[int], k: int = 10, history_items: int = 20
) -> list[int]:
    """The user's most recent distinct items of the last `history_items`, newest first, then
    items of `fill` (most popular first) not already listed, k in all."""
    out: list[int] = []
    for i in [*reversed(history[-history_items:]), *fill]:
        if i not in out:
            out.append(i)
            if len(out) == k:
                break
    return out


def evaluate_recent(
    train: list[list[int]],
    pairs: list[tuple[list[int], int]],
    n_items: int,
    history_items: int = 20,
) -> dict[str, Any]:
    """The repeat-consumption baseline: recommend what the user visited last (see
    `recent_items`). Not in the LETTER paper; it shows how much a dataset rewards repeats."""
    pop = item_popularity(train, n_items)
    top = np.argsort(-pop, kind="stable")[:20].tolist()
    recs = [recent_items(h, top, 10, history_items) for h, _ in pairs]
    ranks = ranks_from_lists(recs, [t for _, t in pairs])
    return {
        **summarize(ranks),
        **standard_errors(ranks),
        **beyond_accuracy(recs, pop),
        **repeats(recs, pairs, history_items),
    }


def list_metrics(
    recs: list[list[int]],
    pairs: list[tuple[list[int], int]],
    popularity: np.ndarray,
    history_items: int,
) -> dict[str, Any]:
    """Accuracy with standard errors, beyond-accuracy and repeat breakdown of top-10 lists."""
    ranks = ranks_from_lists(recs, [t for _, t in pairs])
    return {
        **summarize(ranks),
        **standard_errors(ranks),
        **beyond_accuracy(recs, popularity),
        **repeats(recs, pairs, history_items),
    }


def evaluate_generative(
    model: torch.nn.Module,
    train: list[list[int]],
    pairs: list[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    beam_width: int = 20,
    batch_size: int = 256,
    progress: bool = True,
    prior: RepeatPrior | None = None,
    exclude_history: bool = False,
) -> dict[str, dict[str, Any]]:
    """The recommender's rows: 'plain' (beam search, the paper's protocol) and, from the same
    beams, 'repeat' (repeat-aware with `prior`) when a prior is given, and 'exclude_history'
    (history excluded inside the search) when asked."""
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    pop = item_popularity(train, len(codes))
    t0 = time.perf_counter()
    cand = candidates(model, pairs, codes, vocab, trie, beam_width, batch_size, progress)
    seconds = time.perf_counter() - t0
    plain = [[i for i in r if i >= 0][:10] for r in cand.beam.items.tolist()]
    timing = {"users": len(pairs)}
    rows = {
        "plain": {
            **list_metrics(plain, pairs, pop, vocab.history_items),
            **timing,
            "eval_seconds": seconds,
            "users_per_s": len(pairs) / max(seconds, 1e-9),
        }
    }
    if prior is not None:
        recs = rerank(cand, prior, 10)[0]
        rows["repeat"] = {**list_metrics(recs, pairs, pop, vocab.history_items), **timing}
    if exclude_history:
        recs = excluded_lists(model, pairs, codes, vocab, trie, beam_width, batch_size)
        rows["exclude_history"] = {**list_metrics(recs, pairs, pop, vocab.history_items), **timing}
    return rows
