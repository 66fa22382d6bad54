"""benchmarks/decode.py's GEMM floor does exactly the dense matmuls of a fused beam search."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from benchmarks.decode import GemmFloor
from models.beam import beam_search
from models.fused_decoder import FusedDecoder, onednn_linear_available
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import random_catalogue, tiny_llama_config

VOCAB = CodeVocab(levels=4, codebook_size=16, history_items=5)


class _DenseCalls(TorchDispatchMode):
    """(kernel, rows, inner, cols) of every dense GEMM: matmul (mm/addmm) or oneDNN's linear."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = args[-2], args[-1]
            self.calls.append(("matmul", a.shape[0], a.shape[1], b.shape[1]))
        elif name == "_linear_pointwise":
            x, w = args[0], args[2] if func._overloadname == "binary" else args[1]
            self.calls.append(("onednn", x.shape[0], x.shape[1], w.shape[0]))
        return func(*args, **(kwargs or {}))


def _dense(fn) -> list[tuple[str, int, int, int]]:  # type: ignore[no-untyped-def]
    with _DenseCalls() as mode:
        fn()
    return sorted(mode.calls)


@pytest.mark.parametrize("onednn", [False, True])
def test_floor_matches_the_dense_matmuls_of_a_fused_batch(onednn: bool) -> None:
    if onednn and not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, hidden=32, layers=3, heads=4)).eval()
    decoder = FusedDecoder(model, onednn=onednn)
    assert decoder.onednn == onednn
    codes = random_catalogue(500, VOCAB.levels, VOCAB.codebook_size, seed=1)
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    prompts = [VOCAB.prompt(codes[[i, i + 1, i + 2, i + 3, i + 4]]) for i in range(6)]
    assert len({len(p) for p in prompts}) == 1  # the floor assumes equal prompt lengths
    width = 8

    search = _dense(lambda: beam_search(decoder, prompts, trie, VOCAB, width, k=5))
    floor = GemmFloor(decoder, len(prompts), len(prompts[0]), width, VOCAB.levels - 1)
    alone = _dense(floor.run)
    kernel = "onednn" if onednn else "matmul"
    assert len(search) > 10 and {c[0] for c in search} == {kernel}
    assert alone == search
