"""Label smoothing over code levels (`lm.code_smoothing`): the loss worked out by hand, and a
trained model that keeps probability on a code it never saw as a target, which an item
tokenized after training needs."""

import numpy as np
import pytest
import torch

from models.recommender import RecommenderConfig
from models.repeat import identifier_log_probs
from models.vocab import CodeVocab
from training.lm import LMTrainConfig, level_index, lm_loss, train_lm


class Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
        return type("Out", (), {"logits": self.logits})()


def test_smoothed_loss_by_hand() -> None:
    """s mixes the mean negative log-probability of the level's tokens into the true token's
    cross-entropy; with distillation the smoothed cross-entropy is what distillation mixes."""
    vocab = CodeVocab(levels=1, codebook_size=2, history_items=1)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 1.0, 2.0], [0.0] * 5]])  # [1, 2, V=5]
    ids = torch.tensor([[1, 4]])  # bos, then code 1 of level 0 (token 4)
    mask = torch.ones_like(ids)
    index = level_index(vocab, 1)
    logp = torch.log_softmax(logits[0, 0], -1)
    model = Fixed(logits)
    smoothed = 0.9 * -logp[4] + 0.1 * -(logp[3] + logp[4]) / 2
    got = lm_loss(model, ids, mask, 1.0, 0, smooth=(0.1, index))
    assert torch.allclose(got, smoothed)
    assert torch.allclose(lm_loss(model, ids, mask, 1.0, 0, smooth=(0.0, index)), -logp[4])
    q = (torch.tensor([[[1.0, 0.0]]]), torch.tensor([[True]]), 0.5, index)  # teacher: code 0
    mixed = 0.5 * smoothed + 0.5 * -logp[3]
    assert torch.allclose(lm_loss(model, ids, mask, 1.0, 0, soft=q, smooth=(0.1, index)), mixed)


def test_smoothing_must_be_below_one() -> None:
    vocab = CodeVocab(levels=1, codebook_size=2, history_items=1)
    cfg = LMTrainConfig(code_smoothing=1.0, epochs=1)
    with pytest.raises(ValueError, match="code_smoothing"):
        train_lm([[0, 1]], [], np.array([[0], [1]]), vocab, cfg, progress=False)


def test_an_unseen_code_keeps_probability() -> None:
    """Warm items use codes 0-2 at the second level; code 3 is never a target. An item
    tokenized later as (0, 3) scores far below the warm items without smoothing, and within a
    few nats of them with it (a floor of about log(s / 4) at the unseen level)."""
    vocab = CodeVocab(levels=2, codebook_size=4, history_items=3)
    codes = np.array([[a, b] for a in range(4) for b in range(3)])  # 12 warm items
    rng = np.random.default_rng(0)
    train = [rng.integers(0, len(codes), 6).tolist() for _ in range(100)]
    everything = np.vstack([codes, [[0, 3]]])  # the new item is row 12
    history = [[1, 5, 7]]

    def gap(smoothing: float) -> tuple[float, float]:
        torch.manual_seed(0)
        cfg = LMTrainConfig(
            model=RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32, dropout=0.0),
            epochs=25,
            batch_size=32,
            lr=1e-2,
            window_items=3,
            eval_every=25,
            eval_users=1,
            beam_width=4,
            code_smoothing=smoothing,
        )
        model = train_lm(train, [([1], 2)], codes, vocab, cfg, progress=False).model
        prompts = [vocab.prompt(codes[h]) for h in history]
        lp = identifier_log_probs(model, prompts, everything[None], vocab)[0]
        return float(lp[12]), float(lp[:12].median())

    plain_new, plain_warm = gap(0.0)
    smooth_new, smooth_warm = gap(0.2)
    assert plain_warm - plain_new > 5  # the unseen code is pushed towards zero probability
    assert smooth_warm - smooth_new < 2.5
    assert smooth_new > np.log(0.2 / 4) + np.log(1 / 4) - 1.5
