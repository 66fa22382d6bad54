"""The LETTER item tokenizer as an artifact: text encoder + RQ-VAE + input scaling.

Saved as `tokenizer/` in the bundle (config.json + model.safetensors) and loaded by training
(to tokenize the catalogue) and by the service (to tokenize new items at /tokenize). Encoding is
deterministic: eval mode, greedy codes, deterministic collision resolution.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.collisions import append_extra_token, resolve_collisions
from models.rqvae import RQVAE, RQVAEConfig
from models.text_encoder import DEFAULT_ENCODER, TextEncoder

CONFIG_FILE = "config.json"
UNIQUENESS = ("resolve", "extra_token")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class TextTemplate:
    """Which item fields make the text that is embedded, in order."""

    fields: tuple[str, ...] = ("title", "description")
    separator: str = ". "

    def render(self, item: Mapping[str, Any]) -> tuple[str, bool]:
        """(text, used_fallback): the template's fields, or every other text field if none."""
        parts = [str(item[f]).strip() for f in self.fields if item.get(f) not in (None, "")]
        parts = [p for p in parts if p]
        if parts:
            return self.separator.join(parts), False
        other = [
            str(v).strip()
            for k, v in sorted(item.items())
            if k not in ("item_id", *self.fields)
            and isinstance(v, str | int | float)
            and str(v).strip()
        ]
        return self.separator.join(other), True


@dataclass
class TokenizerMeta:
    rqvae: RQVAEConfig
    encoder: str = DEFAULT_ENCODER
    """Alias or local path of the text encoder."""
    encoder_fingerprint: str = ""
    template: TextTemplate = field(default_factory=TextTemplate)
    uniqueness: str = "resolve"
    """'resolve': re-assign colliding items to free codes (L levels); 'extra_token': TIGER's
    extra level numbering the items that share their L codes (L + 1 levels)."""

    def __post_init__(self) -> None:
        if self.uniqueness not in UNIQUENESS:
            raise ValueError(f"uniqueness '{self.uniqueness}': choose one of {UNIQUENESS}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "uniqueness": self.uniqueness,
            "rqvae": self.rqvae.to_dict(),
            "encoder": self.encoder,
            "encoder_fingerprint": self.encoder_fingerprint,
            "template": {
                "fields": list(self.template.fields),
                "separator": self.template.separator,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerMeta:
        t = d.get("template", {})
        return cls(
            rqvae=RQVAEConfig.from_dict(d["rqvae"]),
            encoder=d.get("encoder", DEFAULT_ENCODER),
            encoder_fingerprint=d.get("encoder_fingerprint", ""),
            uniqueness=d.get("uniqueness", "resolve"),
            template=TextTemplate(
                tuple(t.get("fields", ("title", "description"))), t.get("separator", ". ")
            ),
        )


class ItemTokenizer:
    """text -> embedding -> unique code tuple."""

    def __init__(
        self,
        meta: TokenizerMeta,
        model: RQVAE,
        shift: torch.Tensor,
        scale: torch.Tensor,
        device: str = "cpu",
        encoder: TextEncoder | None = None,
    ) -> None:
        self.meta = meta
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.shift = shift.to(self.device)  # [in_dim] subtracted from embeddings
        self.scale = scale.to(self.device)  # [] embeddings divided by it
        self._encoder = encoder

    @property
    def levels(self) -> int:
        """Code levels of an identifier (one more with the extra-token scheme)."""
        return self.meta.rqvae.levels + (self.meta.uniqueness == "extra_token")

    @property
    def codebook_size(self) -> int:
        return self.meta.rqvae.codebook_size

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.meta.encoder, device=str(self.device))
        return self._encoder

    def item_text(self, item: Mapping[str, Any]) -> str:
        return self.meta.template.render(item)[0]

    @staticmethod
    def item_text_of(item: Mapping[str, Any], template: TextTemplate | None = None) -> str:
        """The embedded text of `item` under `template` (default: title. description)."""
        return (template or TextTemplate()).render(item)[0]

    def prepare(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(embeddings, dtype=torch.float32, device=self.device)
        return (x - self.shift) / self.scale

    @torch.no_grad()
    def latents(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.model.encode(self.prepare(embeddings))

    def distance_fn(self, latents: torch.Tensor) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        def fn(rows: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
            lat = latents[torch.as_tensor(rows, device=self.device)]
            pre = torch.as_tensor(prefixes, dtype=torch.long, device=self.device)
            return self.model.code_distances(lat, pre, pre.shape[1]).cpu().numpy()

        return fn

    @torch.no_grad()
    def encode_embeddings(
        self,
        embeddings: np.ndarray | torch.Tensor,
        is_taken: Callable[[tuple[int, ...]], bool] | None = None,
    ) -> np.ndarray:
        """embeddings [n, in_dim] -> unique codes [n, L], none of them `is_taken`."""
        latents = self.latents(embeddings)
        greedy = self.model.quantizer(latents).codes.cpu().numpy()
        if self.meta.uniqueness == "extra_token":
            return append_extra_token(greedy, self.codebook_size, is_taken)
        return resolve_collisions(greedy, self.distance_fn(latents), is_taken).codes

    def encode(
        self,
        items: Sequence[Mapping[str, Any]],
        is_taken: Callable[[tuple[int, ...]], bool] | None = None,
    ) -> np.ndarray:
        """New items -> codes [n, L], unique among themselves and not taken."""
        texts = [self.item_text(it) for it in items]
        return self.encode_embeddings(self.encoder.encode(texts), is_taken)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.meta.to_dict(), indent=2) + "\n")
        tensors = {
            f"rqvae.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
        }
        tensors["input.shift"] = self.shift.detach().cpu().contiguous()
        tensors["input.scale"] = self.scale.detach().cpu().reshape(1).contiguous()
        save_file(tensors, str(path / WEIGHTS_FILE))

    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", encoder: TextEncoder | None = None
    ) -> ItemTokenizer:
        path = Path(path)
        cfg = path / CONFIG_FILE
        if not cfg.exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(
                f"{path}: not an item tokenizer ({CONFIG_FILE} and {WEIGHTS_FILE} needed)"
            )
        meta = TokenizerMeta.from_dict(json.loads(cfg.read_text()))
        tensors = load_file(str(path / WEIGHTS_FILE))
        model = RQVAE(meta.rqvae)
        model.load_state_dict(
            {k[len("rqvae.") :]: v for k, v in tensors.items() if k.startswith("rqvae.")}
        )
        return cls(
            meta, model, tensors["input.shift"], tensors["input.scale"].reshape(()), device, encoder
        )
