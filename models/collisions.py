"""Unique identifiers: re-assign items whose code tuples collide.

LETTER's released identifiers are not unique (Yelp: 20,033 items on 19,201 tuples), and
TIGER appends a disambiguation token. Here an item that shares its tuple keeps it only if it is
the member closest to the shared code; every other member moves to the nearest FREE tuple that
keeps as long a prefix as possible: first the other codes of the last level (by distance of its
residual), then, only if that level is full under its prefix, alternatives one level up. The
search first looks only under the `branch` nearest codes of each upper level (cheap, and where
a near identifier is); when those are full it looks under every code, so an item is refused
(CodeSpaceExhausted) only when no identifier at all is free. Items that do not collide are never
touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# distance_fn(rows [m], prefixes [m, level]) -> squared distances [m, N] at that level
DistanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
TakenFn = Callable[[tuple[int, ...]], bool]


class CodeSpaceExhausted(ValueError):
    """No free identifier is left for an item (the service answers 507)."""


@dataclass
class Resolution:
    codes: np.ndarray  # [n, L] unique
    moved: np.ndarray  # rows that got a new tuple
    collisions_before: int  # items sharing a tuple with another item before resolution


def _first_free(
    row: int,
    prefix: tuple[int, ...],
    levels: int,
    distance_fn: DistanceFn,
    is_free: Callable[[tuple[int, ...]], bool],
    branch: int | None,
) -> tuple[int, ...] | None:
    """Nearest free completion of `prefix` for `row`, depth first over the `branch` nearest codes
    of each upper level (every code when `branch` is None)."""
    level = len(prefix)
    dists = distance_fn(np.array([row]), np.array([prefix], dtype=np.int64).reshape(1, level))[0]
    order = np.argsort(dists, kind="stable")
    if level == levels - 1:
        for c in order:
            cand = (*prefix, int(c))
            if is_free(cand):
                return cand
        return None
    for c in order[:branch]:
        found = _first_free(row, (*prefix, int(c)), levels, distance_fn, is_free, branch)
        if found is not None:
            return found
    return None


def resolve_collisions(
    codes: np.ndarray,
    distance_fn: DistanceFn,
    is_taken: TakenFn | None = None,
    branch: int = 8,
) -> Resolution:
    """Make every row of `codes` [n, L] a distinct tuple not `is_taken` by someone else.

    Rows keep their tuple when it is unique (and not taken); in a group of equal tuples the row
    nearest to the shared last-level code keeps it. Deterministic for a given input.
    """
    codes = np.asarray(codes, dtype=np.int64).copy()
    n, levels = codes.shape
    taken = is_taken or (lambda t: False)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tup in enumerate(map(tuple, codes.tolist())):
        groups.setdefault(tup, []).append(i)
    collisions_before = sum(len(g) for g in groups.values() if len(g) > 1)

    used: set[tuple[int, ...]] = set()
    movers: list[int] = []
    for tup, rows in groups.items():  # noqa: B007
        if taken(tup):
            movers.extend(rows)
            continue
        if len(rows) > 1:
            last = distance_fn(np.array(rows), codes[rows, : levels - 1])  # [g, N]
            own = last[np.arange(len(rows)), tup[-1]]
            keep = rows[int(np.argmin(own))]
            movers.extend(r for r in rows if r != keep)
        used.add(tup)

    def is_free(t: tuple[int, ...]) -> bool:
        return t not in used and not taken(t)

    def nearest_free(row: int, width: int | None) -> tuple[int, ...] | None:
        for keep_levels in range(levels - 1, -1, -1):
            prefix = tuple(codes[row, :keep_levels].tolist())
            new = _first_free(row, prefix, levels, distance_fn, is_free, width)
            if new is not None:
                return new
        return None

    for row in sorted(movers):
        new = nearest_free(row, branch)
        if new is None:  # the near subtrees are full: search all of the code space
            new = nearest_free(row, None)
        if new is None:
            raise CodeSpaceExhausted(
                f"no free identifier left for row {row}: the code space "
                f"({levels} levels) is exhausted; increase codebook_size or levels"
            )
        codes[row] = new
        used.add(new)
    return Resolution(
        codes=codes,
        moved=np.array(sorted(movers), dtype=np.int64),
        collisions_before=collisions_before,
    )


def append_extra_token(
    codes: np.ndarray, codebook_size: int, is_taken: TakenFn | None = None
) -> np.ndarray:
    """TIGER's scheme: keep every item's semantic codes and append one more code that numbers
    the items sharing them (0, 1, 2, ... in row order, skipping tuples `is_taken`).
    codes [n, L] -> [n, L + 1]."""
    codes = np.asarray(codes, dtype=np.int64)
    taken = is_taken or (lambda t: False)
    next_free: dict[tuple[int, ...], int] = {}
    extra = np.empty(len(codes), dtype=np.int64)
    for i, row in enumerate(map(tuple, codes.tolist())):
        c = next_free.get(row, 0)
        while c < codebook_size and taken((*row, c)):
            c += 1
        if c >= codebook_size:
            raise CodeSpaceExhausted(
                f"row {i}: more than {codebook_size} items share the codes {row}; "
                "the extra token cannot tell them apart"
            )
        extra[i] = c
        next_free[row] = c + 1
    return np.concatenate([codes, extra[:, None]], axis=1)
