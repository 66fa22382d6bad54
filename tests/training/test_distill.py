"""Distillation from SASRec through code prefixes: the mapping worked out by hand, the teacher's
alignment with the training windows, and a student that learns what only the teacher knows."""

import numpy as np
import pytest
import torch

from models.recommender import RecommenderConfig
from models.sasrec import SASRec, SASRecConfig
from models.vocab import CodeVocab
from training.distill import code_targets, load_sasrec, save_sasrec, teacher_topk
from training.lm import (
    LMTrainConfig,
    level_index,
    lm_loss,
    train_lm,
    window_bounds,
    windows,
)


def test_code_targets_by_hand() -> None:
    # Catalogue of 4 items, 2 levels, 3 codes per level.
    codes = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 2]])
    items = torch.tensor([[1, 2, 3, 0]])  # teacher's top 4 for one target
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    target = torch.tensor([[0, 1]])  # the true item is item 0
    q, has = code_targets(items, probs, target, codes, 3)
    # Level 0: every teacher item counts: code 0 <- items 1, 0 (0.4 + 0.1); code 1 <- item 2
    # (0.3); code 2 <- item 3 (0.2).
    assert torch.allclose(q[0, 0], torch.tensor([0.5, 0.3, 0.2]))
    # Level 1: only items whose first code is 0 (items 1 and 0): code 2 <- 0.4, code 1 <- 0.1.
    assert torch.allclose(q[0, 1], torch.tensor([0.0, 0.2, 0.8]))
    assert has.tolist() == [[True, True]]


def test_code_targets_without_a_shared_prefix_has_nothing() -> None:
    codes = torch.tensor([[0, 1], [1, 2]])
    q, has = code_targets(
        torch.tensor([[1]]), torch.tensor([[1.0]]), torch.tensor([[0, 1]]), codes, 3
    )
    assert has.tolist() == [[True, False]]
    assert q[0, 1].sum() == 0


def test_distillation_loss_by_hand() -> None:
    """weight 1 with q one-hot on the true code is the plain cross-entropy; weight 0.5 with a
    uniform q mixes in the mean negative log-probability of the level's tokens."""
    vocab = CodeVocab(levels=1, codebook_size=2, history_items=1)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 1.0, 2.0], [0.0] * 5]])  # [1, 2, V=5]

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return type("Out", (), {"logits": logits})()

    ids = torch.tensor([[1, 4]])  # bos, then code 1 of level 0 (token 4)
    mask = torch.ones_like(ids)
    index = level_index(vocab, 1)
    assert index.tolist() == [[3, 4]]
    logp = torch.log_softmax(logits[0, 0], -1)
    plain = lm_loss(Fixed(), ids, mask, 1.0, 0)
    onehot = (torch.tensor([[[0.0, 1.0]]]), torch.tensor([[True]]), 1.0, index)
    assert torch.allclose(lm_loss(Fixed(), ids, mask, 1.0, 0, soft=onehot), plain)
    uniform = (torch.tensor([[[0.5, 0.5]]]), torch.tensor([[True]]), 0.5, index)
    want = 0.5 * -logp[4] + 0.5 * -(logp[3] + logp[4]) / 2
    assert torch.allclose(lm_loss(Fixed(), ids, mask, 1.0, 0, soft=uniform), want)
    off = (torch.tensor([[[0.5, 0.5]]]), torch.tensor([[False]]), 0.5, index)
    assert torch.allclose(lm_loss(Fixed(), ids, mask, 1.0, 0, soft=off), plain)


def test_teacher_rows_follow_the_windows(tmp_path) -> None:
    torch.manual_seed(0)
    train = [[0, 1, 2, 3, 4, 5, 6], [3, 2], [5]]
    model = SASRec(SASRecConfig(n_items=7, dim=8, layers=1, heads=1, max_len=4, dropout=0.0))
    save_sasrec(model, tmp_path / "sasrec.pt")
    model = load_sasrec(tmp_path / "sasrec.pt")
    bounds = window_bounds(train, 3, 0, 2)
    teacher = teacher_topk(model, train, bounds, history_items=3, top_k=4)
    vocab = CodeVocab(levels=1, codebook_size=7, history_items=3)
    wins = windows(train, np.arange(7)[:, None], vocab, 3, 0, 2)
    assert len(teacher.offsets) == len(wins) + 1
    for w, win in enumerate(wins):
        assert teacher.offsets[w + 1] - teacher.offsets[w] == len(win) - 1
    # User 0's last window: context items 2, 3 (no teacher), targets 4, 5, 6.
    items, probs = teacher.window(0)
    assert (probs[:2] == 0).all() and (probs[2:] > 0).all()
    seq = torch.tensor([[4, 5, 6]])  # history of the target 6: items 3, 4, 5 (row + 1)
    full = model.full_sort_predict(seq).softmax(-1)[0]
    top = full.topk(4)
    assert items[4].tolist() == top.indices.tolist()
    assert np.allclose(probs[4], top.values.numpy(), atol=1e-6)
    # A user's first item has no history: no teacher.
    first = teacher.window(len(wins) - 1)[1]
    assert (first[0] == 0).all()


def test_missing_teacher_says_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="rerun the cf stage"):
        load_sasrec(tmp_path / "sasrec.pt")


def test_student_learns_what_only_the_teacher_knows() -> None:
    """Training targets are random; the teacher knows the rule (item i -> i + 1). With the
    teacher only (distill = 1) the student learns the rule; without it, it cannot."""
    n = 12
    vocab = CodeVocab(levels=2, codebook_size=4, history_items=3)
    codes = np.array([[i // 4, i % 4] for i in range(n)])
    rng = np.random.default_rng(0)
    train = [rng.integers(0, n, 6).tolist() for _ in range(200)]

    class RuleTeacher(SASRec):
        def full_sort_predict(self, seq: torch.Tensor) -> torch.Tensor:
            nxt = (seq[:, -1] - 1 + 1) % n  # row of the last item + 1
            return torch.nn.functional.one_hot(nxt, n).float() * 50

    teacher_model = RuleTeacher(SASRecConfig(n_items=n, dim=4, layers=1, heads=1, max_len=3))
    bounds = window_bounds(train, 3)
    teacher = teacher_topk(teacher_model, train, bounds, history_items=3, top_k=3)
    valid = [([i], (i + 1) % n) for i in range(n)]

    def fit(distill: float) -> float:
        cfg = LMTrainConfig(
            model=RecommenderConfig(hidden=32, layers=2, heads=2, intermediate=64, dropout=0.0),
            epochs=30,
            batch_size=32,
            lr=5e-3,
            window_items=3,
            eval_every=30,
            eval_users=n,
            beam_width=4,
            distill=distill,
        )
        res = train_lm(train, valid, codes, vocab, cfg, progress=False, teacher=teacher)
        return res.valid["ndcg@5"]

    assert fit(1.0) > 0.9
    assert fit(0.0) < 0.6
