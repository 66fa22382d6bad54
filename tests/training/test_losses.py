import math

import pytest
import torch

from training.losses import cf_alignment_loss, diversity_loss, sample_positives

E = math.e


def test_cf_alignment_value_and_gradient_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    cf = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = cf_alignment_loss(z, cf)
    # logits = I; each row: -log(e / (e + 1))
    assert loss.item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)
    loss.backward()
    g = 1 / (E + 1) / 2  # (p - onehot) / B projected on cf
    assert torch.allclose(z.grad, torch.tensor([[-g, g], [g, -g]]), atol=1e-6)


def test_cf_alignment_prefers_matching_pairs():
    cf = torch.randn(8, 4)
    assert cf_alignment_loss(cf * 5, cf) < cf_alignment_loss(cf.roll(1, 0) * 5, cf)


def test_diversity_loss_masks_own_code_and_targets_positive():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    codes = torch.tensor([0])
    positives = torch.tensor([2])
    loss = diversity_loss(codebook[codes], codes, positives, codebook)
    # logits [1, 0, 1] with code 0 masked -> softmax over {1: 0, 2: 1}
    assert loss.item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)
    loss.backward()
    # d/d(anchor) = sum_j (p_j - y_j) e_j = p1 * e1 + (p2 - 1) * e2 ; flows into row 0 of the codebook
    p1, p2 = 1 / (1 + E), E / (1 + E)
    anchor_grad = p1 * torch.tensor([0.0, 1.0]) + (p2 - 1) * torch.tensor([1.0, 1.0])
    # row 0 also appears as a (masked) key: no gradient from that path
    assert torch.allclose(codebook.grad[0], anchor_grad, atol=1e-6)
    # keys get p_j * anchor (for j = 1) and (p_2 - 1) * anchor (for j = 2)
    assert torch.allclose(codebook.grad[1], p1 * torch.tensor([1.0, 0.0]), atol=1e-6)
    assert torch.allclose(codebook.grad[2], (p2 - 1) * torch.tensor([1.0, 0.0]), atol=1e-6)


def test_sample_positives_same_cluster_never_self():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    gen = torch.Generator().manual_seed(0)
    codes = torch.tensor([0, 1, 2, 3, 4] * 50)
    pos = sample_positives(codes, labels, gen)
    assert (labels[pos] == labels[codes]).all()
    assert (pos != codes).all()
    # every other member of a 3-cluster gets sampled
    assert set(pos[codes == 2].tolist()) == {3, 4}
    # a singleton cluster returns itself
    assert sample_positives(torch.tensor([5]), labels, gen).tolist() == [5]
