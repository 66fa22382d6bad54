"""How the decode benchmark calls two engines' outputs identical: item lists exactly, scores
within a relative tolerance, and the largest difference is kept for the report."""

from benchmarks import decode


def test_lists_exact_scores_relative() -> None:
    ref = [[(3, -25.0), (7, -26.0)]]
    # 1.09e-4 on a score of 25 is 4.4e-6 relative: the same output.
    decode.MAX_DIFF[0] = 0.0
    assert decode.same_outputs([[(3, -25.000109), (7, -26.0)]], ref)
    assert decode.MAX_DIFF[0] == 0.0  # not a headline comparison: not reported
    assert decode.same_outputs([[(3, -25.000109), (7, -26.0)]], ref, headline=True)
    assert decode.MAX_DIFF[0] >= 1.09e-4 - 1e-12
    # 1e-3 on 25 is 4e-5 relative: beyond float32 noise.
    assert not decode.same_outputs([[(3, -25.001), (7, -26.0)]], ref)
    # Any change in the items is a difference, whatever the scores.
    assert not decode.same_outputs([[(7, -25.0), (3, -26.0)]], ref)
    # Near zero the tolerance does not shrink below rtol in absolute terms.
    assert decode.same_outputs([[(1, -0.00001)]], [[(1, 0.0)]])
