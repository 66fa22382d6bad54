"""Bootstrap standard errors against values worked out by hand."""

import numpy as np
import pytest

from training.metrics import bootstrap_se, gains_at, standard_errors


def test_bootstrap_se_matches_the_analytic_standard_error() -> None:
    # Hits of 400 users, 100 of them 1: mean 0.25, sd (ddof 0) sqrt(0.25 * 0.75) = 0.4330;
    # the standard error of the mean is sd / sqrt(n) = 0.4330 / 20 = 0.02165.
    hits = np.array([1.0] * 100 + [0.0] * 300)
    assert bootstrap_se(hits, n_boot=4000) == pytest.approx(0.02165, rel=0.05)


def test_constant_values_have_no_error_and_one_user_none_either() -> None:
    assert bootstrap_se(np.ones(50)) == 0.0
    assert bootstrap_se(np.ones(1)) == 0.0


def test_standard_errors_cover_every_metric() -> None:
    ranks = np.array([0, 1, 7, 50, 3, 100])
    # NDCG@10 gains: rank 0 -> 1, rank 1 -> 1/log2(3) = 0.6309, rank 7 -> 1/log2(9) = 0.3155,
    # rank 3 -> 1/log2(5) = 0.4307, ranks >= 10 -> 0.
    assert gains_at(ranks, 10) == pytest.approx([1.0, 0.6309, 0.3155, 0.0, 0.4307, 0.0], abs=1e-4)
    se = standard_errors(ranks)
    assert set(se) == {"se_recall@5", "se_recall@10", "se_ndcg@5", "se_ndcg@10"}
    assert all(v > 0 for v in se.values())


def test_mode_switches_only_beyond_noise_and_ties_go_to_the_simpler_mode() -> None:
    from training.repeat import pick_mode

    rng = np.random.default_rng(0)
    base = rng.random(4000) * 0.1
    # Excluding the history clearly helps; repeat-aware is the same plus noise: exclude wins.
    noise = rng.normal(0, 0.01, 4000)
    gains = {"plain": base, "exclude_history": base + 0.02, "repeat": base + 0.02 + noise}
    assert pick_mode(gains) == "exclude_history"
    # Repeat-aware clearly beats both: repeat.
    gains["repeat"] = base + 0.05
    assert pick_mode(gains) == "repeat"
    # Nothing beats plain beyond noise: plain.
    assert pick_mode({m: base + rng.normal(0, 1e-3, 4000) * (m != "plain") for m in gains}) == (
        "plain"
    )
