import torch

from models.sasrec import SASRec, SASRecConfig


def test_prediction_does_not_depend_on_padding_length():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=30, dim=16, max_len=12, dropout=0.0)).eval()
    hist = torch.tensor([[5, 9, 2]])
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), hist], 1)
    assert torch.allclose(model.full_sort_predict(hist), model.full_sort_predict(padded), atol=1e-5)


def test_loss_ignores_padding_targets_and_learns():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=10, dim=16, max_len=6, dropout=0.0))
    seq = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])
    tgt = torch.tensor([[0, 2, 3, 4], [0, 0, 5, 6]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.calculate_loss(seq, tgt).item()
    for _ in range(100):
        loss = model.calculate_loss(seq, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 5
    scores = model.eval().full_sort_predict(seq)
    assert scores.argmax(-1).tolist() == [3, 5]  # rows 4 and 6, 0-based item rows 3 and 5


def test_sampled_softmax_equals_full_softmax_when_negatives_are_all_other_items():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=6, dim=8, max_len=4, dropout=0.0)).eval()
    seq = torch.tensor([[0, 1, 2, 3]])
    tgt = torch.tensor([[0, 2, 3, 4]])
    full = model.calculate_loss(seq, tgt)
    # every item as a negative: the target's own column is masked, the rest is the full softmax
    sampled = model.calculate_loss(seq, tgt, negatives=torch.arange(6))
    assert torch.allclose(full, sampled, atol=1e-6)
    fewer = model.calculate_loss(seq, tgt, negatives=torch.tensor([0, 5]))
    assert fewer < full  # fewer negatives, smaller partition function


def test_evaluate_reports_repeats_of_its_own_top10() -> None:
    # The repeat breakdown uses SASRec's own top-10 lists: recomputed here from the scores.
    from training.cf import evaluate
    from training.metrics import repeats

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=40, dim=16, max_len=8, dropout=0.0)).eval()
    pairs = [([1, 2, 3], 2), ([4, 5], 6), ([7, 8, 9, 7], 30), ([11], 11)]
    out = evaluate(model, pairs, batch=3)  # two batches
    top = []
    for h, _ in pairs:
        scores = model.full_sort_predict(torch.tensor([[x + 1 for x in h]]))
        top.append(scores[0].topk(10).indices.tolist())
    want = repeats(top, pairs)
    assert want["repeat_targets"] == 0.5
    for key, value in want.items():
        assert out[key] == value, key
