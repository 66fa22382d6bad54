"""The LC-Rec path end to end on a tiny pretrained-format model built and saved by the test."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from models.recommender import RecommenderConfig
from models.trie import ItemTrie
from tests.lmfactory import random_catalogue
from tests.training.test_lm import successor_data
from training.lm import LMTrainConfig, evaluate_pairs
from training.lora import LoRAConfig, train_lora
from training.metrics import ranks_from_lists, recall_at

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "the", "user", "likes", "next", "item", "is"]
N_ITEMS, LEVELS, SIZE = 40, 2, 8


def make_base_model(path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    base = make_base_model(tmp_path_factory.mktemp("base"))
    out = tmp_path_factory.mktemp("lm")
    codes = random_catalogue(N_ITEMS, LEVELS, SIZE, seed=3)
    train, valid, test = successor_data()
    cfg = LoRAConfig(
        base_model=str(base),
        r=8,
        alpha=16,
        dropout=0.0,
        train=LMTrainConfig(
            model=RecommenderConfig(),
            epochs=40,
            batch_size=64,
            lr=5e-3,
            window_items=6,
            eval_every=10,
            eval_users=100,
            patience=10,
            beam_width=10,
        ),
    )
    before = (
        AutoModelForCausalLM.from_pretrained(base).model.layers[0].self_attn.q_proj.weight.clone()
    )
    result, vocab = train_lora(cfg, train, valid, codes, LEVELS, SIZE, 5, out, progress=False)
    return base, out, codes, test, result, vocab, before


def test_code_tokens_appended_after_the_base_vocabulary(lora_run):
    _, out, _, _, _, vocab, _ = lora_run
    assert vocab.code_offset == len(WORDS)
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (1, 2, 3)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<a_0>", "<b_7>"]) == [
        vocab.level_start(0),
        vocab.level_start(1) + 7,
    ]


def test_merged_model_loads_and_recommends_the_successor(lora_run):
    base, out, codes, test, _, vocab, before = lora_run
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.vocab_size == vocab.vocab_size
    assert not any("lora" in n for n, _ in model.named_parameters())
    # LoRA was merged into the attention weights
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, before)
    trie = ItemTrie.from_codes(codes, SIZE)
    _, recs = evaluate_pairs(model, test, codes, vocab, trie, beam_width=10)
    ranks = ranks_from_lists(recs, [t for _, t in test])
    assert recall_at(ranks, 1) >= 0.9


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
