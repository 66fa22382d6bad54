"""Data-parallel training (training.ddp) on 2 CPU processes against one process.

Dropout is off, so both train deterministically: the same global batches, the same gradient of
each batch's weighted mean loss (token weights, context items, distillation), hence the same
losses and weights up to float rounding. The data make the two ranks' shares of a batch weigh
differently (and leave rank 1 empty in the last batch), so that averaging per-rank mean losses,
instead of the batch's, would show.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from letterrec.cli import app
from models.bundle import Bundle, Catalogue, Manifest
from models.recommender import RecommenderConfig, build_model
from models.trie import ItemTrie
from models.vocab import CodeVocab
from service.engines.base import DecodeRequest
from service.engines.torch_engine import TorchEngine
from tests.llmbundle import write_dataset
from tests.lmfactory import random_catalogue
from training.config import PipelineConfig
from training.data import leave_one_out, load_dataset
from training.ddp import DataParallel, train_lm_parallel
from training.distill import Teacher
from training.lm import (
    LMTrainConfig,
    collate,
    context_flags,
    length_batches,
    lm_loss,
    recommend,
    repeat_flags,
    token_weights,
    train_lm,
    window_bounds,
    windows,
)

N_ITEMS = 30
VOCAB = CodeVocab(levels=2, codebook_size=8, history_items=5)
TINY = RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32, dropout=0.0)
RTOL, ATOL = 1e-4, 2e-5


def walks(n_users: int = 70, seed: int = 0) -> list[list[int]]:
    """Users walk the catalogue and now and then step back to an item they just saw (repeats,
    which `repeat_weight` weighs), with lengths 3 to 13 (windows of different lengths)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        seq = [int(rng.integers(N_ITEMS))]
        for _ in range(int(rng.integers(3, 14))):
            back = len(seq) > 2 and rng.random() < 0.2
            seq.append(seq[-2] if back else (seq[-1] + 1) % N_ITEMS)
        out.append(seq)
    return out


def random_teacher(train: list[list[int]], cfg: LMTrainConfig, seed: int = 0) -> Teacher:
    """A sparse teacher over the windows of `cfg`: 4 random items per position."""
    bounds = window_bounds(train, cfg.window_items, cfg.max_windows_per_user, cfg.context_items)
    sizes = [end - ctx for user in bounds for ctx, _, end in user]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, N_ITEMS, size=(offsets[-1], 4)).astype(np.int32)
    probs = rng.dirichlet(np.ones(4), size=offsets[-1]).astype(np.float32) * 0.8
    return Teacher(items, probs, offsets)


@pytest.fixture(scope="module")
def data():
    seqs = walks()
    train = [s[:-2] for s in seqs]
    valid = [(s[:-2][-5:], s[-2]) for s in seqs]
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=1)
    n_windows = len(windows(train, codes, VOCAB, 4, 0, 2))
    # A batch size that leaves one window for the last batch: rank 1 has nothing there.
    batch_size = next(b for b in range(16, 40) if n_windows % b == 1)
    cfg = LMTrainConfig(
        model=TINY,
        epochs=2,
        batch_size=batch_size,
        lr=1e-2,
        warmup=0.2,
        window_items=4,
        context_items=2,
        repeat_weight=3.0,
        distill=0.5,
        eval_every=1,
        eval_users=20,
        patience=5,
        beam_width=5,
    )
    return train, valid, codes, cfg, random_teacher(train, cfg)


def test_shares_weigh_differently_so_the_test_can_tell_wrong_averaging(data) -> None:
    # The batch's gradient is not the mean of the two shares' gradients on these data: a
    # data-parallel loss that averaged per-rank mean losses would take other steps, and miss
    # the single-process weights by far more than the tolerance of the comparison below.
    train, _, codes, cfg, _ = data
    win_args = (cfg.window_items, 0, cfg.context_items)
    wins = windows(train, codes, VOCAB, *win_args)
    flags, ctx = repeat_flags(train, *win_args), context_flags(train, *win_args)
    tok_w = [
        token_weights(f, VOCAB.levels, cfg.repeat_weight, c)
        for f, c in zip(flags, ctx, strict=True)
    ]
    lengths = np.array([len(w) for w in wins])
    batches = length_batches(lengths, cfg.batch_size, np.random.default_rng(cfg.seed))
    idx = max(batches, key=len)
    model = build_model(TINY, VOCAB, cfg.seed)

    def grad(rows: np.ndarray) -> torch.Tensor:
        ids, mask = collate([wins[i] for i in rows], VOCAB.pad_id)
        w = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for r, i in enumerate(rows):
            w[r, : len(tok_w[i])] = torch.from_numpy(tok_w[i])
        model.zero_grad()
        lm_loss(model, ids, mask, cfg.tau, VOCAB.pad_id, w).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    halves = [DataParallel(r, 2, torch.device("cpu")).share(idx)[0] for r in (0, 1)]
    assert sorted(np.concatenate(halves).tolist()) == sorted(idx.tolist())
    right = grad(idx)
    naive = (grad(halves[0]) + grad(halves[1])) / 2
    assert (naive - right).norm() > 100 * RTOL * right.norm()


