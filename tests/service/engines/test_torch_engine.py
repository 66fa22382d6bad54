"""TorchEngine and the engine registry, on a real tiny Llama saved to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from models.beam import beam_search
from models.decoders import make_decoder
from models.trie import ItemTrie
from models.vocab import CodeVocab
from service.engines import ENGINES, load_engine_class
from service.engines.base import DecodeEngine, DecodeRequest, Recommendation
from service.engines.torch_engine import TorchEngine
from tests.lmfactory import make_tiny_llama, random_catalogue

VOCAB = CodeVocab(levels=3, codebook_size=16, history_items=20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(VOCAB, tmp_path_factory.mktemp("lm"), seed=1)


@pytest.fixture(scope="module")
def catalogue() -> np.ndarray:
    return random_catalogue(600, VOCAB.levels, VOCAB.codebook_size, seed=1)


@pytest.fixture(scope="module")
def engine(model_dir) -> TorchEngine:
    return TorchEngine(model_dir, VOCAB, beam_width=10, max_batch=4)


def requests_for(catalogue: np.ndarray, n: int, seed: int = 0) -> list[DecodeRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hist = rng.integers(0, len(catalogue), size=int(rng.integers(0, 22))).tolist()
        out.append(
            DecodeRequest(VOCAB.prompt(catalogue[hist]), k=1 + i % 6, exclude=frozenset(hist))
        )
    return out


def test_registry_is_an_explicit_dict_and_loads_lazily():
    assert ENGINES == {
        "torch": "service.engines.torch_engine:TorchEngine",
        "vllm": "service.engines.vllm_engine:VllmEngine",
    }
    cls = load_engine_class("torch")
    assert cls is TorchEngine and issubclass(cls, DecodeEngine)
    with pytest.raises(
        ValueError, match=r"unknown decoding engine 'tensorrt'.*\['torch', 'vllm'\]"
    ):
        load_engine_class("tensorrt")


def test_recommend_equals_beam_search_across_batches(engine, model_dir, catalogue):
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    reqs = requests_for(catalogue, 11)  # three batches of at most 4
    got = engine.recommend(reqs, trie)
    assert len(got) == len(reqs)
    # One batch through the readable shared-prefix decoder on a freshly loaded model.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    whole = beam_search(
        make_decoder(model, "shared"),
        [r.prompt for r in reqs],
        trie,
        VOCAB,
        beam_width=10,
        k=6,
        excludes=[r.exclude for r in reqs],
    )
    for b, (r, recs) in enumerate(zip(reqs, got, strict=True)):
        assert len(recs) == r.k
        assert all(isinstance(x, Recommendation) for x in recs)
        assert [x.item_index for x in recs] == whole.items[b, : r.k].tolist()
        np.testing.assert_allclose([x.score for x in recs], whole.scores[b, : r.k], atol=1e-5)
        assert not {x.item_index for x in recs} & r.exclude
        assert [x.score for x in recs] == sorted((x.score for x in recs), reverse=True)


def test_k_above_beam_width(engine, catalogue):
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    (recs,) = engine.recommend([DecodeRequest([VOCAB.bos_id], k=25)], trie)
    assert len({r.item_index for r in recs}) == 25


def test_fewer_items_than_k(engine):
    trie = ItemTrie.from_codes(np.array([[1, 2, 3], [4, 5, 6]]), VOCAB.codebook_size)
    (recs,) = engine.recommend([DecodeRequest([VOCAB.bos_id], k=5)], trie)
    assert sorted(r.item_index for r in recs) == [0, 1]
    (none,) = engine.recommend(
        [DecodeRequest([VOCAB.bos_id], k=5, exclude=frozenset({0, 1}))], trie
    )
    assert none == []
    assert engine.recommend([], trie) == []


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (DecodeRequest([1, 9999], k=1), r"request 0: prompt tokens must be in 0\.\.50"),
        (DecodeRequest([], k=1), "request 0: prompt has 0 tokens"),
        (DecodeRequest([1], k=0), "request 0: k must be >= 1"),
        (DecodeRequest([1] * 200, k=1), "prompt has 200 tokens"),
    ],
)
def test_bad_requests_are_rejected(engine, catalogue, request_, match):
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    with pytest.raises(ValueError, match=match):
        engine.recommend([request_], trie)


def test_bad_construction(model_dir):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        TorchEngine(model_dir, VOCAB, dtype="float8")
    with pytest.raises(ValueError, match="needs 1027"):
        TorchEngine(model_dir, CodeVocab(levels=4, codebook_size=256))


def test_bfloat16_engine_returns_valid_items(model_dir, catalogue):
    eng = TorchEngine(model_dir, VOCAB, dtype="bfloat16", beam_width=10)
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    eng.warmup(trie)
    reqs = requests_for(catalogue, 6, seed=3)
    for r, recs in zip(reqs, eng.recommend(reqs, trie), strict=True):
        assert len(recs) == r.k and all(np.isfinite(x.score) and x.score < 0 for x in recs)
        assert all(trie.is_active(x.item_index) for x in recs)
    eng.close()
