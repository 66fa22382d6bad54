"""New-item slots: the placement rule on hand-made lists, and the search over new items only on
a tiny real model (exact against brute force, exclusions, one prefill for both decodes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.decoders import make_decoder, prefills
from models.new_items import NewItemSlots, new_item_search, place
from models.trie import ItemTrie
from tests.models.test_new_item_bonus import FIRST_NEW, N_ITEMS, VOCAB, setup  # noqa: F401, F811

# ---- the placement rule ----------------------------------------------------------------------
MAIN = [1, 2, 3, 4]
SCORES = [-1.0, -2.0, -3.0, -4.0]


def test_no_slots_keeps_the_main_list() -> None:
    got = place(MAIN, SCORES, [100], [-0.5], NewItemSlots(0, math.inf), k=4, first_row=100)
    assert [i for i, _, _ in got] == MAIN


def test_a_new_item_displaces_the_last_item_when_within_the_margin() -> None:
    # -6 + 2.5 = -3.5 >= -4 (item 4's score): admitted, lands last (its score is the lowest).
    got = place(MAIN, SCORES, [100], [-6.0], NewItemSlots(1, 2.5), k=4, first_row=100)
    assert got == [(1, -1.0, False), (2, -2.0, False), (3, -3.0, False), (100, -6.0, True)]
    # -6 + 1.5 = -4.5 < -4: not admitted.
    assert [
        i
        for i, _, _ in place(MAIN, SCORES, [100], [-6.0], NewItemSlots(1, 1.5), k=4, first_row=100)
    ] == MAIN


def test_a_new_item_that_scores_higher_keeps_its_own_place() -> None:
    got = place(MAIN, SCORES, [100], [-1.5], NewItemSlots(1, 0.0), k=4, first_row=100)
    assert [i for i, _, _ in got] == [1, 100, 2, 3]


def test_each_admission_displaces_the_next_last_item_and_the_cap_holds() -> None:
    new, new_scores = [100, 101, 102], [-5.0, -5.5, -5.6]
    # margin 2: 100 beats item 4 (-5+2 >= -4), 101 must beat item 3 (-3.5 < -3): stops there.
    got = place(MAIN, SCORES, new, new_scores, NewItemSlots(3, 2.0), k=4, first_row=100)
    assert [i for i, _, _ in got] == [1, 2, 3, 100]
    # An infinite margin admits up to the cap, never more.
    got = place(MAIN, SCORES, new, new_scores, NewItemSlots(2, math.inf), k=4, first_row=100)
    assert [i for i, _, _ in got] == [1, 2, 100, 101]


def test_free_places_take_new_items_and_present_ones_are_not_doubled() -> None:
    got = place([1, -1], [-1.0, -math.inf], [100, 101], [-9.0, -9.5], NewItemSlots(1, -1e9), 3, 100)
    assert [i for i, _, _ in got] == [1, 100]  # one free place, one slot
    # A new item listed on merit fills the slot; a second slot goes to the next new item.
    main, main_scores = [1, 100, 2], [-1.0, -2.0, -3.0]
    got = place(main, main_scores, [100, 101], [-2.0, -9.0], NewItemSlots(1, 10), 3, 100)
    assert [i for i, _, _ in got] == [1, 100, 2]
    got = place(main, main_scores, [100, 101], [-2.0, -9.0], NewItemSlots(2, 10), 3, 100)
    assert got == [(1, -1.0, False), (100, -2.0, False), (101, -9.0, True)]


def test_slots_round_trip_and_reject_bad_values() -> None:
    s = NewItemSlots(2, 3.5)
    assert NewItemSlots.from_dict(s.to_dict()) == s
    assert NewItemSlots.from_dict(None) == NewItemSlots()
    with pytest.raises(ValueError, match=">= 0"):
        NewItemSlots(-1, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        NewItemSlots(1, float("nan"))


# ---- the search over new items (the bonus tests' model, catalogue and prompts) -----------
def test_new_item_search_equals_brute_force_over_the_new_rows(setup) -> None:  # noqa: F811
    model, _, trie, _, prompts, exact = setup
    got = new_item_search(model, prompts, trie, VOCAB, FIRST_NEW, k=3, beam_width=N_ITEMS)
    for b in range(len(prompts)):
        want = FIRST_NEW + np.argsort(-exact[b, FIRST_NEW:], kind="stable")[:3]
        assert got.items[b].tolist() == want.tolist()
        np.testing.assert_allclose(got.scores[b].numpy(), exact[b, want], atol=1e-5)


def test_new_item_search_honours_exclusions_and_deactivation(setup) -> None:  # noqa: F811
    model, codes, _, _, prompts, exact = setup
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    best = [FIRST_NEW + int(np.argmax(exact[b, FIRST_NEW:])) for b in range(len(prompts))]
    trie.deactivate(best[0])
    excludes = [{best[b], 0} for b in range(len(prompts))]
    got = new_item_search(model, prompts, trie, VOCAB, FIRST_NEW, 5, N_ITEMS, excludes)
    for b in range(len(prompts)):
        listed = got.items[b].tolist()
        assert best[b] not in listed and best[0] not in listed
        assert all(i >= FIRST_NEW for i in listed)


def test_no_new_items_gives_an_empty_answer(setup) -> None:  # noqa: F811
    model, _, trie, _, prompts, _ = setup
    got = new_item_search(model, prompts, trie, VOCAB, N_ITEMS, k=2)
    assert (got.items == -1).all() and torch.isinf(got.scores).all()


def test_a_forked_prefill_gives_the_same_new_items(setup) -> None:  # noqa: F811
    model, _, trie, _, prompts, _ = setup
    decoder = make_decoder(model)
    main, second = prefills(decoder, prompts, 2)
    assert second is not None and second[1] is not main[1]
    alone = new_item_search(decoder, prompts, trie, VOCAB, FIRST_NEW, 4)
    forked = new_item_search(decoder, prompts, trie, VOCAB, FIRST_NEW, 4, prefilled=second)
    assert torch.equal(alone.items, forked.items)
    assert torch.allclose(alone.scores, forked.scores, atol=1e-9)
