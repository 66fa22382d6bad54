"""The search-error diagnostic's teacher-forced item score is the score beam search returns."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from benchmarks.search_errors import item_scores
from models.beam import beam_search
from models.decoders import make_decoder
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import random_catalogue, tiny_llama_config

VOCAB = CodeVocab(levels=3, codebook_size=16, history_items=5)


def test_item_scores_equal_the_beam_search_scores() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()
    codes = random_catalogue(300, VOCAB.levels, VOCAB.codebook_size, seed=1)
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    prompts = [VOCAB.prompt(codes[[3, 7, 9]]), [VOCAB.bos_id]]
    res = beam_search(make_decoder(model), prompts, trie, VOCAB, beam_width=10, k=5)
    for i, prompt in enumerate(prompts):
        items = res.items[i].tolist()
        got = item_scores(model, prompt, VOCAB.tokens(codes[items]))
        torch.testing.assert_close(got, res.scores[i].to(got.dtype), atol=1e-4, rtol=0)
