import torch

from training.clustering import balanced_labels, kmeans


def test_balanced_labels_sizes_and_separation():
    gen = torch.Generator().manual_seed(0)
    # 4 well-separated blobs of 64 points: balanced k=4 must recover them exactly
    centers = torch.tensor([[10.0, 0], [-10, 0], [0, 10], [0, -10]])
    x = torch.cat([c + 0.1 * torch.randn(64, 2, generator=gen) for c in centers])
    labels = balanced_labels(x, 4)
    assert torch.bincount(labels).tolist() == [64, 64, 64, 64]
    for b in range(4):
        assert len(set(labels[b * 64 : (b + 1) * 64].tolist())) == 1


def test_balanced_labels_caps_cluster_size_on_skewed_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat(
        [torch.randn(200, 8, generator=gen) * 0.01, torch.randn(56, 8, generator=gen) + 5]
    )
    labels = balanced_labels(x, 10)
    assert torch.bincount(labels, minlength=10).max() <= 26  # ceil(256 / 10)


def test_kmeans_recovers_centres():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(50, 2, generator=gen) * 0.05 + 3, torch.randn(50, 2, generator=gen) * 0.05 - 3]
    )
    c, labels = kmeans(x, 2, generator=gen)
    assert sorted(c[:, 0].round().tolist()) == [-3.0, 3.0]
    assert len(set(labels[:50].tolist())) == 1 and len(set(labels[50:].tolist())) == 1
