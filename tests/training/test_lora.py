"""The LC-Rec path on a toy pretrained LLM (byte-level BPE tokenizer, pretrained weights, tied
or untied embeddings, padded vocab_size): vocabulary layout, prompt template, merge and reload,
and fine-tuning that learns."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.bundlefactory import synthetic_items
from tests.lmfactory import random_catalogue
from tests.training.test_lm import successor_data
from training.lm import LMTrainConfig, evaluate_pairs, instruction_windows
from training.lora import (
    LoRAConfig,
    enlarged_vocab_size,
    llm_vocab,
    prepare_base,
    template_ids,
    train_lora,
    wrap_lora,
)
from training.toy_llm import ToyLLMConfig, make_toy_llm

N_ITEMS, LEVELS, SIZE = 40, 2, 8
PROMPT = "Items: {history}\nNext: "
TEXTS = [f"{it['title']}. {it['description']}" for it in synthetic_items(60)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama-tied": make_toy_llm(TEXTS, root / "llama", ToyLLMConfig(arch="llama", steps=10)),
        "qwen2-untied": make_toy_llm(
            TEXTS, root / "qwen2", ToyLLMConfig(arch="qwen2", tie=False, steps=10)
        ),
    }


def test_enlarged_vocab_size_keeps_padding_only_where_the_base_had_it():
    assert enlarged_vocab_size(400, 400, 416) == 416  # unpadded base: exact
    assert enlarged_vocab_size(448, 400, 416) == 448  # padded, codes fit in the base's rows
    assert enlarged_vocab_size(448, 400, 464) == 512  # padded, rounded up to 64


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-untied"])
def test_identical_logits_after_merge_and_reload(bases, tmp_path, name):
    base = bases[name]
    tokenizer = AutoTokenizer.from_pretrained(base)
    vocab = llm_vocab(tokenizer, PROMPT, LEVELS, SIZE, 5)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    text_rows = model.get_input_embeddings().weight[: vocab.code_offset].clone()
    rows = prepare_base(model, vocab, noise=0.1, seed=0)
    assert vocab.code_offset == len(AutoTokenizer.from_pretrained(base))
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > vocab.vocab_size
    assert rows == list(range(vocab.code_offset, model.config.vocab_size))  # codes and padding
    # new rows start near the mean text row; text rows are untouched
    new = model.get_input_embeddings().weight[vocab.code_offset :]
    assert torch.equal(model.get_input_embeddings().weight[: vocab.code_offset], text_rows)
    assert (new.mean(0) - text_rows.mean(0)).abs().max() < 0.5 * text_rows.std(0).max()
    peft_model = wrap_lora(model, LoRAConfig(dropout=0.0), rows)
    with torch.no_grad():  # what training would do: move every trainable tensor
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.tensor([vocab.prompt(np.array([[1, 2], [3, 4], [0, 7]]))])
    peft_model.eval()
    want = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    merged_logits = merged(input_ids=ids).logits
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    got = reloaded(input_ids=ids).logits
    assert got.shape[-1] == model.config.vocab_size
    assert torch.equal(got, merged_logits)  # save and reload change nothing
    # merging changes float32 rounding only (W x + B A x -> (W + B A) x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    head, embed = reloaded.lm_head.weight, reloaded.model.embed_tokens.weight
    assert (head is embed) == name.endswith("-tied")
    if head is not embed:  # the untied head's code rows were trained (moved) too
        assert not torch.allclose(head[vocab.code_offset :], new)


def test_template_ids_split_around_the_history(bases):
    tokenizer = AutoTokenizer.from_pretrained(bases["llama-tied"])
    vocab = llm_vocab(tokenizer, PROMPT, LEVELS, SIZE, 5)
    prefix, suffix = template_ids(tokenizer, PROMPT, "<a_0>")
    assert prefix[0] == tokenizer.bos_token_id  # Llama-style: the tokenizer's bos comes first
    assert tokenizer.decode(prefix, skip_special_tokens=True) == "Items: "
    assert tokenizer.decode(suffix) == "\nNext: "
    text = PROMPT.replace("{history}", "<a_3><b_1><a_0><b_7>")
    assert tokenizer(text)["input_ids"] == vocab.prompt(np.array([[3, 1], [0, 7]]))


def test_a_template_without_history_or_a_taken_token_name_is_an_error(bases):
    tokenizer = AutoTokenizer.from_pretrained(bases["qwen2-untied"])
    with pytest.raises(ValueError, match=r"\{history\} exactly once"):
        llm_vocab(tokenizer, "no history here", LEVELS, SIZE, 5)
    llm_vocab(tokenizer, PROMPT, LEVELS, SIZE, 5)
    with pytest.raises(ValueError, match="already has code token"):
        llm_vocab(tokenizer, PROMPT, LEVELS, SIZE, 5)


def test_instruction_windows_score_only_the_target():
    vocab = CodeVocab(
        levels=2,
        codebook_size=4,
        history_items=2,
        code_offset=10,
        prompt_prefix=(7, 8),
        prompt_suffix=(9,),
    )
    codes = np.array([[0, 1], [2, 3], [1, 1]])  # tokens [10, 15], [12, 17], [11, 15]
    wins, weights = instruction_windows([[0, 1, 2, 1]], codes, vocab, per_user=2, repeat_weight=3)
    assert [w.tolist() for w in wins] == [
        [7, 8, 12, 17, 11, 15, 9, 12, 17],  # target item 1 after history [1, 2]: a repeat
        [7, 8, 10, 15, 12, 17, 9, 11, 15],  # target item 2 after [0, 1]
    ]
    assert weights[0].tolist() == [0] * 6 + [3, 3]
    assert weights[1].tolist() == [0] * 6 + [1, 1]


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    codes = random_catalogue(N_ITEMS, LEVELS, SIZE, seed=3)
    train, valid, test = successor_data()
    cfg = LoRAConfig(
        base_model=str(bases["llama-tied"]),
        prompt=PROMPT,
        r=8,
        alpha=16,
        dropout=0.0,
        train=LMTrainConfig(
            epochs=4,
            batch_size=32,
            lr=3e-3,
            eval_every=4,
            eval_users=30,
            patience=1,
            beam_width=10,
        ),
    )
    before = AutoModelForCausalLM.from_pretrained(bases["llama-tied"]).model.layers[0]
    before = before.mlp.up_proj.weight.clone()
    result, vocab = train_lora(cfg, train, valid, codes, LEVELS, SIZE, 5, out, progress=False)
    return out, codes, test, result, vocab, before


@pytest.mark.slow
def test_fine_tuning_learns_and_the_merged_model_recommends(lora_run):
    out, codes, test, result, vocab, before = lora_run
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.75 * losses[0], losses
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.vocab_size > vocab.vocab_size
    assert not any("lora" in n or "token_adapter" in n for n, _ in model.named_parameters())
    # LoRA was merged into the MLP weights too
    assert not torch.allclose(model.model.layers[0].mlp.up_proj.weight, before)
    trie = ItemTrie.from_codes(codes, SIZE)
    _, recs = evaluate_pairs(model, test[:30], codes, vocab, trie, beam_width=10)
    assert all(len(r) == 10 for r in recs)


def test_a_missing_base_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a local Hugging Face model directory"):
        train_lora(
            LoRAConfig(base_model=str(tmp_path / "none")),
            [],
            [],
            np.zeros((1, 2), dtype=int),
            2,
            8,
            5,
            tmp_path,
        )
