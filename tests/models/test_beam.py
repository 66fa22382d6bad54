"""Beam search: hand-checked pure steps, and equality with HF `generate` + a dict trie.

Parity runs the model in float64 so that both sides see the same float32 logits up to rounding
of ~1e-15: the comparison is then exact in items (no near-tie can flip) and within 1e-4 in
scores, as the issue asks. A float32 run is checked too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from models.beam import allowed_codes, beam_search, masked_log_probs, select_beams
from models.decoders import make_decoder, shared_prefix_attention
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import make_tiny_llama, random_catalogue, tiny_qwen2

VOCAB = CodeVocab(levels=3, codebook_size=32, history_items=20)
N_ITEMS = 1500
INF = float("-inf")


# ---- pure steps, by hand --------------------------------------------------------------------
def test_allowed_codes_subtracts_exclusions_per_user():
    counts = torch.tensor([[[2, 1, 0], [0, 1, 1]]])  # [B=1, W=2, N=3]
    beam_keys = torch.tensor([[5, 7]])
    # Two excluded items under beam 5 (next codes 0 and 1), one padding row under beam 7.
    ex_keys = torch.tensor([[5, 5, 7]])
    ex_next = torch.tensor([[0, 1, 2]])
    ex_valid = torch.tensor([[True, True, False]])
    got = allowed_codes(counts, beam_keys, ex_keys, ex_next, ex_valid)
    assert got.tolist() == [[[True, False, False], [False, True, True]]]
    no_ex = allowed_codes(counts, beam_keys, ex_keys[:, :0], ex_next[:, :0], ex_valid[:, :0])
    assert no_ex.tolist() == [[[True, True, False], [False, True, True]]]


def test_masked_log_probs_normalises_over_the_whole_vocabulary():
    logits = torch.zeros(1, 4)  # uniform over 4 tokens; level codes are tokens 2 and 3
    got = masked_log_probs(
        logits, level_start=2, codebook_size=2, allowed=torch.tensor([[1, 0]]).bool()
    )
    assert got.tolist() == [[pytest.approx(-math.log(4)), INF]]


def test_select_beams_takes_best_continuations_over_all_beams():
    scores = torch.tensor([[0.0, -1.0]])  # [B=1, W=2]
    lp = torch.tensor([[[-2.0, -0.5, INF], [-0.1, INF, -3.0]]])  # [1, 2, N=3]
    top, parent, code = select_beams(scores, lp, width=3)
    assert top[0].tolist() == pytest.approx([-0.5, -1.1, -2.0])
    assert parent.tolist() == [[0, 1, 0]] and code.tolist() == [[1, 0, 0]]


def test_shared_prefix_attention_equals_attention_over_copied_prefix():
    torch.manual_seed(0)
    b, hkv, g, w, p, t, d = 3, 2, 2, 4, 5, 2, 8
    q = torch.randn(b, hkv * g, w, d, dtype=torch.float64)
    pk, pv = torch.randn(2, b, hkv, p, d, dtype=torch.float64)
    ok, ov = torch.randn(2, b, w, hkv, t, d, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3])
    valid = torch.arange(p)[None, :] < lengths[:, None]  # [B, P]
    bias = torch.zeros(b, p, dtype=torch.float64).masked_fill(~valid, INF)[:, None, None, None]
    got = shared_prefix_attention(q, pk, pv, bias, ok, ov, scale=0.3)
    for bi in range(b):
        for wi in range(w):
            for h in range(hkv * g):
                keys = torch.cat([pk[bi, h // g, : lengths[bi]], ok[bi, wi, h // g]])
                vals = torch.cat([pv[bi, h // g, : lengths[bi]], ov[bi, wi, h // g]])
                att = torch.softmax(keys @ q[bi, h, wi] * 0.3, dim=0) @ vals
                torch.testing.assert_close(got[bi, h, wi], att)


# ---- the reference, written here: HF generate + a plain dict trie ---------------------------
def dict_trie(codes: np.ndarray, skip: frozenset[int] = frozenset()) -> dict:
    root: dict = {}
    for item, row in enumerate(codes.tolist()):
        if item not in skip:
            node = root
            for c in row[:-1]:
                node = node.setdefault(c, {})
            node[row[-1]] = item
    return root


def hf_reference(model, prompts, tries, vocab: CodeVocab, beam: int, k: int):
    """Per prompt: [(item, score)] from generate(num_beams=beam, prefix_allowed_tokens_fn)."""
    p_max = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), p_max), vocab.pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, p_max - len(p) :], mask[i, p_max - len(p) :] = torch.tensor(p), 1

    def walk(batch_id: int, generated: list[int]):
        node = tries[batch_id]
        for level, tok in enumerate(generated):
            node = node.get(tok - vocab.level_start(level)) if isinstance(node, dict) else None
        return node

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        generated = sent[p_max:].tolist()
        node = walk(batch_id, generated)
        if not isinstance(node, dict) or not node:
            return [vocab.eos_id]  # a dead (-inf) beam: any token keeps it dead
        return [vocab.level_start(len(generated)) + c for c in node]

    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=beam,
        num_return_sequences=beam,
        prefix_allowed_tokens_fn=allowed,
        length_penalty=0.0,
        do_sample=False,
        max_new_tokens=vocab.levels,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=vocab.pad_id,
        eos_token_id=vocab.eos_id,
    )
    seqs = out.sequences[:, p_max:].view(len(prompts), beam, -1)
    scores = out.sequences_scores.view(len(prompts), beam)
    result = []
    for b in range(len(prompts)):
        row = []
        for w in range(beam):
            # HF's -1e9 filler beams (fewer real continuations than beams) are not answers.
            if scores[b, w] > -1e8 and seqs.shape[-1] == vocab.levels:
                item = walk(b, seqs[b, w].tolist())
                row.append((item, float(scores[b, w])))
        result.append(row[:k])
    return result


def assert_same(got, want, tol: float = 1e-4) -> None:
    for b, expected in enumerate(want):
        items = [i for i in got.items[b].tolist() if i >= 0]
        assert items == [i for i, _ in expected], f"user {b}"
        scores = got.scores[b, : len(items)].numpy()
        np.testing.assert_allclose(scores, [s for _, s in expected], atol=tol, err_msg=f"user {b}")


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(
        VOCAB, tmp_path_factory.mktemp("lm"), hidden=32, layers=2, heads=4, kv_heads=2, seed=0
    )


@pytest.fixture(scope="module")
def model64(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def catalogue() -> np.ndarray:
    return random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)


def histories(n: int, seed: int, catalogue: np.ndarray) -> list[list[int]]:
    """Random histories of 0..25 items (prompts keep the last 20), the empty one first."""
    rng = np.random.default_rng(seed)
    lengths = [0, *rng.integers(0, 26, size=n - 1).tolist()]
    return [rng.integers(0, len(catalogue), size=m).tolist() for m in lengths]


def prompts_of(hist: list[list[int]], catalogue: np.ndarray) -> list[list[int]]:
    return [VOCAB.prompt(catalogue[h]) for h in hist]


# ---- equality with the reference -------------------------------------------------------------
@pytest.mark.slow
def test_200_histories_match_generate(model64, catalogue):
    hist = histories(200, seed=1, catalogue=catalogue)
    prompts = prompts_of(hist, catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    got = beam_search(model64, prompts, trie, VOCAB, beam_width=20, k=10)
    full = dict_trie(catalogue)
    for start in range(0, 200, 50):
        want = hf_reference(model64, prompts[start : start + 50], [full] * 50, VOCAB, 20, 10)
        assert_same(_slice(got, start, start + 50), want)


def _slice(out, a: int, b: int):
    return type(out)(out.items[a:b], out.scores[a:b])


@pytest.mark.slow
def test_exclusions_equal_a_trie_without_the_items(model64, catalogue):
    hist = histories(40, seed=2, catalogue=catalogue)
    prompts = prompts_of(hist, catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    plain = beam_search(model64, prompts, trie, VOCAB, beam_width=20, k=10)
    excludes = []
    for b, h in enumerate(hist):
        best = plain.items[b, :2].tolist()
        ex = set(h) | set(best)
        if b % 2:  # every item under the best first code: that prefix must vanish at level 0
            ex |= set(np.flatnonzero(catalogue[:, 0] == catalogue[best[0], 0]).tolist())
        excludes.append(frozenset(ex))
    got = beam_search(model64, prompts, trie, VOCAB, beam_width=20, k=10, excludes=excludes)
    want = hf_reference(
        model64, prompts, [dict_trie(catalogue, e) for e in excludes], VOCAB, 20, 10
    )
    assert_same(got, want)
    for b, ex in enumerate(excludes):
        assert not ex & set(got.items[b].tolist())
        assert (got.items[b] >= 0).all()  # K valid items still come back


def test_k_above_beam_width_widens_the_beam(model64, catalogue):
    prompts = prompts_of(histories(6, seed=4, catalogue=catalogue), catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    got = beam_search(model64, prompts, trie, VOCAB, beam_width=4, k=7)
    assert_same(got, hf_reference(model64, prompts, [dict_trie(catalogue)] * 6, VOCAB, 7, 7))


def test_hf_cache_decoder_matches_generate(model64, catalogue):
    prompts = prompts_of(histories(12, seed=5, catalogue=catalogue), catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    got = beam_search(make_decoder(model64, "hf"), prompts, trie, VOCAB, beam_width=8, k=5)
    assert_same(got, hf_reference(model64, prompts, [dict_trie(catalogue)] * 12, VOCAB, 8, 5))


def test_shared_prefix_decoder_matches_generate(model64, catalogue):
    # The fused decoder's readable reference (auto picks the fused one for Llama).
    prompts = prompts_of(histories(12, seed=8, catalogue=catalogue), catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    got = beam_search(make_decoder(model64, "shared"), prompts, trie, VOCAB, beam_width=8, k=5)
    assert_same(got, hf_reference(model64, prompts, [dict_trie(catalogue)] * 12, VOCAB, 8, 5))


def test_qwen2_uses_the_fused_path_and_matches(catalogue):
    model = tiny_qwen2(VOCAB, seed=1)
    assert type(make_decoder(model)).__name__ == "FusedDecoder"
    prompts = prompts_of(histories(10, seed=6, catalogue=catalogue), catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    got = beam_search(model, prompts, trie, VOCAB, beam_width=8, k=5)
    assert_same(got, hf_reference(model, prompts, [dict_trie(catalogue)] * 10, VOCAB, 8, 5))


def test_float32_matches_generate(model_dir, catalogue):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = prompts_of(histories(30, seed=7, catalogue=catalogue), catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    got = beam_search(model, prompts, trie, VOCAB, beam_width=10, k=5)
    assert_same(got, hf_reference(model, prompts, [dict_trie(catalogue)] * 30, VOCAB, 10, 5))


# ---- behaviour with a changing catalogue -----------------------------------------------------
def test_deactivated_items_vanish_and_added_items_appear(model64, catalogue):
    prompts = prompts_of(histories(5, seed=8, catalogue=catalogue), catalogue)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    before = beam_search(model64, prompts, trie, VOCAB, beam_width=10, k=5)
    gone = int(before.items[0, 0])
    trie.deactivate(gone)
    after = beam_search(model64, prompts, trie, VOCAB, beam_width=10, k=5)
    assert gone not in after.items.tolist()[0]
    assert_same(
        after,
        hf_reference(model64, prompts, [dict_trie(catalogue, frozenset({gone}))] * 5, VOCAB, 10, 5),
    )
    new = trie.add(list(trie.codes_of(gone)))  # same identifier, new catalogue row
    again = beam_search(model64, prompts, trie, VOCAB, beam_width=10, k=5)
    assert again.items[0, 0] == new
    torch.testing.assert_close(again.scores, before.scores)


def test_tiny_catalogue_returns_what_exists(model64):
    codes = np.array([[0, 1, 2], [0, 1, 3], [5, 0, 0]])
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    got = beam_search(model64, [[VOCAB.bos_id]], trie, VOCAB, beam_width=20, k=10)
    assert sorted(got.items[0, :3].tolist()) == [0, 1, 2]
    assert got.items[0, 3:].tolist() == [-1] * 7 and torch.isinf(got.scores[0, 3:]).all()
    want = hf_reference(model64, [[VOCAB.bos_id]], [dict_trie(codes)], VOCAB, 20, 10)
    assert_same(got, want)
    empty = beam_search(model64, [[VOCAB.bos_id]], ItemTrie(3, 32), VOCAB, beam_width=4, k=2)
    assert empty.items.tolist() == [[-1, -1]]


def test_mismatched_trie_is_rejected(model64):
    with pytest.raises(ValueError, match="does not match the vocabulary"):
        beam_search(model64, [[1]], ItemTrie(2, 32), VOCAB)