@pytest.mark.slow
def test_two_processes_resume_and_train_as_one(data, tmp_path: Path) -> None:
    train, valid, codes, cfg, teacher = data
    one = train_lm(train, valid, codes, VOCAB, cfg, progress=False, teacher=teacher)
    # An interrupted single-process run (patience 0 stops it after epoch 1, checkpoint
    # written), resumed and finished on two processes.
    ckpt = tmp_path / "lm_checkpoint.pt"
    cut = dataclasses.replace(cfg, patience=0)
    first = train_lm(train, valid, codes, VOCAB, cut, ckpt, progress=False, teacher=teacher)
    assert first.epochs == 1
    two = train_lm_parallel(
        train, valid, codes, VOCAB, dataclasses.replace(cfg, nproc=2), ckpt, False, teacher
    )
    assert two.epochs == one.epochs == 2
    for a, b in zip(one.history, two.history, strict=True):
        assert a.keys() == b.keys()
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL, abs=ATOL)
        assert b["valid_ndcg@10"] == pytest.approx(a["valid_ndcg@10"], abs=1e-6)
    sd1, sd2 = one.model.state_dict(), two.model.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        torch.testing.assert_close(sd2[k], sd1[k], rtol=RTOL, atol=ATOL, msg=k)
    assert two.tokens_per_s > 0
    # Rank 0's checkpoint holds the finished run: one process resumes it as is.
    again = train_lm(train, valid, codes, VOCAB, cfg, ckpt, progress=False, teacher=teacher)
    assert again.history == two.history
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, sd2[k], rtol=0, atol=0)


def test_bad_nproc_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lm.nproc must be >= 1"):
        LMTrainConfig(nproc=0)
    with pytest.raises(ValueError, match=r"llm recommender \(LoRA\) trains in one process"):
        PipelineConfig(recommender="llm").with_nproc(2)
    res = CliRunner().invoke(app, ["train-lm", "--nproc", "0"])
    assert res.exit_code == 2
    assert "--nproc" in res.output


@pytest.mark.slow
def test_train_lm_with_two_processes_writes_a_bundle_that_serves(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", n_users=40)
    ds = load_dataset(str(data))
    vocab = CodeVocab(levels=3, codebook_size=8, history_items=5)
    codes = random_catalogue(ds.n_items, vocab.levels, vocab.codebook_size, seed=2)
    out = tmp_path / "bundle"
    catalogue = Catalogue(ds.item_ids, codes, [str(it.get("title", "")) for it in ds.items])
    Bundle(out, Manifest(vocab=vocab, config={}, data=ds.summary()), catalogue).save()
    lm = LMTrainConfig(
        model=TINY, epochs=2, batch_size=16, eval_every=2, eval_users=20, beam_width=5
    )
    experiment = tmp_path / "experiment.json"
    experiment.write_text(json.dumps({"max_history": 5, "lm": lm.to_dict()}))
    args = ["train-lm", "--data", str(data), "--out", str(out), "--config", str(experiment)]
    res = CliRunner().invoke(app, [*args, "--device", "cpu", "--quiet", "--nproc", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report" / "lm.json").read_text())
    assert report["epochs"] == 2 and "valid_ndcg@10" in report["history"][-1]
    bundle = Bundle.load(out)
    assert bundle.has_lm()
    saved = json.loads((bundle.lm_dir / "letterrec.json").read_text())
    assert saved["train"]["nproc"] == 2
    # The saved lm/ serves: the service's engine answers as training's own beam search does.
    histories = [h for h, _ in leave_one_out(ds, 5).test[:8]]
    trie = ItemTrie.from_codes(bundle.catalogue.codes, vocab.codebook_size)
    engine = TorchEngine(bundle.lm_dir, vocab, beam_width=5)
    got = engine.recommend(
        [DecodeRequest(vocab.prompt(bundle.catalogue.codes[h]), k=5) for h in histories], trie
    )
    from models.recommender import load_lm

    want = recommend(load_lm(bundle.lm_dir), histories, bundle.catalogue.codes, vocab, trie, 5, 5)
    assert [[r.item_index for r in recs] for recs in got] == want
