"""LETTER's training losses, as pure functions (tensors in, tensors out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cf_alignment_loss(
    z_hat: torch.Tensor, cf: torch.Tensor, temperature: float | None = None
) -> torch.Tensor:
    """In-batch contrastive alignment of quantized vectors with CF embeddings (LETTER Eq. 4).

    z_hat [B, D], cf [B, D] -> scalar. Row i's positive is cf[i]; the other rows are negatives.
    temperature None: plain inner products, as in the paper. A float: cosine similarities
    divided by it, which makes the loss independent of the two embeddings' scales.
    """
    if temperature is not None:
        z_hat = F.normalize(z_hat, dim=-1) / temperature
        cf = F.normalize(cf, dim=-1)
    logits = z_hat @ cf.t()  # [B, B]
    labels = torch.arange(len(z_hat), device=z_hat.device)
    return F.cross_entropy(logits, labels)


def diversity_loss(
    assigned: torch.Tensor,
    codes: torch.Tensor,
    positives: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Pull each item's code toward another code of its cluster, push from the rest (Eq. 6).

    assigned [B, D]: embedding of each item's code (carries the codebook's gradient);
    codes [B]: its index; positives [B]: a different code of the same cluster;
    codebook [N, D]. The item's own code is excluded from the softmax.
    """
    logits = assigned @ codebook.t() / temperature  # [B, N]
    self_mask = F.one_hot(codes, codebook.shape[0]).bool()  # [B, N]
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positives)


def sample_positives(
    codes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each code in `codes` [B], a uniformly random OTHER code with the same cluster label.

    labels [N]: cluster of each code. Codes alone in their cluster get themselves back (their
    loss row is then ignored by the caller). Vectorised: rank codes by (cluster, random key).
    """
    n = labels.shape[0]
    members = torch.argsort(
        labels * (n + 1) + torch.arange(n, device=labels.device)
    )  # [N] by cluster
    sizes = torch.bincount(labels, minlength=int(labels.max()) + 1)  # [K]
    starts = torch.cumsum(sizes, 0) - sizes  # [K]
    position = torch.empty_like(members)
    position[members] = torch.arange(n, device=labels.device)  # code -> slot in `members`
    cl = labels[codes]  # [B]
    size = sizes[cl]  # [B]
    own = position[codes] - starts[cl]  # [B] own offset inside the cluster
    u = torch.rand(codes.shape, generator=generator, device=codes.device)
    r = (u * (size - 1).clamp(min=1)).long()  # [B] in [0, size-2]
    r = r + (r >= own).long()  # skip the code itself
    r = torch.where(size > 1, r, own)
    return members[starts[cl] + r]
