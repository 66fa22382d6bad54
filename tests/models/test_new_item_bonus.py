"""The new-item bonus inside the beam search on a tiny real model: exact against brute force over
the whole catalogue, the plain search when the bonus is 0, scores that are log-prob + bonus, and
the sub-trie of items added after training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from models.beam import NewItemBonus, beam_search
from models.repeat import identifier_log_probs, repeat_candidates
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import make_tiny_llama, random_catalogue

VOCAB = CodeVocab(levels=3, codebook_size=8, history_items=6)
N_ITEMS = 120
FIRST_NEW = 100  # rows 100..119 are "added after training"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_llama(VOCAB, tmp_path_factory.mktemp("lm"), init_std=0.2)
    model = AutoModelForCausalLM.from_pretrained(path).to(torch.float64).eval()
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=11)
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    rng = np.random.default_rng(3)
    histories = [rng.integers(0, FIRST_NEW, int(rng.integers(1, 7))).tolist() for _ in range(6)]
    prompts = [VOCAB.prompt(codes[h]) for h in histories]
    # Every item's exact log-probability per prompt: the brute-force reference.
    every = np.broadcast_to(codes, (len(prompts), *codes.shape)).copy()
    exact = identifier_log_probs(model, prompts, every, VOCAB).numpy()  # [B, n]
    return model, codes, trie, histories, prompts, exact


def test_since_holds_the_active_rows_from_first_row(setup) -> None:
    _, codes, trie, *_ = setup
    sub = trie.since(FIRST_NEW)
    assert sub.n_active == N_ITEMS - FIRST_NEW
    assert sub.lookup(codes[FIRST_NEW].tolist()) is not None
    assert sub.lookup(codes[0].tolist()) is None
    assert trie.since(FIRST_NEW) is sub  # cached while the trie is unchanged
    assert trie.since(N_ITEMS).n_active == 0


def test_since_follows_adds_and_deactivations() -> None:
    codes = random_catalogue(30, 3, 8, seed=2)
    trie = ItemTrie.from_codes(codes[:20], 8)
    assert trie.since(20).n_active == 0
    row = trie.add(codes[25].tolist())
    assert trie.since(20).lookup(codes[25].tolist()) == 0  # renumbered from 0
    trie.deactivate(row)
    assert trie.since(20).n_active == 0


def test_zero_bonus_is_the_plain_search(setup) -> None:
    model, _, trie, _, prompts, _ = setup
    plain = beam_search(model, prompts, trie, VOCAB, beam_width=10, k=10)
    zero = NewItemBonus(FIRST_NEW, [0.0] * len(prompts))
    got = beam_search(model, prompts, trie, VOCAB, beam_width=10, k=10, new_items=zero)
    assert torch.equal(got.items, plain.items)
    assert torch.equal(got.scores, plain.scores)


@pytest.mark.parametrize("bonus", [0.5, 2.0, 50.0])
def test_wide_beam_equals_brute_force_with_the_bonus(setup, bonus) -> None:
    """With a beam as wide as the catalogue nothing is pruned: the answer must be the exact
    top-10 of log P(identifier) + bonus * [new], with those scores."""
    model, _, trie, _, prompts, exact = setup
    new = NewItemBonus(FIRST_NEW, [bonus] * len(prompts))
    got = beam_search(model, prompts, trie, VOCAB, beam_width=N_ITEMS, k=10, new_items=new)
    target = exact + bonus * (np.arange(N_ITEMS) >= FIRST_NEW)
    for b in range(len(prompts)):
        want = np.argsort(-target[b], kind="stable")[:10]
        assert got.items[b].tolist() == want.tolist()
        np.testing.assert_allclose(got.scores[b].numpy(), target[b][want], atol=1e-5)


def test_a_dominant_bonus_searches_the_new_items_alone(setup) -> None:
    """The bonus lifts prefixes, not only leaves: with a bonus larger than any log-prob gap a
    narrow beam is exactly the same-width beam over a trie of the new items alone, where the
    plain search of that width returns few of them."""
    model, codes, trie, _, prompts, _ = setup
    plain = beam_search(model, prompts, trie, VOCAB, beam_width=3, k=3)
    new = NewItemBonus(FIRST_NEW, [1000.0] * len(prompts))
    got = beam_search(model, prompts, trie, VOCAB, beam_width=3, k=3, new_items=new)
    alone = ItemTrie.from_codes(codes[FIRST_NEW:], VOCAB.codebook_size)
    want = beam_search(model, prompts, alone, VOCAB, beam_width=3, k=3)
    assert torch.equal(got.items, want.items + FIRST_NEW)
    torch.testing.assert_close(got.scores, want.scores + 1000.0, atol=1e-4, rtol=0)
    missed = [
        set(g) - set(p) for g, p in zip(got.items.tolist(), plain.items.tolist(), strict=True)
    ]
    assert sum(map(len, missed)) >= len(prompts)  # new items the plain search does not return


def test_per_prompt_bonus_and_bad_values(setup) -> None:
    model, _, trie, _, prompts, exact = setup
    bonuses = [0.0, 1000.0] + [0.0] * (len(prompts) - 2)
    got = beam_search(
        model, prompts, trie, VOCAB, 20, 5, new_items=NewItemBonus(FIRST_NEW, bonuses)
    )
    plain = beam_search(model, prompts, trie, VOCAB, 20, 5)
    assert torch.equal(got.items[0], plain.items[0])
    assert (got.items[1] >= FIRST_NEW).all()
    with pytest.raises(ValueError, match="finite and >= 0"):
        NewItemBonus(FIRST_NEW, [-1.0])
    with pytest.raises(ValueError, match="bonuses for"):
        beam_search(model, prompts, trie, VOCAB, new_items=NewItemBonus(FIRST_NEW, [1.0]))


def test_repeat_candidates_add_the_bonus_to_new_history_items(setup) -> None:
    model, codes, trie, _, prompts, exact = setup
    histories = [[FIRST_NEW + 1, 4]] * len(prompts)
    new = NewItemBonus(FIRST_NEW, [3.0] * len(prompts))
    cand = repeat_candidates(
        model, prompts, histories, trie, VOCAB, beam_width=10, k=10, new_items=new
    )
    for u in range(len(prompts)):
        assert cand.items[u] == [4, FIRST_NEW + 1]  # newest first
        np.testing.assert_allclose(
            cand.scores[u], [exact[u, 4], exact[u, FIRST_NEW + 1] + 3.0], atol=1e-5
        )
