"""Search error or model error? For a sample of test users of a trained bundle, compare the
target's own score (teacher-forced sum of its code tokens' log-probabilities: the value beam
search adds up, since masking sets other tokens to -inf without renormalising) with the 10th
best score beam search returned. A missed target scoring above it is a search error (beam 20
pruned it); below it, the model ranks it too low. Split by repeat targets (an item of the
user's last 20) and new ones, plus the share of history items scoring above the 10th beam.

    python -m benchmarks.search_errors --bundle runs/yelp-ema/LETTER_tau1 \
        --config benchmarks/configs/yelp-cpu-dropout-ema.json --data ../shared/data/yelp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.beam import beam_search
from models.bundle import Bundle
from models.decoders import make_decoder
from models.recommender import load_lm
from models.trie import ItemTrie
from training.config import resolve_config
from training.pipeline import Workspace


@torch.no_grad()
def item_scores(model: torch.nn.Module, prompt: list[int], tokens: np.ndarray) -> torch.Tensor:
    """Summed log-probabilities of each candidate's code tokens [n, L] after `prompt`."""
    n, levels = tokens.shape
    ids = torch.tensor([[*prompt, *row] for row in tokens.tolist()])
    lp = model(ids).logits.log_softmax(-1)
    pos = len(prompt) - 1 + torch.arange(levels)
    return lp[torch.arange(n)[:, None], pos[None, :], ids[:, len(prompt) :]].sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ws = Workspace(out=args.bundle, cfg=resolve_config("full", args.config), data_spec=args.data)
    bundle, split = Bundle.load(args.bundle), ws.split()
    codes, vocab = bundle.catalogue.codes, bundle.vocab
    model = load_lm(bundle.lm_dir).eval()
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    pick = np.random.default_rng(args.seed).permutation(len(split.test))[: args.users]
    pairs = [split.test[i] for i in pick]
    prompts = [vocab.prompt(codes[h]) if h else [vocab.bos_id] for h, _ in pairs]
    res = beam_search(make_decoder(model), prompts, trie, vocab, beam_width=args.beam, k=10)
    counts = {k: {"users": 0, "hits": 0, "search_errors": 0} for k in ("repeat", "new")}
    above = []
    for i, ((hist, target), prompt) in enumerate(tqdm(list(zip(pairs, prompts, strict=True)))):
        tenth = float(res.scores[i, -1])
        seen = list(dict.fromkeys(hist[-vocab.history_items :]))
        row = counts["repeat" if target in seen else "new"]
        own = float(item_scores(model, prompt, vocab.tokens(codes[[target]]))[0])
        hit = target in res.items[i].tolist()
        row["users"] += 1
        row["hits"] += hit
        row["search_errors"] += (not hit) and own > tenth
        if seen:
            above.append(
                float(
                    (item_scores(model, prompt, vocab.tokens(codes[seen])) > tenth).float().mean()
                )
            )
    out = {**counts, "history_items_above_10th": float(np.mean(above)) if above else 0.0}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
