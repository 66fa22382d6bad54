"""benchmarks/dtype_agreement.py: agreement, paired quality and speed rows on a tiny bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import dtype_agreement
from models.bundle import Bundle
from tests.bundlefactory import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", n_items=120, seed=0)


def run(bundle: Path, out: Path, dtypes: str, users, monkeypatch) -> dict:  # noqa: ANN001
    monkeypatch.setattr(dtype_agreement, "validation_users", lambda _b, n: users[:n])
    argv = ["x", "--bundle", str(bundle), "--users", "24", "--batch", "8", "--beam", "10"]
    monkeypatch.setattr(sys, "argv", [*argv, "--dtypes", dtypes, "--results", str(out)])
    dtype_agreement.main()
    return json.loads((out / "dtype-agreement-tiny.json").read_text())


def test_same_dtype_agrees_fully_and_recall_counts_targets(bundle: Path, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n = len(Bundle.load(bundle).catalogue)
    histories = [rng.choice(n, size=5, replace=False).tolist() for _ in range(24)]
    # First pass with arbitrary targets to learn each user's float32 top item...
    first = run(bundle, tmp_path / "a", "float32", [(h, 0) for h in histories], monkeypatch)
    assert first["rows"][0]["users"] == 24
    # ...then targets chosen so that exactly half the users hit at rank 1.
    from models.trie import ItemTrie
    from service.engines.base import DecodeRequest
    from service.engines.torch_engine import TorchEngine

    b = Bundle.load(bundle)
    engine = TorchEngine(b.lm_dir, b.vocab, beam_width=10)
    trie = ItemTrie.from_codes(b.catalogue.codes, b.vocab.codebook_size)
    top = engine.recommend(
        [DecodeRequest(b.vocab.prompt(b.catalogue.codes[h]), k=10) for h in histories], trie
    )
    users = [
        (h, recs[0].item_index if i % 2 == 0 else -1)
        for i, (h, recs) in enumerate(zip(histories, top, strict=True))
    ]
    out = run(bundle, tmp_path / "b", "float32,float32", users, monkeypatch)
    base, other = out["rows"]
    assert base["recall@10"] == pytest.approx(0.5) and base["ndcg@10"] == pytest.approx(0.5)
    assert other["identical_lists"] == 1.0 and other["overlap@10"] == 1.0
    assert other["recall@10_diff"] == 0.0 and other["recall@10_verdict"] == "within noise"
    assert {"command", "commit", "machine", "model_profile", "cpu_flags"} <= set(out)
    assert "| float32 |" in (tmp_path / "b" / "dtype-agreement-tiny.md").read_text()
