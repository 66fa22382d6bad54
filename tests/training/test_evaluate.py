"""Evaluation helpers beside the metrics: popularity bias, repeats and the repeat baseline,
checked against values computed by hand."""

from __future__ import annotations

import math

import pytest

from training.evaluate import (
    beyond_accuracy,
    evaluate_popularity,
    evaluate_recent,
    item_popularity,
    recent_items,
    repeats,
)


def test_recent_items_newest_first_distinct_then_fill() -> None:
    assert recent_items([5, 1, 2, 1, 3], fill=[9, 3, 8, 7], k=6) == [3, 1, 2, 5, 9, 8]
    # only the last `history_items` count: 5 falls out of a history of 3
    assert recent_items([5, 1, 2, 1, 3], fill=[9, 3, 8], k=5, history_items=3) == [3, 1, 2, 9, 8]
    assert recent_items([], fill=[4, 4, 2], k=3) == [4, 2]
    assert recent_items([1, 2, 3], fill=[], k=2) == [3, 2]


def test_repeats_by_hand() -> None:
    pairs = [([1, 2, 3], 2), ([4, 5], 6), ([7], 8), ([9, 9], 9)]
    recs = [
        [2, 10, 11],  # repeat target, hit; 1 of 3 recommended from history
        [6, 5],  # new target, hit; 1 of 2
        [10, 11, 12],  # new target, miss; 0 of 3
        [1, 2],  # repeat target, miss; 0 of 2
    ]
    r = repeats(recs, pairs)
    assert r["repeat_targets"] == 0.5
    assert r["history_share@10"] == pytest.approx(2 / 10)
    assert r["recall@10_repeat"] == 0.5
    assert r["recall@10_new"] == 0.5
    # with a history of 1 item, user 0's target 2 is no longer a repeat (only [3] is seen)
    r1 = repeats(recs, pairs, history_items=1)
    assert r1["repeat_targets"] == 0.25 and r1["recall@10_new"] == pytest.approx(2 / 3)
    assert repeats(recs, pairs, history_items=0)["repeat_targets"] == 0.0


def test_recent_baseline_ranks_repeats_and_fills_with_popular() -> None:
    train = [[0, 1, 1, 2], [1, 2], [1]]  # popularity: item 1 (4), 2 (2), 0 (1)
    pairs = [([0, 3], 3), ([2, 3, 2], 1), ([4], 2)]
    out = evaluate_recent(train, pairs, n_items=6)
    # lists: [3, 0, 1, 2, ...] (target 3 at rank 0); [2, 3, 1, ...] (rank 2); [4, 1, 2, ...] (rank 2)
    assert out["recall@5"] == 1.0
    assert out["ndcg@10"] == pytest.approx((1 + 2 / math.log2(4)) / 3)
    assert out["repeat_targets"] == pytest.approx(1 / 3)
    assert out["recall@10_repeat"] == 1.0 and out["recall@10_new"] == 1.0
    pop = evaluate_popularity(train, pairs, n_items=6)  # [1, 2, 0, 3, 4, 5] for everyone
    assert pop["ndcg@10"] == pytest.approx((1 / math.log2(5) + 1 + 1 / math.log2(3)) / 3)
    assert pop["history_share@10"] == pytest.approx((2 + 2 + 1) / 18)


def test_beyond_accuracy_by_hand() -> None:
    pop = item_popularity([[0, 0, 1], [0, 2]], 4)  # counts [3, 1, 1, 0]
    assert pop.tolist() == [3, 1, 1, 0]
    out = beyond_accuracy([[0, 1], [0]], pop)
    assert out["coverage@10"] == 0.5
    assert out["arp@10"] == pytest.approx((3 + 1 + 3) / 3)
