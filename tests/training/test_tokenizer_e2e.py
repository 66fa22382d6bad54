"""The LETTER tokenizer end to end on a small real subset (ml-100k items, real MiniLM)."""

import dataclasses

import numpy as np
import pytest

from models.item_tokenizer import ItemTokenizer, TextTemplate
from tests.bundlefactory import shared_encoder
from training.cf import CFTrainConfig, train_sasrec
from training.data import leave_one_out, load_dataset
from training.embed import embed_texts, item_texts
from training.tokenizer import TokenizerTrainConfig, train_tokenizer
from training.tokenizer_report import level_stats, tokenizer_report

N_ITEMS = 400


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    ds = load_dataset("ml-100k")
    keep = set(range(N_ITEMS))
    seqs = [[i for i in s if i in keep] for s in ds.sequences]
    ds = dataclasses.replace(ds, sequences=seqs)
    texts, _ = item_texts(ds, TextTemplate())
    emb, _ = embed_texts(
        texts[:N_ITEMS],
        shared_encoder(),
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
    )
    split = leave_one_out(ds)
    cf = train_sasrec(
        split, N_ITEMS, CFTrainConfig(epochs=2, eval_every=1, patience=1), progress=False
    )
    return ds, emb, cf.embeddings


@pytest.fixture(scope="module")
def trained(subset):
    _, emb, cf = subset
    cfg = TokenizerTrainConfig(
        levels=3,
        codebook_size=16,
        epochs=30,
        batch_size=128,
        alpha=1e-2,
        beta=1e-2,
        recluster_every=5,
    )
    return train_tokenizer(emb, cf, cfg, progress=False)


def test_codes_unique_and_codebooks_used(trained):
    codes = trained.codes
    assert codes.shape == (N_ITEMS, 3)
    assert len({tuple(r) for r in codes.tolist()}) == N_ITEMS
    stats = level_stats(codes, 16)
    assert stats[0]["used"] >= 14  # dead-code restarts keep the first level busy
    # rows that did not collide keep their greedy codes
    same = (codes == trained.greedy_codes).all(1)
    assert same.sum() == N_ITEMS - len(trained.resolution.moved)


def test_report_fields(subset, trained):
    _, emb, cf = subset
    rep = tokenizer_report(
        trained.tokenizer, emb, trained.codes, trained.greedy_codes, trained.resolution.moved, cf
    )
    assert rep["unique_ids"] == N_ITEMS
    assert 0.0 <= rep["cf_code_overlap"] <= 1.0
    assert 1.0 <= rep["latent_effective_rank"] <= rep["latent_dim"]
    assert [lv["level"] for lv in rep["levels"]] == [0, 1, 2]
    assert rep["collisions"]["items_moved"] == len(trained.resolution.moved)


def test_save_load_roundtrip_and_new_item_is_deterministic(tmp_path, subset, trained):
    _, emb, _ = subset
    tok = trained.tokenizer
    tok.save(tmp_path / "tok")
    loaded = ItemTokenizer.load(tmp_path / "tok", encoder=shared_encoder())
    assert np.array_equal(loaded.encode_embeddings(emb), tok.encode_embeddings(emb))
    taken = {tuple(r) for r in trained.codes.tolist()}
    item = {
        "item_id": "new-1",
        "title": "A brand new movie",
        "description": "class: Sci-Fi Thriller",
    }
    a = loaded.encode([item], is_taken=lambda t: t in taken)
    b = ItemTokenizer.load(tmp_path / "tok", encoder=shared_encoder()).encode(
        [item], is_taken=lambda t: t in taken
    )
    assert np.array_equal(a, b)
    assert tuple(a[0]) not in taken


def test_extra_token_scheme_adds_a_level_and_keeps_semantic_codes(subset):
    _, emb, cf = subset
    cfg = TokenizerTrainConfig(
        levels=3, codebook_size=16, epochs=30, batch_size=128, uniqueness="extra_token"
    )
    res = train_tokenizer(emb, cf, cfg, progress=False)
    assert res.codes.shape == (N_ITEMS, 4) and res.tokenizer.levels == 4
    assert len({tuple(r) for r in res.codes.tolist()}) == N_ITEMS
    semantic = res.tokenizer.model.codes(res.tokenizer.prepare(emb)).numpy()
    assert np.array_equal(res.codes[:, :3], semantic)
    taken = {tuple(r) for r in res.codes.tolist()}
    new = res.tokenizer.encode_embeddings(emb[:1], is_taken=lambda t: t in taken)
    assert new[0, :3].tolist() == res.codes[0, :3].tolist() and tuple(new[0]) not in taken
