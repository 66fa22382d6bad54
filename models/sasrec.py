"""SASRec (Kang & McAuley, 2018): self-attentive sequential recommendation.

Used for the CF item embeddings the LETTER tokenizer aligns with, and as a baseline. Item row r
is embedded at index r + 1; index 0 is padding. Scores are dot products with the (tied) item
embeddings, trained with full softmax cross-entropy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    dim: int = 32
    """Item embedding size (LETTER aligns 32-d CF embeddings)."""
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            config.dim,
            config.heads,
            dim_feedforward=config.dim * 4,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def item_embeddings(self) -> torch.Tensor:
        """[n_items, dim]: the CF embeddings (padding row dropped)."""
        return self.item_emb.weight[1:]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, T] of item row + 1 (0 = pad, left-padded) -> hidden [B, T, D]."""
        t = seq.shape[1]
        # Positions count back from the newest item, so a batch padded to any length gives the
        # same result as one padded to max_len.
        pos = torch.arange(self.config.max_len - t, self.config.max_len, device=seq.device)
        x = self.item_emb(seq) * self.config.dim**0.5 + self.pos_emb(pos)
        x = self.dropout(x)
        x = self.blocks(x, mask=self.attention_mask(seq))
        return self.norm(x)

    def attention_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """[B * heads, T, T], True = blocked: the future and padding keys; every position may
        see itself, so padding rows stay finite."""
        t = seq.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=seq.device), 1)  # [T, T]
        blocked = causal[None] | (seq == 0)[:, None, :]  # [B, T, T]
        blocked &= ~torch.eye(t, dtype=torch.bool, device=seq.device)[None]
        return blocked.repeat_interleave(self.config.heads, 0)

    def calculate_loss(
        self, seq: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-item CE at every non-pad position. seq, target [B, T]; target 0 = ignore.

        negatives None: full softmax over the catalogue. Otherwise item rows [K] shared by the
        batch (uniform sample): sampled softmax over the target plus those K, accidental hits
        masked; on large catalogues it costs K / n_items of the full head."""
        h = self.forward(seq)
        keep = target > 0  # [B, T]
        hk, tk = h[keep], target[keep] - 1  # [P, D], [P]
        emb = self.item_embeddings()
        if negatives is None:
            return F.cross_entropy(hk @ emb.t(), tk)  # [P, n_items]
        pos = (hk * emb[tk]).sum(-1, keepdim=True)  # [P, 1]
        neg = hk @ emb[negatives].t()  # [P, K]
        neg = neg.masked_fill(negatives[None, :] == tk[:, None], float("-inf"))
        logits = torch.cat([pos, neg], 1)  # [P, 1 + K]
        return F.cross_entropy(logits, torch.zeros(len(tk), dtype=torch.long, device=h.device))

    @torch.no_grad()
    def full_sort_predict(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores [B, n_items] for the item after the last position of left-padded `seq`."""
        return self.forward(seq)[:, -1] @ self.item_embeddings().t()
