"""A complete, small, real bundle for tests: real MiniLM text embeddings, a (k-means
initialised, untrained) RQ-VAE tokenizer with unique codes, a random tiny Llama as `lm/`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.bundle import Bundle, Catalogue, Manifest
from models.item_tokenizer import ItemTokenizer, TokenizerMeta
from models.rqvae import RQVAE, RQVAEConfig
from models.text_encoder import TextEncoder
from models.vocab import CodeVocab
from tests.lmfactory import make_tiny_llama

CATEGORIES = ["pizza", "sushi", "coffee", "books", "hiking gear", "jazz records", "tea", "bikes"]

_ENCODER: TextEncoder | None = None


def shared_encoder() -> TextEncoder:
    """One MiniLM per test process (loading it takes a second or two)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = TextEncoder("minilm")
    return _ENCODER


def synthetic_items(n_items: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_items):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        items.append(
            {
                "item_id": f"item-{i}",
                "title": f"Shop {i} {cat}",
                "description": f"{cat}, local, {int(rng.integers(1, 6))} stars",
            }
        )
    return items


def make_tokenizer(
    embeddings: np.ndarray, levels: int = 3, codebook_size: int = 16, seed: int = 0
) -> ItemTokenizer:
    """An RQ-VAE whose codebooks are seeded from the latents of `embeddings` (no training)."""
    torch.manual_seed(seed)
    cfg = RQVAEConfig(
        in_dim=embeddings.shape[1],
        code_dim=8,
        hidden=(32,),
        levels=levels,
        codebook_size=codebook_size,
    )
    model = RQVAE(cfg).eval()
    x = torch.as_tensor(embeddings)
    shift, scale = x.mean(0), x.std().reshape(())
    with torch.no_grad():
        residual = model.encode((x - shift) / scale)
        gen = torch.Generator().manual_seed(seed)
        for cb in model.codebooks:
            pick = torch.randint(len(residual), (codebook_size,), generator=gen)
            cb.copy_(residual[pick])
            idx = model.quantizer.sq_dist(residual, cb).argmin(-1)
            residual = residual - cb[idx]
    meta = TokenizerMeta(rqvae=cfg, encoder="minilm")
    return ItemTokenizer(meta, model, shift, scale, encoder=shared_encoder())


def make_tiny_bundle(
    out_dir: Path, n_items: int = 200, seed: int = 0, with_lm: bool = True
) -> Path:
    """Write a bundle with `n_items` synthetic items into `out_dir` and return its path."""
    out_dir = Path(out_dir)
    items = synthetic_items(n_items, seed)
    tok = make_tokenizer(
        shared_encoder().encode([ItemTokenizer.item_text_of(it) for it in items]), seed=seed
    )
    codes = tok.encode(items)
    vocab = CodeVocab(levels=tok.levels, codebook_size=tok.codebook_size)
    tok.save(out_dir / "tokenizer")
    catalogue = Catalogue([it["item_id"] for it in items], codes, [it["title"] for it in items])
    manifest = Manifest(
        vocab=vocab, config={"profile": "test"}, data={"name": "synthetic", "items": n_items}
    )
    Bundle(root=out_dir, manifest=manifest, catalogue=catalogue).save()
    if with_lm:
        make_tiny_llama(vocab, out_dir / "lm", seed=seed)
    return out_dir
