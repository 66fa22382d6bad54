"""Ranking metrics for leave-one-out evaluation (one target per user)."""

from __future__ import annotations

import numpy as np


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target among all items (ties count against it).
    scores [B, n_items], targets [B] -> ranks [B]."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    return (scores > target_scores).sum(1) + (scores == target_scores).sum(1) - 1


def ranks_from_lists(recommended: list[list[int]], targets: list[int]) -> np.ndarray:
    """Rank of the target in each top-K list, or a large number when absent."""
    miss = np.iinfo(np.int64).max // 2
    return np.array(
        [rec.index(t) if t in rec else miss for rec, t in zip(recommended, targets, strict=True)],
        dtype=np.int64,
    )


def recall_at(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k)) if len(ranks) else 0.0


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    """With one relevant item the ideal DCG is 1, so NDCG = 1 / log2(rank + 2) inside the top k."""
    if not len(ranks):
        return 0.0
    gains = np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
    return float(np.mean(gains))


def summarize(ranks: np.ndarray, ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at(ranks, k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at(ranks, k)
    return out
