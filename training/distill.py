"""Distillation from SASRec into the generative recommender, through the code prefixes.

SASRec scores whole items; the recommender predicts an identifier one code at a time. The
teacher's item distribution p(i | history) maps exactly onto the recommender's factorisation:
at level l, given the true target's first l codes, the teacher's conditional distribution over
the next code is

    q_l(c) = sum of p(i) over items i whose first l codes equal the target's and whose code at
             level l is c, normalised over c.

Training with teacher forcing then mixes, per code token, the usual cross-entropy on the true
code with the cross-entropy against q_l (`lm.distill` is the mixing weight). The teacher is
used in training only; the served model is the plain recommender.

To keep this cheap the teacher's distribution is kept sparse: for every training target, the
`top_k` items with the highest SASRec probability (probabilities over the whole catalogue, not
renormalised), computed once before training. Computing q_l for a batch is then a gather and a
scatter over k items instead of the catalogue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.sasrec import SASRec, SASRecConfig
from training.cf import left_pad

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """Sparse SASRec distributions for every item of every training window (context items and
    users' first items, which have no history, get zero probabilities)."""

    items: np.ndarray
    """[positions, top_k] int32: item rows, highest probability first."""
    probs: np.ndarray
    """[positions, top_k] float32: their probabilities under the teacher."""
    offsets: np.ndarray
    """[windows + 1]: window w's items are rows offsets[w]:offsets[w + 1]."""

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[w], self.offsets[w + 1]
        return self.items[s:e], self.probs[s:e]


def save_sasrec(model: SASRec, path: Path) -> None:
    torch.save({"config": model.config.to_dict(), "state": model.state_dict()}, path)


def load_sasrec(path: Path, device: str = "cpu") -> SASRec:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no saved SASRec, which lm.distill > 0 needs as its teacher; rerun the cf"
            " stage (letterrec cf --force, same --out) or set lm.distill to 0"
        )
    saved = torch.load(path, map_location=device, weights_only=False)
    model = SASRec(SASRecConfig(**saved["config"])).to(device)
    model.load_state_dict(saved["state"])
    return model.eval()


@torch.no_grad()
def teacher_topk(
    model: SASRec,
    train: list[list[int]],
    bounds: list[list[tuple[int, int, int]]],
    history_items: int,
    top_k: int,
    temperature: float = 1.0,
    batch_size: int = 1024,
    progress: bool = False,
) -> Teacher:
    """The teacher for every window given by `bounds` (per user, the (context start, target
    start, end) triples of `training.lm._bounds`, in the order of `training.lm.windows`): for
    each target item at position g, SASRec's top-k items given the user's items
    g - history_items .. g - 1."""
    model.eval()
    device = next(model.parameters()).device
    n_items = model.config.n_items
    top_k = min(top_k, n_items)
    offsets = [0]
    queries: list[tuple[int, int, int]] = []  # (row in the output, user, position)
    for u, user_bounds in enumerate(bounds):
        for ctx, start, end in user_bounds:
            base = offsets[-1]
            queries.extend((base + g - ctx, u, g) for g in range(max(start, 1), end))
            offsets.append(base + end - ctx)
    items = np.zeros((offsets[-1], top_k), dtype=np.int32)
    probs = np.zeros((offsets[-1], top_k), dtype=np.float32)
    length = min(history_items, model.config.max_len)
    starts = range(0, len(queries), batch_size)
    for s in tqdm(starts, desc="SASRec teacher", unit="batch", disable=not progress):
        chunk = queries[s : s + batch_size]
        seq = left_pad([train[u][max(0, g - length) : g] for _, u, g in chunk], length)
        logits = model.full_sort_predict(seq.to(device)).float() / temperature
        p, i = logits.softmax(-1).topk(top_k, dim=-1)
        rows = np.array([r for r, _, _ in chunk])
        items[rows] = i.cpu().numpy()
        probs[rows] = p.cpu().numpy()
    log.info(
        "SASRec teacher: %d targets, top %d items hold %.1f%% of its probability on average",
        len(queries),
        top_k,
        100 * float(probs.sum(1).sum() / max(1, len(queries))),
    )
    return Teacher(items, probs, np.asarray(offsets, dtype=np.int64))


def code_targets(
    teacher_items: torch.Tensor,
    teacher_probs: torch.Tensor,
    target_codes: torch.Tensor,
    codes: torch.Tensor,
    codebook_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's conditional code distributions under teacher forcing.

    teacher_items, teacher_probs [..., K]; target_codes [..., L] (the true item's codes);
    codes [n_items, L] (the catalogue). Returns (q [..., L, N], has [..., L]): q[..., l, :] is
    the teacher's distribution over level l's codes among items sharing the target's first l
    codes; `has` is False where no teacher item shares that prefix (q is then all zero)."""
    levels = codes.shape[1]
    tc = codes[teacher_items.long()]  # [..., K, L]
    eq = tc == target_codes.unsqueeze(-2)  # [..., K, L]
    ones = torch.ones_like(eq[..., :1])
    prefix_ok = torch.cat([ones, eq[..., :-1].long().cumprod(-1).bool()], -1)  # [..., K, L]
    mass = teacher_probs.unsqueeze(-1) * prefix_ok  # [..., K, L]
    q = torch.zeros(*mass.shape[:-2], levels, codebook_size, dtype=mass.dtype)
    q = q.to(mass.device)
    q.scatter_add_(-1, tc.transpose(-1, -2), mass.transpose(-1, -2))  # [..., L, N]
    total = q.sum(-1, keepdim=True)
    has = total.squeeze(-1) > 0
    return q / total.clamp_min(1e-30), has
