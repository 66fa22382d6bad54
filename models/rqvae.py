"""RQ-VAE: the network of the LETTER item tokenizer.

MLP encoder (text-embedding dim -> code dim), residual quantization over `levels` codebooks of
`codebook_size` codes, MLP decoder back to the text-embedding dim. Quantization is greedy
nearest-code per level on the running residual, with the straight-through estimator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RQVAEConfig:
    in_dim: int = 384
    """Dimension of the item text embeddings."""
    code_dim: int = 32
    """Dimension of the latent and of each code embedding."""
    hidden: tuple[int, ...] = (512, 256, 128)
    """Encoder hidden widths (the decoder mirrors them)."""
    levels: int = 4
    codebook_size: int = 256
    dropout: float = 0.0
    commitment: float = 0.25
    """Weight of the commitment term of the RQ loss."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RQVAEConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Quantized:
    z_hat: torch.Tensor  # [B, D] straight-through sum of selected codes
    codes: torch.Tensor  # [B, L] long
    residuals: list[torch.Tensor] = field(default_factory=list)  # L x [B, D], input of each level
    rq_loss: torch.Tensor | None = None


class ResidualQuantizer(nn.Module):
    def __init__(self, levels: int, codebook_size: int, dim: int, commitment: float) -> None:
        super().__init__()
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.randn(codebook_size, dim) * 0.01) for _ in range(levels)]
        )
        self.commitment = commitment

    @staticmethod
    def sq_dist(r: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """r [B, D], codebook [N, D] -> squared distances [B, N]."""
        return (
            r.pow(2).sum(-1, keepdim=True)
            - 2 * r @ codebook.t()
            + codebook.pow(2).sum(-1).unsqueeze(0)
        )

    def forward(self, z: torch.Tensor) -> Quantized:
        residual = z
        z_q_sum = torch.zeros_like(z)
        codes, residuals = [], []
        loss = z.new_zeros(())
        for cb in self.codebooks:
            residuals.append(residual)
            idx = self.sq_dist(residual.detach(), cb).argmin(-1)  # [B]
            q = cb[idx]  # [B, D]
            loss = (
                loss
                + F.mse_loss(q, residual.detach())
                + self.commitment * F.mse_loss(residual, q.detach())
            )
            q_st = residual + (q - residual).detach()
            z_q_sum = z_q_sum + q_st
            residual = residual - q.detach()
            codes.append(idx)
        return Quantized(
            z_hat=z_q_sum, codes=torch.stack(codes, -1), residuals=residuals, rq_loss=loss
        )


class RQVAE(nn.Module):
    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        enc_dims = [config.in_dim, *config.hidden, config.code_dim]
        self.encoder = mlp(enc_dims, config.dropout)
        self.decoder = mlp(enc_dims[::-1], config.dropout)
        self.quantizer = ResidualQuantizer(
            config.levels, config.codebook_size, config.code_dim, config.commitment
        )

    @property
    def codebooks(self) -> nn.ParameterList:
        return self.quantizer.codebooks

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """x [B, in_dim] -> (reconstruction [B, in_dim], quantization)."""
        quant = self.quantizer(self.encode(x))
        return self.decoder(quant.z_hat), quant

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy codes [B, L] (eval mode is the caller's job)."""
        return self.quantizer(self.encode(x)).codes

    @torch.no_grad()
    def code_distances(
        self, latent: torch.Tensor, prefix: torch.Tensor, level: int
    ) -> torch.Tensor:
        """Squared distances [B, N] at `level` of the residual left after codes `prefix` [B, level]."""
        residual = latent.clone()
        for lv in range(level):
            residual = residual - self.codebooks[lv][prefix[:, lv]]
        return ResidualQuantizer.sq_dist(residual, self.codebooks[level])
