"""Training the LETTER tokenizer: RQ-VAE + CF alignment + diversity, then unique codes.

L = L_recon + L_rqvae + alpha * L_cf + beta * L_div (LETTER Eq. 7). alpha = beta = 0 is the
plain RQ-VAE tokenizer of TIGER. Beyond the reference:
- codebooks start from k-means on the encoded latents, level by level (random init collapses);
- codes left unused during an epoch are restarted on random residuals of that level (until
  `restart_until` of the epochs), the standard cure for dead codes, so utilisation stays high;
- the codebook clusters of the diversity loss come from `training.clustering.balanced_labels`
  (exact balanced assignment, milliseconds) every `recluster_every` epochs, instead of a
  constrained k-means solver on every epoch;
- identifiers are made unique by `models.collisions.resolve_collisions`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.collisions import Resolution, append_extra_token, resolve_collisions
from models.item_tokenizer import ItemTokenizer, TextTemplate, TokenizerMeta
from models.rqvae import RQVAE, RQVAEConfig
from training.clustering import balanced_labels, kmeans
from training.losses import cf_alignment_loss, diversity_loss, sample_positives

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerTrainConfig:
    levels: int = 4
    codebook_size: int = 256
    code_dim: int = 32
    hidden: tuple[int, ...] = (512, 256, 128)
    dropout: float = 0.0
    alpha: float = 0.1
    """Weight of the CF alignment loss (0 disables it). The paper's 1e-2 leaves the loss at
    chance level with standardised text embeddings (measured: ml-100k, report/tokenizer.json)."""
    cf_temperature: float | None = 0.1
    """None: raw inner products in the CF loss (the paper); a float: cosine / temperature,
    which makes alpha independent of the scale of the CF embeddings."""
    beta: float = 1e-4
    """Weight of the diversity loss (0 disables it)."""
    clusters: int = 10
    """K of the balanced clustering of each codebook for the diversity loss."""
    recluster_every: int = 5
    restart_dead: bool = True
    restart_until: float = 0.8
    """Fraction of the epochs during which unused codes are restarted."""
    uniqueness: str = "resolve"
    """'resolve' (nearest free codes, L levels) or 'extra_token' (TIGER, L + 1 levels)."""
    epochs: int = 200
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"

    def rqvae_config(self, in_dim: int) -> RQVAEConfig:
        return RQVAEConfig(
            in_dim=in_dim,
            code_dim=self.code_dim,
            hidden=tuple(self.hidden),
            levels=self.levels,
            codebook_size=self.codebook_size,
            dropout=self.dropout,
        )


@dataclass
class TokenizerResult:
    tokenizer: ItemTokenizer
    codes: np.ndarray  # [n, L] unique
    greedy_codes: np.ndarray  # [n, L] before collision resolution
    resolution: Resolution
    seconds: float
    cluster_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def kmeans_init(model: RQVAE, x: torch.Tensor, gen: torch.Generator) -> None:
    residual = model.encode(x)
    for cb in model.codebooks:
        centers, _ = kmeans(residual, cb.shape[0], iters=20, generator=gen)
        cb.copy_(centers)
        residual = residual - cb[model.quantizer.sq_dist(residual, cb).argmin(-1)]


@torch.no_grad()
def restart_dead_codes(
    model: RQVAE, usage: torch.Tensor, residuals: list[torch.Tensor], gen: torch.Generator
) -> int:
    """Codes with zero usage [L, N] move onto random residuals of their level. -> count."""
    restarted = 0
    for level, cb in enumerate(model.codebooks):
        dead = (usage[level] == 0).nonzero().squeeze(-1)
        pool = residuals[level]
        if len(dead) == 0 or len(pool) == 0:
            continue
        pick = torch.randint(len(pool), (len(dead),), generator=gen)
        noise = torch.randn(len(dead), cb.shape[1], generator=gen) * 1e-3
        cb[dead] = pool[pick].to(cb.dtype) + noise.to(cb.device)
        restarted += len(dead)
    return restarted


def _batch_loss(
    model: RQVAE,
    x: torch.Tensor,
    cf: torch.Tensor | None,
    labels: list[torch.Tensor] | None,
    cfg: TokenizerTrainConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, list[torch.Tensor]]:
    recon, quant = model(x)
    l_recon = F.mse_loss(recon, x)
    assert quant.rq_loss is not None
    loss = l_recon + quant.rq_loss
    parts = {"recon": l_recon.item(), "rq": quant.rq_loss.item()}
    if cfg.alpha > 0 and cf is not None:
        l_cf = cf_alignment_loss(quant.z_hat, cf, cfg.cf_temperature)
        loss = loss + cfg.alpha * l_cf
        parts["cf"] = l_cf.item()
    if cfg.beta > 0 and labels is not None:
        l_div = x.new_zeros(())
        for level, cb in enumerate(model.codebooks):
            codes = quant.codes[:, level]
            pos = sample_positives(codes, labels[level], gen)
            l_div = l_div + diversity_loss(cb[codes], codes, pos, cb)
        loss = loss + cfg.beta * l_div
        parts["div"] = l_div.item()
    return loss, parts, quant.codes, [r.detach() for r in quant.residuals]


def train_tokenizer(
    embeddings: np.ndarray,
    cf_embeddings: np.ndarray | None,
    cfg: TokenizerTrainConfig,
    encoder: str = "minilm",
    encoder_fingerprint: str = "",
    template: TextTemplate | None = None,
    progress: bool = True,
) -> TokenizerResult:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    x_all = torch.as_tensor(embeddings, dtype=torch.float32)
    shift, scale = x_all.mean(0), x_all.std().reshape(())
    x_all = ((x_all - shift) / scale).to(device)
    cf_all = (
        None
        if cf_embeddings is None
        else torch.as_tensor(cf_embeddings, dtype=torch.float32).to(device)
    )
    model = RQVAE(cfg.rqvae_config(x_all.shape[1])).to(device)
    kmeans_init(model, x_all, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, history, cluster_seconds = len(x_all), [], 0.0
    labels: list[torch.Tensor] | None = None
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="tokenizer", unit="epoch", disable=not progress)
    for epoch in bar:
        if cfg.beta > 0 and epoch % cfg.recluster_every == 0:
            tc = time.perf_counter()
            labels = [
                balanced_labels(cb.detach(), cfg.clusters, seed=cfg.seed + epoch).to(device)
                for cb in model.codebooks
            ]
            cluster_seconds += time.perf_counter() - tc
        model.train()
        usage = torch.zeros(cfg.levels, cfg.codebook_size, device=device)
        perm = torch.randperm(n, generator=gen).to(device)
        sums: dict[str, float] = {}
        residuals: list[torch.Tensor] = []
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            cf = None if cf_all is None else cf_all[idx]
            loss, parts, codes, residuals = _batch_loss(model, x_all[idx], cf, labels, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for lv in range(cfg.levels):
                usage[lv] += torch.bincount(codes[:, lv], minlength=cfg.codebook_size)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx) / n
        row = {"epoch": epoch + 1, **sums, "used_l0": int((usage[0] > 0).sum())}
        if cfg.restart_dead and epoch < cfg.restart_until * cfg.epochs:
            row["restarted"] = restart_dead_codes(model, usage, residuals, gen)
        history.append(row)
        bar.set_postfix(recon=f"{sums['recon']:.4f}", used0=row["used_l0"])
    seconds = time.perf_counter() - t0
    model.eval()
    meta = TokenizerMeta(
        rqvae=model.config,
        encoder=encoder,
        encoder_fingerprint=encoder_fingerprint,
        template=template or TextTemplate(),
        uniqueness=cfg.uniqueness,
    )
    tok = ItemTokenizer(meta, model.cpu(), shift, scale)
    latents = tok.latents(embeddings)
    greedy = model.quantizer(latents).codes.numpy()
    if cfg.uniqueness == "extra_token":
        extra = append_extra_token(greedy, cfg.codebook_size)
        n_unique = len({tuple(r) for r in greedy.tolist()})
        resolution = Resolution(extra, np.zeros(0, dtype=np.int64), len(greedy) - n_unique)
        greedy = extra
    else:
        resolution = resolve_collisions(greedy, tok.distance_fn(latents))
    log.info(
        "tokenizer: %d epochs in %.0f s (clustering %.2f s); %d colliding items, %d moved",
        cfg.epochs,
        seconds,
        cluster_seconds,
        resolution.collisions_before,
        len(resolution.moved),
    )
    cfg_dict = asdict(cfg)
    cfg_dict["hidden"] = list(cfg.hidden)
    return TokenizerResult(
        tok, resolution.codes, greedy, resolution, seconds, cluster_seconds, history, cfg_dict
    )
