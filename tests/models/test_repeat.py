"""Repeat-aware recommendations on a tiny real model: exact scores (equal to the beam's for the
same identifier and to a plain forward pass), the prior, the merge and the fitted grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from models.beam import beam_search
from models.repeat import (
    RepeatPrior,
    fit_prior,
    history_candidates,
    identifier_log_probs,
    repeat_candidates,
    rerank,
)
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import make_tiny_llama, random_catalogue

VOCAB = CodeVocab(levels=3, codebook_size=16, history_items=6)
N_ITEMS = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_llama(VOCAB, tmp_path_factory.mktemp("lm"), init_std=0.2)
    model = AutoModelForCausalLM.from_pretrained(path).to(torch.float64).eval()
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=5)
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    rng = np.random.default_rng(1)
    histories = [rng.integers(0, N_ITEMS, int(rng.integers(1, 9))).tolist() for _ in range(12)]
    histories[0] = [3, 7, 3, 9]  # a repeat inside the history
    prompts = [VOCAB.prompt(codes[h]) for h in histories]
    return model, codes, trie, histories, prompts


def test_history_candidates_newest_first_with_positions_and_visits() -> None:
    items, position, visits = history_candidates([5, 1, 5, 2, 1, 1], history_items=5)
    # The window is the last 5: [1, 5, 2, 1, 1]; newest first: 1 (pos 1), 2 (pos 3), 5 (pos 4).
    assert items == [1, 2, 5]
    assert position == [1, 3, 4]
    assert visits == [3, 1, 1]
    assert history_candidates([1, 2], history_items=0) == ([], [], [])


def test_identifier_log_probs_equal_a_plain_forward(setup) -> None:
    model, codes, _, histories, prompts = setup
    cand = np.stack([codes[[0, 1, 2]], codes[[3, 4, 5]]])  # [B=2, C=3, L]
    got = identifier_log_probs(model, prompts[:2], cand, VOCAB)
    for b in range(2):
        for c in range(3):
            ids = torch.tensor([prompts[b] + VOCAB.tokens(cand[b, c]).tolist()])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            p = len(prompts[b])
            want = sum(lp[p - 1 + t, ids[0, p + t]] for t in range(VOCAB.levels))
            assert got[b, c].item() == pytest.approx(float(want), abs=1e-5)


def test_history_item_found_by_the_beam_gets_the_beams_score(setup) -> None:
    model, codes, trie, histories, prompts = setup
    beam = beam_search(model, prompts, trie, VOCAB, beam_width=20, k=20)
    cand = np.stack([codes[beam.items[:, :5].numpy()]])[0]  # the beam's own top 5 per user
    got = identifier_log_probs(model, prompts, cand, VOCAB)
    assert torch.allclose(got, beam.scores[:, :5], atol=1e-5)


def test_zero_prior_ranks_by_the_models_score_alone(setup) -> None:
    """Without a prior the answer is the top 10 of the beam's items and the history items by
    their exact model scores: the beam's own order, with a history item inserted only where
    the model scores it above the beam's tenth item (a search miss that the mode recovers)."""
    model, _, trie, histories, prompts = setup
    cand = repeat_candidates(model, prompts, histories, trie, VOCAB, beam_width=20, k=10)
    items, scores = rerank(cand, RepeatPrior(), 10)
    for u in range(len(histories)):
        pool = dict(zip(cand.beam.items[u].tolist(), cand.beam.scores[u].tolist(), strict=True))
        pool.update(zip(cand.items[u], cand.scores[u].tolist(), strict=True))
        want = sorted(pool, key=lambda i: (-pool[i], i))[:10]
        assert items[u] == want
        beam_top = cand.beam.items[u, :10].tolist()
        assert [i for i in items[u] if i in beam_top] == beam_top[
            : len([i for i in items[u] if i in beam_top])
        ]


def test_large_bias_puts_recent_items_first_in_recency_order(setup) -> None:
    model, _, trie, histories, prompts = setup
    cand = repeat_candidates(model, prompts, histories, trie, VOCAB, beam_width=20, k=10)
    items, scores = rerank(cand, RepeatPrior(bias=1e6, recency=-1e3), 10)
    assert items[0][:3] == [9, 3, 7]  # history [3, 7, 3, 9]: newest distinct first
    assert scores[0] == sorted(scores[0], reverse=True)


def test_exclusions_and_inactive_items_never_come_back(setup) -> None:
    model, codes, _, histories, prompts = setup
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    trie.deactivate(9)
    cand = repeat_candidates(
        model, prompts[:1], histories[:1], trie, VOCAB, excludes=[{7}], beam_width=20, k=10
    )
    items, _ = rerank(cand, RepeatPrior(bias=1e6), 10)
    assert items[0][:1] == [3]
    assert 7 not in items[0] and 9 not in items[0]


def test_fit_prior_finds_a_bias_that_recovers_repeat_targets(setup) -> None:
    model, _, trie, histories, prompts = setup
    cand = repeat_candidates(model, prompts, histories, trie, VOCAB, beam_width=20, k=10)
    targets = [h[-1] for h in histories]  # every user repeats their newest item
    prior, ndcg, plain = fit_prior(cand, targets)
    assert ndcg == pytest.approx(1.0)
    assert plain < 0.5
    # The fitted prior reproduces its NDCG through the serving path.
    items, _ = rerank(cand, prior, 10)
    assert [r[0] for r in items] == targets
    # Targets the beam finds and no history holds: the prior switches itself off.
    beam_top = [r[0] for r in cand.beam.items.tolist()]
    off, ndcg_off, plain_off = fit_prior(cand, beam_top)
    assert ndcg_off == pytest.approx(plain_off) and off.bias < 0
    assert RepeatPrior.from_dict(prior.to_dict()) == prior


class CountingDecoder:
    """A decoder that counts its prefills (everything else passed through)."""

    def __init__(self, inner) -> None:
        self.inner, self.prefills = inner, 0
        if hasattr(inner, "fork"):
            self.fork = inner.fork

    def prefill(self, prompts):
        self.prefills += 1
        return self.inner.prefill(prompts)

    def step(self, state, parents, tokens):
        return self.inner.step(state, parents, tokens)


@pytest.mark.parametrize(("kind", "prefills"), [("fused", 1), ("shared", 1), ("hf", 2)])
def test_one_prefill_serves_the_beam_and_the_history_scores(setup, kind, prefills) -> None:
    """Decoders that fork their state prefill once for both decodes; the answer is the one of
    two separate decodes (a beam search, then the history items scored on their own)."""
    from models.decoders import make_decoder

    model, codes, trie, histories, prompts = setup
    decoder = CountingDecoder(make_decoder(model, kind))
    got = repeat_candidates(decoder, prompts, histories, trie, VOCAB, beam_width=8, k=8)
    assert decoder.prefills == prefills
    beam = beam_search(model, prompts, trie, VOCAB, beam_width=8, k=8)
    assert torch.equal(got.beam.items, beam.items)
    assert torch.allclose(got.beam.scores, beam.scores, atol=1e-5)
    for u, items in enumerate(got.items):
        alone = identifier_log_probs(model, [prompts[u]], codes[items][None], VOCAB)[0]
        np.testing.assert_allclose(got.scores[u], alone.numpy(), atol=1e-5)
