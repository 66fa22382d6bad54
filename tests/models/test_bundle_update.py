"""Serving defaults written by stages that may run at once (fit-mode, the new-item protocol):
merged under a lock, each write atomic, nothing of the other's lost."""

from __future__ import annotations

import multiprocessing as mp

from models.bundle import Bundle, update_recommend
from tests.bundlefactory import make_tiny_bundle


def _writer(root: str, name: str, n: int) -> None:
    for i in range(n):
        update_recommend(root, {f"{name}{i}": i})


def test_concurrent_updates_keep_every_field(tmp_path) -> None:
    root = make_tiny_bundle(tmp_path / "b", 30, seed=0, with_lm=False)
    update_recommend(root, {"mode": "plain"})
    ctx = mp.get_context("fork")  # separate processes, as two stages are
    procs = [ctx.Process(target=_writer, args=(str(root), name, 25)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    recommend = Bundle.load(root).manifest.recommend
    assert recommend["mode"] == "plain"
    assert all(recommend[f"{name}{i}"] == i for name in ("a", "b") for i in range(25))
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_update_overrides_only_the_given_fields(tmp_path) -> None:
    root = make_tiny_bundle(tmp_path / "b", 30, seed=0, with_lm=False)
    update_recommend(root, {"mode": "repeat", "new_item_bonus": 2.0})
    merged = update_recommend(root, {"mode": "plain"})
    assert merged == {"mode": "plain", "new_item_bonus": 2.0}
    assert Bundle.load(root).manifest.recommend == merged
