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
