"""LC-Rec-style recommender: a local pretrained causal LM (any Hugging Face directory: Llama,
Qwen2/Qwen3, SmolLM...) with the code tokens added to its vocabulary, fine-tuned with LoRA
(peft) on LC-Rec's sequential-recommendation instruction, with the ranking-guided loss of the
from-scratch recommender (training.lm). The merged model is saved as a plain `lm/`.

Vocabulary: the L x N code tokens (`<a_0>`... readable names) are appended after the base
tokenizer's tokens, so `code_offset` = the tokenizer's length (after its special tokens, not
necessarily next to them). The embedding matrix is resized to hold them: to exactly that many
rows, or, when the base model pads its `vocab_size` beyond its tokenizer (Qwen does), to the
next multiple of 64 (at least the base's size). Every row past the text tokens (the codes and
any padding) is trainable, input embedding and output head alike (peft trainable tokens; one
matrix when the embeddings are tied, as in Qwen2.5-0.5B or Llama 3.2 1B), initialised to the mean
text-token row plus a little noise; the training loss also pushes the padding rows' logits down,
since the served score is a log-softmax over the whole vocabulary. LoRA adapts the attention and
MLP projections.

Prompt: `LoRAConfig.prompt` with `{history}` where the history's code tokens go, tokenized once
here (with the tokenizer's own special tokens, e.g. Llama's bos) into a prefix and a suffix that
the bundle's manifest stores as token ids (`CodeVocab.prompt_prefix`/`prompt_suffix`): the
service builds the identical prompt from ids alone.
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

DEFAULT_PROMPT = (
    "The user has interacted with the following items in chronological order: {history}. "
    "Can you predict the next item the user will interact with?\nResponse: "
)
"""LC-Rec's sequential-recommendation task (no chat markup: add your model's own around it)."""

HISTORY = "{history}"

PAD_MULTIPLE = 64
"""A base model whose `vocab_size` exceeds its tokenizer is padded; the enlarged one is too."""


@dataclass(frozen=True)
class LoRAConfig:
    base_model: str = ""
    """Local directory of a pretrained causal LM (Hugging Face format, with its tokenizer)."""
    prompt: str = DEFAULT_PROMPT
    """Instruction template; `{history}` marks where the history's code tokens go (no
    separator between items)."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Attention and MLP projections (names of Llama/Qwen/Mistral-family modules)."""
    init_noise: float = 0.1
    """New rows = the mean text-token row + this x the rows' per-dimension std x N(0, 1), so
    that code tokens start distinguishable."""
    train: LMTrainConfig = field(
        default_factory=lambda: LMTrainConfig(
            lr=5e-4,
            epochs=4,
            batch_size=32,
            warmup=0.05,
            weight_decay=0.0,
            eval_every=1,
            eval_users=500,
            patience=2,
        )
    )
    """Training of the LLM recommender (the from-scratch model's settings are `lm`); its
    `window_items`, `context_items` and `distill` do not apply (one example per target)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def code_token_strings(levels: int, codebook_size: int) -> list[str]:
    """`<a_0>`... `<a_{N-1}>`, `<b_0>`...: level-major, the order of the code layout."""
    return [f"<{level_name(lv)}_{c}>" for lv in range(levels) for c in range(codebook_size)]


def add_code_tokens(tokenizer: Any, levels: int, codebook_size: int) -> int:
    """Append the code tokens to `tokenizer` (contiguously); returns their offset."""
    strings = code_token_strings(levels, codebook_size)
    clash = [s for s in strings if s in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"base tokenizer already has code token(s) {clash[:3]}; cannot add them")
    offset = len(tokenizer)
    tokenizer.add_tokens(strings, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(strings)
    if ids != list(range(offset, offset + len(strings))):
        raise ValueError("the base tokenizer did not append the code tokens contiguously")
    return offset


def check_template(template: str) -> None:
    if template.count(HISTORY) != 1:
        raise ValueError(f"llm.prompt must contain {HISTORY} exactly once, got {template!r}")


def template_ids(tokenizer: Any, template: str, marker: str) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids of `template` around `{history}`, as the tokenizer encodes the whole
    prompt (special tokens included). `marker` is a code token: added tokens split the text, so
    the ids around one code token are the ids around any sequence of them."""
    check_template(template)
    ids = tokenizer(template.replace(HISTORY, marker))["input_ids"]
    at = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids(marker)]
    if len(at) != 1:
        raise ValueError(f"the tokenized template holds the history marker {len(at)} times")
    return ids[: at[0]], ids[at[0] + 1 :]


