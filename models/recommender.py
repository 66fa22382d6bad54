"""The generative recommender: a decoder-only Llama over the code vocabulary (TIGER-style,
from scratch) and its Hugging Face directory layout (`lm/` in the bundle).

`lm/` holds config.json, model.safetensors, generation_config.json and a tokenizer.json whose
tokens are the code vocabulary (`<pad>`, `<bos>`, `<eos>`, `<a_0>`...`<d_255>`), so that
`transformers` and vLLM load it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from models.vocab import SPECIAL_TOKENS, CodeVocab


@dataclass(frozen=True)
class RecommenderConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    dropout: float = 0.1
    """Attention dropout (Llama has no other dropout)."""
    init_std: float = 0.02
    tie_embeddings: bool = False
    """One matrix for the input embeddings and the output head, as in TIGER's T5 and in SASRec:
    a token's logit then grows with how much of its own embedding the last position carries,
    so attending to a history item's codes raises the scores of that item and of items that
    share its codes (copying, which repeat visits reward)."""

    def llama_config(self, vocab: CodeVocab) -> LlamaConfig:
        # Room for the longest prompt plus the L generated tokens, rounded up.
        max_pos = 1 + (vocab.history_items + 1) * vocab.levels
        return LlamaConfig(
            vocab_size=vocab.vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=-(-max_pos // 64) * 64,
            attention_dropout=self.dropout,
            initializer_range=self.init_std,
            bos_token_id=vocab.bos_id,
            eos_token_id=vocab.eos_id,
            pad_token_id=vocab.pad_id,
            tie_word_embeddings=self.tie_embeddings,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def level_name(level: int) -> str:
    """a, b, c, ... z, then l26, l27... (LETTER writes `<a_12>`)."""
    return chr(ord("a") + level) if level < 26 else f"l{level}"


def token_strings(vocab: CodeVocab) -> list[str]:
    """Token id -> string, for the whole code vocabulary."""
    out = [""] * vocab.vocab_size
    for tok_id, name in zip(
        (vocab.pad_id, vocab.bos_id, vocab.eos_id), SPECIAL_TOKENS, strict=True
    ):
        out[tok_id] = name
    for i in range(vocab.code_offset):
        out[i] = out[i] or f"<unused_{i}>"
    for level in range(vocab.levels):
        for code in range(vocab.codebook_size):
            out[vocab.level_start(level) + code] = f"<{level_name(level)}_{code}>"
    return out


def build_model(cfg: RecommenderConfig, vocab: CodeVocab, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg.llama_config(vocab))


def save_tokenizer_file(vocab: CodeVocab, out_dir: Path) -> None:
    """A WordLevel tokenizer.json over the code tokens (whitespace-separated)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    strings = token_strings(vocab)
    tok = Tokenizer(
        models.WordLevel({s: i for i, s in enumerate(strings)}, unk_token=SPECIAL_TOKENS[0])
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=strings[vocab.pad_id],
        bos_token=strings[vocab.bos_id],
        eos_token=strings[vocab.eos_id],
        unk_token=strings[vocab.pad_id],
    )
    fast.save_pretrained(str(out_dir))


def save_lm(model: Any, vocab: CodeVocab, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `lm/`: weights (float32 safetensors), config, generation config, tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        num_beams=20,
        max_new_tokens=vocab.levels,
        do_sample=False,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer_file(vocab, out_dir)
    if extra:
        (out_dir / "letterrec.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out_dir


def load_lm(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()
