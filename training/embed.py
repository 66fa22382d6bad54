"""Item text -> embeddings, cached on disk keyed by the encoder and the exact texts."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from models.item_tokenizer import TextTemplate
from models.text_encoder import TextEncoder
from training.data import Dataset

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LETTERREC_CACHE", Path.home() / ".cache" / "letterrec"))


def item_texts(ds: Dataset, template: TextTemplate) -> tuple[list[str], int]:
    """Texts of all items and how many fell back to fields outside the template."""
    texts, fallbacks = [], 0
    for it in ds.items:
        text, fell_back = template.render(it)
        texts.append(text)
        fallbacks += fell_back
    return texts, fallbacks


def cache_key(encoder: TextEncoder, texts: list[str]) -> str:
    h = hashlib.sha256(encoder.fingerprint().encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def embed_texts(
    texts: list[str], encoder: TextEncoder, cache_dir: Path | None = None, progress: bool = True
) -> tuple[np.ndarray, bool]:
    """(embeddings [n, dim] float32, came_from_cache)."""
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / "embeddings" / f"{cache_key(encoder, texts)}.npy"
    if path.exists():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            log.info("embeddings: cache hit %s", path)
            return emb, True
    emb = encoder.encode(texts, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb, False
