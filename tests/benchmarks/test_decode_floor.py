"""benchmarks/decode.py's GEMM floor does exactly the dense matmuls of a fused beam search."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from benchmarks.decode import GemmFloor
from models.beam import beam_search
from models.fused_decoder import FusedDecoder
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import random_catalogue, tiny_llama_config

VOCAB = CodeVocab(levels=4, codebook_size=16, history_items=5)
DENSE = (torch.ops.aten.mm, torch.ops.aten.addmm)


def _dense_flops(fn) -> dict[object, int]:  # type: ignore[no-untyped-def]
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return {op: counts.get(op, 0) for op in DENSE}


def test_floor_matches_the_dense_matmuls_of_a_fused_batch() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, hidden=32, layers=3, heads=4)).eval()
    decoder = FusedDecoder(model)
    codes = random_catalogue(500, VOCAB.levels, VOCAB.codebook_size, seed=1)
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    prompts = [VOCAB.prompt(codes[[i, i + 1, i + 2, i + 3, i + 4]]) for i in range(6)]
    assert len({len(p) for p in prompts}) == 1  # the floor assumes equal prompt lengths
    width = 8

    search = _dense_flops(lambda: beam_search(decoder, prompts, trie, VOCAB, width, k=5))
    floor = GemmFloor(decoder, len(prompts), len(prompts[0]), width, VOCAB.levels - 1)
    alone = _dense_flops(floor.run)
    assert search[torch.ops.aten.mm] > 0 and search[torch.ops.aten.addmm] > 0
    assert alone == search
