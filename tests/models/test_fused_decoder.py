"""The fused decoder against its readable reference (SharedPrefixDecoder) on random models.

RMSNorm weights are randomised (a fresh model has them at 1, which would hide a weight folded
into the wrong matrix). Models run in float64; HF's RMSNorm computes in float32 whatever the
model dtype, so both decoders carry float32 rounding (~1e-6) from there, not more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from models import fused_decoder
from models.beam import beam_search
from models.decoders import SharedPrefixDecoder, make_decoder
from models.fused_decoder import FusedDecoder, _interleave, supports_fused
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import random_catalogue, tiny_llama_config, tiny_qwen2

VOCAB = CodeVocab(levels=3, codebook_size=32, history_items=20)
TOL = dict(atol=2e-5, rtol=1e-5)


def _randomise_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return model


def llama(kv_heads: int = 2, seed: int = 0, dtype=torch.float64) -> LlamaForCausalLM:
    cfg = tiny_llama_config(VOCAB, hidden=32, layers=2, heads=4, kv_heads=kv_heads)
    torch.manual_seed(seed)
    return _randomise_norms(LlamaForCausalLM(cfg), seed).to(dtype).eval()


def qwen2(seed: int = 1) -> torch.nn.Module:
    return _randomise_norms(tiny_qwen2(VOCAB, seed, bias_std=0.5), seed)


def prompts(n: int, seed: int, catalogue: np.ndarray) -> list[list[int]]:
    """Prompts of 0..25 history items (the last 20 kept): padding, and a bos-only prompt."""
    rng = np.random.default_rng(seed)
    lengths = [0, 25, *rng.integers(0, 26, size=n - 2).tolist()]
    return [VOCAB.prompt(catalogue[rng.integers(0, len(catalogue), size=m)]) for m in lengths]


@pytest.fixture(scope="module")
def catalogue() -> np.ndarray:
    return random_catalogue(800, VOCAB.levels, VOCAB.codebook_size, seed=5)


def test_interleave_pairs_the_two_halves():
    assert _interleave(6).tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("table", [True, False], ids=["layer0-table", "no-table"])
@pytest.mark.parametrize("make", [lambda: llama(kv_heads=2), lambda: llama(kv_heads=4), qwen2])
def test_prefill_and_steps_equal_the_shared_prefix_decoder(make, table, catalogue, monkeypatch):
    model = make()
    if not table:  # as for an LLM-size vocabulary, whose table would be too big
        monkeypatch.setattr(fused_decoder, "TABLE_MAX_BYTES", 0)
    ref, fused = SharedPrefixDecoder(model), FusedDecoder(model)
    assert (fused.qkv0 is not None) == table
    _check_steps(ref, fused, prompts(24, seed=3, catalogue=catalogue), VOCAB)


def test_many_steps_reorder_the_generated_cache_like_the_reference():
    """Five levels: the generated K/V cache is reordered (and its buffers swapped) three times,
    with parents that move beams across each other."""
    vocab = CodeVocab(levels=5, codebook_size=16, history_items=6)
    cfg = tiny_llama_config(vocab, hidden=32, layers=2, heads=4, kv_heads=2)
    torch.manual_seed(2)
    model = _randomise_norms(LlamaForCausalLM(cfg), 2).to(torch.float64).eval()
    cat = random_catalogue(200, vocab.levels, vocab.codebook_size, seed=1)
    rng = np.random.default_rng(0)
    ps = [vocab.prompt(cat[rng.integers(0, 200, size=m)]) for m in (0, 3, 6, 9, 2)]
    _check_steps(SharedPrefixDecoder(model), FusedDecoder(model), ps, vocab)


def _check_steps(ref, fused, ps: list[list[int]], vocab: CodeVocab, tol=TOL) -> None:
    want, ref_state = ref.prefill(ps)
    got, state = fused.prefill(ps)
    want = want[..., : fused.vocab_size]  # both may be padded
    torch.testing.assert_close(_unpad(got, want.shape[-1]), want, **tol)
    g = torch.Generator().manual_seed(0)
    w = 6
    for t in range(vocab.levels - 1):
        # Step 0 reads the shared prefix only (parents index the one prefix "beam").
        parents = torch.randint(0, w if t else 1, (len(ps), w), generator=g)
        tokens = torch.randint(0, vocab.codebook_size, (len(ps), w), generator=g)
        tokens = tokens + vocab.level_start(t)
        want = ref.step(ref_state, parents, tokens)[..., : fused.vocab_size]
        got = fused.step(state, parents, tokens)
        torch.testing.assert_close(_unpad(got, want.shape[-1]), want, **tol)


def _unpad(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The fused head is padded to a multiple of 16 columns, each -inf (zero probability)."""
    assert logits.shape[-1] % 16 == 0 and logits.shape[-1] - vocab_size < 16
    assert torch.isneginf(logits[..., vocab_size:]).all()
    return logits[..., :vocab_size]


def test_beam_search_results_equal_the_shared_prefix_decoder(catalogue):
    model = llama(seed=4)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    ps = prompts(60, seed=9, catalogue=catalogue)
    excludes = [frozenset(range(i, 800, 7)) if i % 3 == 0 else frozenset() for i in range(60)]
    want = beam_search(SharedPrefixDecoder(model), ps, trie, VOCAB, 20, 10, excludes)
    got = beam_search(FusedDecoder(model), ps, trie, VOCAB, 20, 10, excludes)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)


def test_bfloat16_runs_and_agrees_with_float32_on_most_items(catalogue):
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    ps = prompts(30, seed=2, catalogue=catalogue)
    exact = beam_search(FusedDecoder(llama(seed=6, dtype=torch.float32)), ps, trie, VOCAB, 20, 5)
    low = beam_search(FusedDecoder(llama(seed=6, dtype=torch.bfloat16)), ps, trie, VOCAB, 20, 5)
    assert (low.items >= 0).all()
    overlap = np.mean(
        [
            len(set(a) & set(b)) / 5
            for a, b in zip(exact.items.tolist(), low.items.tolist(), strict=True)
        ]
    )
    assert overlap >= 0.6, overlap


def test_auto_picks_fused_and_falls_back_for_other_activations():
    assert isinstance(make_decoder(llama()), FusedDecoder)
    assert isinstance(make_decoder(qwen2()), FusedDecoder)
    cfg = tiny_llama_config(VOCAB, hidden=32, layers=1, heads=2)
    cfg.hidden_act = "gelu"
    gelu = LlamaForCausalLM(cfg).eval()
    assert not supports_fused(gelu)
    assert isinstance(make_decoder(gelu), SharedPrefixDecoder)
    with pytest.raises(ValueError, match="SiLU"):
        FusedDecoder(gelu)
    with pytest.raises(ValueError, match="unknown decoder 'fast'"):
        make_decoder(gelu, "fast")