def llm_vocab(
    tokenizer: Any,
    template: str,
    levels: int,
    codebook_size: int,
    history_items: int,
) -> CodeVocab:
    """Add the code tokens to `tokenizer` and describe the resulting layout and prompt."""
    check_template(template)
    offset = add_code_tokens(tokenizer, levels, codebook_size)
    prefix, suffix = template_ids(tokenizer, template, code_token_strings(1, 2)[0])
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the base tokenizer has neither a pad nor an eos token")
    bos = tokenizer.bos_token_id
    return CodeVocab(
        levels=levels,
        codebook_size=codebook_size,
        history_items=history_items,
        pad_id=int(pad),
        # Prompts start with the template's ids; bos (which Qwen has not) is only recorded.
        bos_id=int(bos if bos is not None else pad),
        eos_id=int(eos if eos is not None else pad),
        code_offset=offset,
        prompt_prefix=tuple(prefix),
        prompt_suffix=tuple(suffix),
    )


def enlarged_vocab_size(base_vocab_size: int, text_tokens: int, needed: int) -> int:
    """Rows of the enlarged embedding: `needed` exactly for an unpadded base, else rounded up
    to `PAD_MULTIPLE` and at least the base's size."""
    if base_vocab_size <= text_tokens:
        return needed
    return max(base_vocab_size, -(-needed // PAD_MULTIPLE) * PAD_MULTIPLE)


@torch.no_grad()
def init_new_rows(weight: torch.Tensor, first: int, noise: float, seed: int) -> None:
    """Rows >= `first` of an embedding or head matrix [V, H] := mean of rows < `first` plus
    `noise` x their per-dimension std x N(0, 1)."""
    text = weight[:first].float()
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(weight.shape[0] - first, weight.shape[1], generator=gen)
    new = text.mean(0) + noise * text.std(0) * rand
    weight[first:] = new.to(weight.dtype)


def prepare_base(model: Any, vocab: CodeVocab, noise: float, seed: int) -> list[int]:
    """Resize `model` for the code tokens of `vocab`, initialise the new rows; returns the
    trainable row ids (everything past the text tokens)."""
    base_size = model.get_input_embeddings().weight.shape[0]
    size = enlarged_vocab_size(base_size, vocab.code_offset, vocab.vocab_size)
    model.resize_token_embeddings(size, mean_resizing=False)
    init_new_rows(model.get_input_embeddings().weight, vocab.code_offset, noise, seed)
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        init_new_rows(head.weight, vocab.code_offset, noise, seed + 1)
    model.config.pad_token_id = vocab.pad_id
    return list(range(vocab.code_offset, size))


def tied(model: Any) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def wrap_lora(model: Any, cfg: LoRAConfig, rows: list[int]) -> Any:
    """LoRA on `cfg.target_modules`; `rows` of the embedding (and of an untied head) trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = _module_names(model)
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ValueError(
            f"llm.target_modules {missing} are not modules of {type(model).__name__}; "
            f"linear layers it has: {sorted(names)[:20]}"
        )
    trainable = {"embed_tokens": rows} if tied(model) else {"embed_tokens": rows, "lm_head": rows}
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        trainable_token_indices=trainable,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def _dtype(value: Any) -> torch.dtype:
    """A config's `dtype` (a torch dtype, its name, or unset) as a torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value), None) if value else None
    return found if isinstance(found, torch.dtype) else torch.float32


def _module_names(model: Any) -> set[str]:
    return {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def train_lora(
    cfg: LoRAConfig,
    train: list[list[int]],
    valid: list[tuple[list[int], int]],
    codes: np.ndarray,
    levels: int,
    codebook_size: int,
    history_items: int,
    out_dir: Path,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> tuple[LMResult, CodeVocab]:
    """Fine-tune, merge and save to `out_dir` (model, generation config, extended tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = Path(cfg.base_model)
    if not (base / "config.json").exists():
        raise ValueError(
            f"llm.base_model '{base}': not a local Hugging Face model directory (no config.json)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    vocab = llm_vocab(tokenizer, cfg.prompt, levels, codebook_size, history_items)
    base_dtype = _dtype(getattr(AutoConfig.from_pretrained(str(base)), "dtype", None))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    rows = prepare_base(model, vocab, cfg.init_noise, cfg.train.seed)
    log.info(
        "LLM recommender: %s, %d text tokens, code tokens at %d..%d, vocab_size %d, tied %s,"
        " prompt %d + history + %d tokens",
        type(model).__name__,
        vocab.code_offset,
        vocab.code_offset,
        vocab.vocab_size - 1,
        model.config.vocab_size,
        tied(model),
        len(vocab.head),
        len(vocab.prompt_suffix),
    )
    peft_model = wrap_lora(model, cfg, rows)
    result = train_lm(
        train, valid, codes, vocab, cfg.train, checkpoint, progress=progress, model=peft_model
    )
    merged: Any = peft_model.merge_and_unload()
    merged = merged.to(base_dtype)  # saved as the base was (bfloat16 stays bfloat16)
    merged.generation_config = GenerationConfig(
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        num_beams=20,
        max_new_tokens=vocab.levels,
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "letterrec.json").write_text(
        json.dumps({"llm": cfg.to_dict(), "vocab": vocab.to_dict()}, indent=2, default=str) + "\n"
    )
    result.model = merged.to(torch.float32).eval()
    return result, vocab
