"""Test fixtures shared across the suite: a random tiny Llama and a random catalogue.

The model follows the recommender's vocabulary layout (models/vocab.py) so that engines, the
service and training code can all be exercised against a real Hugging Face checkpoint without
training anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.vocab import CodeVocab


def tiny_llama_config(
    vocab: CodeVocab,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    init_std: float = 0.2,
) -> LlamaConfig:
    """A LlamaConfig whose vocabulary and context fit `vocab`."""
    max_pos = 1 + vocab.history_items * vocab.levels + vocab.levels + 8
    return LlamaConfig(
        vocab_size=vocab.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_pos,
        # A wider init than HF's 0.02 gives peaked next-token distributions: beams rarely tie,
        # so the order of equal scores (an implementation detail) never decides a test.
        initializer_range=init_std,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        tie_word_embeddings=False,
    )


def make_tiny_llama(
    vocab: CodeVocab,
    out_dir: Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    *,
    kv_heads: int | None = None,
    init_std: float = 0.2,
) -> Path:
    """Save a random float32 LlamaForCausalLM (safetensors) for `vocab` under `out_dir`."""
    out_dir = Path(out_dir)
    config = tiny_llama_config(vocab, hidden, layers, heads, kv_heads, init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def tiny_qwen2(vocab: CodeVocab, seed: int = 1, bias_std: float = 0.0) -> Qwen2ForCausalLM:
    """A random float64 Qwen2 (GQA, q/k/v biases) for `vocab`; `bias_std` > 0 draws the biases
    (they start at zero) so that code paths which mishandle them are caught."""
    cfg = Qwen2Config(
        vocab_size=vocab.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1 + (vocab.history_items + 1) * vocab.levels + 8,
        initializer_range=0.2,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    if bias_std > 0:
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, bias_std)
    return model.double().eval()


def random_catalogue(n_items: int, levels: int, codebook_size: int, seed: int) -> np.ndarray:
    """`n_items` distinct code tuples, shape [n_items, levels] int64, in random order."""
    space = codebook_size**levels
    if n_items > space:
        raise ValueError(f"{n_items} items do not fit in {codebook_size}^{levels} identifiers")
    rng = np.random.default_rng(seed)
    if space <= 4 * n_items or space <= 1 << 22:
        flat = rng.choice(space, size=n_items, replace=False)
    else:
        # Sparse space: draw with replacement and top up until n_items distinct remain.
        flat = np.unique(rng.integers(0, space, size=int(n_items * 1.1) + 16))
        while flat.size < n_items:
            extra = rng.integers(0, space, size=n_items - flat.size + 16)
            flat = np.unique(np.concatenate([flat, extra]))
        flat = rng.permutation(flat)[:n_items]
    powers = codebook_size ** np.arange(levels - 1, -1, -1, dtype=np.int64)
    return (flat[:, None] // powers[None, :]) % codebook_size
