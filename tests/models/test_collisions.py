import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.collisions import resolve_collisions


def table_distance(table: np.ndarray):
    """Distances that depend on the row, the level and the code (prefix-independent)."""

    def fn(rows: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
        return table[rows, prefixes.shape[1]]

    return fn


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 60),
    levels=st.integers(1, 3),
    size=st.integers(2, 6),
    seed=st.integers(0, 10_000),
)
def test_any_codes_become_unique_and_unique_rows_stay(n, levels, size, seed):
    if n > size**levels:
        n = size**levels
    rng = np.random.default_rng(seed)
    # few distinct values -> many collisions
    codes = rng.integers(0, max(1, size // 2), size=(n, levels))
    table = rng.random((n, levels, size))
    res = resolve_collisions(codes, table_distance(table))
    out = res.codes
    assert len({tuple(r) for r in out.tolist()}) == n
    assert out.min() >= 0 and out.max() < size
    tuples = [tuple(r) for r in codes.tolist()]
    counts = {t: tuples.count(t) for t in tuples}
    for i, t in enumerate(tuples):
        if counts[t] == 1:
            assert tuple(out[i]) == t, "a row without collision was moved"
    # each colliding group keeps exactly one member in place
    for t, c in counts.items():
        if c > 1:
            members = [i for i, u in enumerate(tuples) if u == t]
            assert sum(tuple(out[i]) == t for i in members) == 1
    assert res.collisions_before == sum(c for c in counts.values() if c > 1)
    assert set(res.moved.tolist()) == {i for i in range(n) if tuple(out[i]) != tuples[i]}


def test_nearest_free_last_code_and_closest_member_keeps():
    codes = np.array([[0, 1], [0, 1], [0, 1]])
    # last-level distances per row; row 2 is closest to code 1 -> it keeps (0, 1)
    last = np.array([[5.0, 0.5, 0.1, 9.0], [5.0, 0.4, 9.0, 0.2], [5.0, 0.0, 9.0, 9.0]])

    def fn(rows, prefixes):
        if prefixes.shape[1] == 1:
            return last[rows]
        return np.zeros((len(rows), 4))

    out = resolve_collisions(codes, fn).codes
    assert out.tolist() == [[0, 2], [0, 3], [0, 1]]


def test_taken_codes_are_avoided_and_full_prefix_moves_up_a_level():
    codes = np.array([[0, 0]])
    taken = {(0, 0), (0, 1)}  # the whole (0, *) subtree is taken (codebook of 2)

    def fn(rows, prefixes):
        return np.tile(np.array([0.0, 1.0]), (len(rows), 1))

    out = resolve_collisions(codes, fn, is_taken=lambda t: t in taken).codes
    assert out.tolist() == [[1, 0]]


def test_exhausted_space_is_a_clear_error():
    codes = np.zeros((5, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="no free identifier"):
        resolve_collisions(codes, lambda r, p: np.zeros((len(r), 4)))


def test_extra_token_numbers_items_sharing_codes():
    from models.collisions import append_extra_token

    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2]])
    out = append_extra_token(codes, 4, is_taken=lambda t: t == (1, 2, 1))
    assert out.tolist() == [[1, 2, 0], [1, 2, 2], [0, 0, 0], [1, 2, 3]]
    with pytest.raises(ValueError, match="more than 2 items share"):
        append_extra_token(np.zeros((3, 1), dtype=np.int64), 2)


def test_a_free_identifier_beyond_the_nearest_branches_is_found():
    """The 8 nearest first-level codes are full, half of the code space is still free: an item
    gets an identifier (the nearest free one), not a 'catalogue full' error."""

    def fn(rows, prefixes):
        return np.tile(np.arange(16, dtype=np.float64), (len(rows), 1))  # code c at distance c

    out = resolve_collisions(np.array([[0, 0]]), fn, is_taken=lambda t: t[0] < 8, branch=8)
    assert out.codes.tolist() == [[8, 0]]


def test_full_code_space_errors_are_typed():
    from models.collisions import CodeSpaceExhausted, append_extra_token

    with pytest.raises(CodeSpaceExhausted):
        resolve_collisions(np.zeros((5, 1), dtype=np.int64), lambda r, p: np.zeros((len(r), 4)))
    with pytest.raises(CodeSpaceExhausted):
        append_extra_token(np.zeros((3, 1), dtype=np.int64), 2)
