"""SASRec training on the leave-one-out training split: the CF embeddings for the tokenizer's
alignment loss and the first baseline (full-ranking Recall/NDCG on validation and test)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.sasrec import SASRec, SASRecConfig
from training.data import Split
from training.metrics import repeats, standard_errors, summarize, target_ranks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CFTrainConfig:
    dim: int = 32
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    negatives: int = 2048
    """Sampled-softmax negatives per batch on catalogues larger than 4x this (0 = always the
    full softmax). Full softmax over Yelp's 20k items dominates SASRec's training time."""
    patience: int = 3
    """Stop after this many epochs without a better validation NDCG@10."""
    eval_every: int = 2
    seed: int = 0
    device: str = "cpu"


@dataclass
class CFResult:
    embeddings: np.ndarray  # [n_items, dim]
    valid: dict[str, float]
    test: dict[str, float]
    epochs: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    model: SASRec | None = None
    """The trained model (best validation state), the recommender's distillation teacher."""


def left_pad(seqs: list[list[int]], length: int, shift: int = 1) -> torch.Tensor:
    """Rows + `shift` (0 stays padding), cut to the last `length`, left-padded with 0."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[i, length - len(s) :] = torch.tensor(s) + shift
    return out


def _training_windows(
    train: list[list[int]], max_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Inputs and next-item targets; sequences longer than max_len + 1 are cut into several
    windows so no interaction is wasted."""
    inputs, targets = [], []
    for s in train:
        if len(s) < 2:
            continue
        for end in range(len(s), 1, -max_len):
            chunk = s[max(0, end - max_len - 1) : end]
            inputs.append(chunk[:-1])
            targets.append(chunk[1:])
    return inputs, targets


def _length_batches(lengths: np.ndarray, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length windows: padding only to the batch's longest."""
    noise = torch.rand(len(lengths), generator=gen).numpy()
    order = np.lexsort((noise, lengths))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


@torch.no_grad()
def evaluate(
    model: SASRec,
    pairs: list[tuple[list[int], int]],
    batch: int = 512,
    with_se: bool = False,
    history_items: int | None = None,
) -> dict[str, float]:
    """Full-ranking metrics (and their bootstrap standard errors with `with_se`), seeing at
    most `history_items` (default: the model's max_len) of each history."""
    model.eval()
    device = next(model.parameters()).device
    ranks, top = [], []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        cap = min(model.config.max_len, history_items or model.config.max_len)
        length = max(1, min(cap, max(len(h) for h, _ in chunk)))
        seq = left_pad([h for h, _ in chunk], length).to(device)
        scores = model.full_sort_predict(seq).float()
        top.extend(scores.topk(min(10, scores.shape[1]), dim=1).indices.tolist())
        ranks.append(target_ranks(scores.cpu().numpy(), np.array([t for _, t in chunk])))
    all_ranks = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    out = summarize(all_ranks) | (standard_errors(all_ranks) if with_se else {})
    return out | repeats(top, pairs) if pairs else out


def train_sasrec(split: Split, n_items: int, cfg: CFTrainConfig, progress: bool = True) -> CFResult:
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    mcfg = SASRecConfig(n_items, cfg.dim, cfg.layers, cfg.heads, cfg.max_len, cfg.dropout)
    model = SASRec(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    inputs, targets = _training_windows(split.train, cfg.max_len)
    lengths = np.array([len(x) for x in inputs])
    sampled = cfg.negatives > 0 and 4 * cfg.negatives < n_items

    def sample() -> torch.Tensor | None:
        if not sampled:
            return None
        return torch.randint(n_items, (cfg.negatives,), generator=gen).to(device)

    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, bad, history = -1.0, None, 0, []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="SASRec", unit="epoch", disable=not progress)
    epoch = 0
    for epoch in bar:
        model.train()
        total = 0.0
        for idx in _length_batches(lengths, cfg.batch_size, gen):
            length = int(lengths[idx].max())
            seq = left_pad([inputs[i] for i in idx], length).to(device)
            tgt = left_pad([targets[i] for i in idx], length).to(device)
            loss = model.calculate_loss(seq, tgt, sample())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch + 1, "loss": total / max(1, len(inputs))}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row.update({f"valid_{k}": v for k, v in evaluate(model, split.valid).items()})
            score = row["valid_ndcg@10"]
            if score > best:
                best, bad = score, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ndcg10=f"{max(best, 0):.4f}")
        if bad >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    valid, test = evaluate(model, split.valid), evaluate(model, split.test)
    seconds = time.perf_counter() - t0
    log.info("SASRec: %d epochs in %.0f s; test %s", epoch + 1, seconds, test)
    emb = model.item_embeddings().detach().float().cpu().numpy().copy()
    return CFResult(emb, valid, test, epoch + 1, seconds, asdict(cfg), history, model.eval())
