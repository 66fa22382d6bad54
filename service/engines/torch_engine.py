"""The torch engine: batched, trie-constrained beam search in this process (CPU or CUDA).

The search itself lives in `models.beam` (shared with evaluation); this class loads the model,
validates requests, splits them into batches of at most `max_batch` and maps results to
`Recommendation`s.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from models.beam import beam_search
from models.decoders import make_decoder, prefills
from models.fused_decoder import FusedDecoder
from models.new_items import new_item_search
from models.repeat import repeat_candidates, rerank_one
from models.trie import ItemTrie
from models.vocab import CodeVocab
from service.engines.base import (
    DecodeEngine,
    DecodeRequest,
    Recommendation,
    check_engine_args,
    new_item_bonus,
    new_item_slots,
    place_new_items,
)

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class TorchEngine(DecodeEngine):
    """Shared-prefix beam search on an HF causal LM whose vocabulary follows `vocab`."""

    name = "torch"

    def __init__(
        self,
        model_dir: str | Path,
        vocab: CodeVocab,
        device: str = "cpu",
        dtype: str = "float32",
        beam_width: int = 20,
        max_batch: int = 256,
        decoder: str = "auto",
    ) -> None:
        """`decoder`: how the model runs inside the search (models.decoders.make_decoder):
        auto (the fastest that supports the model), fused, shared or hf."""
        check_engine_args(dtype, beam_width, max_batch)
        self.vocab = vocab
        self.device = torch.device(device)
        self.beam_width = beam_width
        self.max_batch = max_batch
        # Any: transformers' stubs type `.to` on the class wrapper, not the instance.
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=TORCH_DTYPES[dtype])
        self.model = model.to(self.device).eval()
        cfg = self.model.config
        if cfg.vocab_size < vocab.vocab_size:
            raise ValueError(
                f"{model_dir}: model vocabulary has {cfg.vocab_size} tokens but the code layout "
                f"needs {vocab.vocab_size} (levels={vocab.levels}, N={vocab.codebook_size})"
            )
        self.max_prompt = getattr(cfg, "max_position_embeddings", 1 << 30) - vocab.levels
        self.decoder = make_decoder(self.model, decoder)
        if isinstance(self.decoder, FusedDecoder):
            self.model = None  # the decoder holds its own (re-laid-out) copy of the weights
            gc.collect()
        log.info(
            "torch engine: %s on %s (%s), decoder %s, beam %d",
            cfg.model_type,
            self.device,
            dtype,
            type(self.decoder).__name__,
            beam_width,
        )

    def recommend(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        for i, r in enumerate(requests):
            self._check(i, r)
        out: list[list[Recommendation]] = []
        for start in range(0, len(requests), self.max_batch):
            out.extend(self._batch(requests[start : start + self.max_batch], trie))
        return out

    def _check(self, i: int, r: DecodeRequest) -> None:
        if r.k < 1:
            raise ValueError(f"request {i}: k must be >= 1, got {r.k}")
        if not r.prompt or len(r.prompt) > self.max_prompt:
            raise ValueError(
                f"request {i}: prompt has {len(r.prompt)} tokens; need 1..{self.max_prompt}"
            )
        if min(r.prompt) < 0 or max(r.prompt) >= self.vocab.vocab_size:
            raise ValueError(
                f"request {i}: prompt tokens must be in 0..{self.vocab.vocab_size - 1}"
            )

    def _batch(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        """One beam search for the batch; the repeat-aware requests' recent items scored
        exactly and the new-item search where requests ask for them, all from one prefill."""
        k = max(r.k for r in requests)
        prompts = [r.prompt for r in requests]
        excludes = [r.exclude for r in requests]
        repeat = any(r.prior is not None for r in requests)
        slots = new_item_slots(requests)
        pre = prefills(self.decoder, prompts, 1 + repeat + (slots is not None))
        cand = None
        if repeat:
            cand = repeat_candidates(
                self.decoder,
                prompts,
                [r.history if r.prior is not None else () for r in requests],
                trie,
                self.vocab,
                beam_width=self.beam_width,
                k=max(k, self.beam_width),
                excludes=excludes,
                new_items=new_item_bonus(requests),
                prefilled=pre[:2],
            )
            beam = cand.beam
        else:
            beam = beam_search(
                self.decoder,
                prompts,
                trie,
                self.vocab,
                beam_width=self.beam_width,
                k=k,
                excludes=excludes,
                new_items=new_item_bonus(requests),
                prefilled=pre[0],
            )
        items, scores = beam.items.tolist(), beam.scores.tolist()
        out = []
        for b, r in enumerate(requests):
            if r.prior is None or cand is None:
                pairs = zip(items[b], scores[b], strict=True)
                out.append([Recommendation(i, s) for i, s in pairs if i >= 0])
                continue
            ranked = rerank_one(
                items[b],
                scores[b],
                cand.items[b],
                cand.scores[b],
                cand.position[b],
                cand.visits[b],
                r.prior,
                r.k,
            )
            out.append([Recommendation(i, s, h) for i, s, h in ranked])
        if slots is None:
            return [row[: r.k] for row, r in zip(out, requests, strict=True)]
        first_row, most = slots
        fresh = new_item_search(
            self.decoder,
            prompts,
            trie,
            self.vocab,
            first_row,
            most,
            self.beam_width,
            excludes,
            pre[-1],
        )
        return place_new_items(requests, out, fresh)

    def warmup(self, trie: ItemTrie) -> None:
        if trie.n_active:
            prompt = self.vocab.prompt([])
            self.recommend([DecodeRequest(prompt=prompt, k=1)] * min(2, self.max_batch), trie)

    def close(self) -> None:
        self.decoder = None  # type: ignore[assignment]
        self.model = None
        gc.collect()
