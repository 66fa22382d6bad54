"""k-means and balanced (equal-size) clustering of codebook vectors.

LETTER re-runs `k_means_constrained` (a min-cost-flow solver) on every epoch, which dominates
its tokenizer training time. Clustering N=256 code vectors into K balanced groups is an
assignment problem: K-means centroids, then an exact min-cost assignment of the N codes to
K * ceil(N/K) slots with scipy's `linear_sum_assignment` (Jonker-Volgenant), a few
milliseconds. The same function initialises codebooks (k-means on latents).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def kmeans(
    x: torch.Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. x [M, D] -> centers [k, D], labels [M].

    With M < k the missing centres are copies of data points plus tiny noise.
    """
    m = x.shape[0]
    if m == 0:
        raise ValueError("k-means on an empty set")
    centers = [x[torch.randint(m, (1,), generator=generator)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / m)
        i = torch.multinomial(probs, 1, generator=generator)
        centers.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(-1))
    c = torch.stack(centers)
    labels = torch.zeros(m, dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(-1)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(-1).to(x.dtype)
        empty = counts.squeeze(-1) == 0
        c = torch.where(empty.unsqueeze(-1), c, sums / counts.clamp(min=1))
    return c, labels


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]


def balanced_labels(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster x [N, D] into k clusters of at most ceil(N/k) members. -> labels [N].

    Plain numpy: on a few hundred vectors, torch's per-op threading overhead dominates (measured
    seconds instead of milliseconds on a loaded 2-core machine).
    """
    xd = x.detach().float().cpu().numpy().astype(np.float64)
    n = xd.shape[0]
    rng = np.random.default_rng(seed)
    centers = xd[rng.choice(n, size=k, replace=n < k)].copy()
    for _ in range(iters):  # Lloyd
        lab = _sq_dists(xd, centers).argmin(1)
        for j in range(k):
            if (lab == j).any():
                centers[j] = xd[lab == j].mean(0)
    cap = -(-n // k)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(max(1, iters // 3)):  # balanced assignment, then recentre
        rows, cols = linear_sum_assignment(np.repeat(_sq_dists(xd, centers), cap, axis=1))
        labels[rows] = cols // cap
        for j in range(k):
            if (labels == j).any():
                centers[j] = xd[labels == j].mean(0)
    return torch.from_numpy(labels)
