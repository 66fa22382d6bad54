"""LC-Rec-style recommender: a local pretrained causal LM with the code tokens added to its
vocabulary, fine-tuned with LoRA (peft). The new token embeddings and the output head are
trained in full (`modules_to_save`): leaving them frozen, as the reference did, leaves the new
tokens at their random initialisation. The merged model is saved as a plain `lm/`.

The code tokens are appended after the model's own vocabulary, so the bundle's vocabulary layout
becomes code_offset = the base vocabulary size, with the base model's bos/eos/pad ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.recommender import level_name
from models.vocab import CodeVocab
from training.lm import LMResult, LMTrainConfig, train_lm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAConfig:
    base_model: str = ""
    """Local directory of a pretrained causal LM (Hugging Face format)."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(lr=5e-4))


def code_vocab_for(
    tokenizer: Any, levels: int, codebook_size: int, history_items: int
) -> tuple[CodeVocab, list[str]]:
    """Add `<a_0>`... to `tokenizer` (contiguously) and describe the resulting layout."""
    strings = [f"<{level_name(lv)}_{c}>" for lv in range(levels) for c in range(codebook_size)]
    clash = [s for s in strings if s in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"base tokenizer already has code token(s) {clash[:3]}; cannot add them")
    offset = len(tokenizer)
    tokenizer.add_tokens(strings, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(strings)
    if ids != list(range(offset, offset + len(strings))):
        raise ValueError("the base tokenizer did not append the code tokens contiguously")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the base tokenizer has no bos token; prompts start with bos")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    vocab = CodeVocab(
        levels=levels,
        codebook_size=codebook_size,
        history_items=history_items,
        pad_id=int(pad),
        bos_id=int(bos),
        eos_id=int(eos if eos is not None else pad),
        code_offset=offset,
    )
    return vocab, strings


def train_lora(
    cfg: LoRAConfig,
    train: list[list[int]],
    valid: list[tuple[list[int], int]],
    codes: np.ndarray,
    levels: int,
    codebook_size: int,
    history_items: int,
    out_dir: Path,
    progress: bool = True,
) -> tuple[LMResult, CodeVocab]:
    """Fine-tune, merge and save to `out_dir` (model + extended tokenizer)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(cfg.base_model)
    if not (base / "config.json").exists():
        raise ValueError(f"base model '{base}': not a local Hugging Face model directory")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    vocab, _ = code_vocab_for(tokenizer, levels, codebook_size, history_items)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = vocab.pad_id
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_cfg)
    result = train_lm(train, valid, codes, vocab, cfg.train, progress=progress, model=peft_model)
    merged: Any = peft_model.merge_and_unload()
    merged.config.vocab_size = len(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    cfg_dict = asdict(cfg)
    cfg_dict["target_modules"] = list(cfg.target_modules)
    (out_dir / "letterrec.json").write_text(
        json.dumps({"lora": cfg_dict, "vocab": vocab.to_dict()}, indent=2, default=str) + "\n"
    )
    result.model = merged
    return result, vocab
