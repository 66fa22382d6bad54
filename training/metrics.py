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


def repeats(
    recs: list[list[int]], pairs: list[tuple[list[int], int]], history_items: int = 20
) -> dict[str, float]:
    """How much of a model's accuracy comes from items the user already has in the history it
    was given (the last `history_items`): repeat_targets, the share of targets that are such
    repeats (a property of the data); history_share@10, the share of recommended items that
    are; recall@10 on repeat targets and on new ones."""
    ranks = ranks_from_lists([r[:10] for r in recs], [t for _, t in pairs])
    seen = [set(h[-history_items:]) if history_items > 0 else set() for h, _ in pairs]
    rep = np.array([t in s for (_, t), s in zip(pairs, seen, strict=True)], dtype=bool)
    shown = [(sum(i in s for i in r[:10]), len(r[:10])) for r, s in zip(recs, seen, strict=True)]
    hits = ranks < 10
    return {
        "repeat_targets": float(rep.mean()) if len(rep) else 0.0,
        "history_share@10": sum(a for a, _ in shown) / max(1, sum(b for _, b in shown)),
        "recall@10_repeat": float(hits[rep].mean()) if rep.any() else 0.0,
        "recall@10_new": float(hits[~rep].mean()) if (~rep).any() else 0.0,
    }


def gains_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k gains (the mean is `ndcg_at`)."""
    return np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)


def bootstrap_se(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> float:
    """Standard error of the mean of per-user `values` by bootstrap over users: the standard
    deviation of the means of `n_boot` resamples (with replacement) of the users."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        means[b] = values[rng.integers(0, len(values), len(values))].mean()
    return float(means.std(ddof=1))


def standard_errors(ranks: np.ndarray, ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    """Bootstrap standard errors of `summarize`'s metrics, as `se_<metric>` keys."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"se_recall@{k}"] = bootstrap_se((ranks < k).astype(np.float64))
    for k in ks:
        out[f"se_ndcg@{k}"] = bootstrap_se(gains_at(ranks, k))
    return out
