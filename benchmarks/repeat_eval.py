"""How fast the repeat-aware mode scores users: the beam search plus each user's recent items
scored exactly (`models.repeat.repeat_candidates`, what `letterrec evaluate` and the torch
engine run), with one prefill shared by both decodes (the decoder forks its state) against a
second prefill for the history scores, and the plain beam search alone for scale.

Paired: every round times the three variants on the same batch, alternating their order; the
result quotes medians and the ratio of medians. It also projects the time to evaluate a
dataset's test users (`--users`, default Yelp's 30,431) at the measured throughput.

    python -m benchmarks.repeat_eval --threads 2                 # random full-profile model
    python -m benchmarks.repeat_eval --bundle runs/ml --threads 2  # a trained bundle
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, header, md_header, md_table, model_info, random_model_info
from benchmarks.common import write_result as write
from models.beam import beam_search
from models.bundle import Bundle
from models.decoders import make_decoder
from models.recommender import build_model, load_lm
from models.repeat import repeat_candidates
from models.trie import ItemTrie
from models.vocab import CodeVocab
from training.config import get_profile


class NoFork:
    """The decoder without its `fork`: the repeat mode then prefills twice (the baseline)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def prefill(self, prompts):  # noqa: ANN001, ANN201
        return self.inner.prefill(prompts)

    def step(self, state, parents, tokens):  # noqa: ANN001, ANN201
        return self.inner.step(state, parents, tokens)


def random_setup(items: int, seed: int) -> tuple[Any, np.ndarray, CodeVocab, dict[str, Any]]:
    """The `full` profile's recommender shape with random weights over a random catalogue."""
    cfg = get_profile("full")
    vocab = CodeVocab(levels=cfg.tokenizer.levels, codebook_size=cfg.tokenizer.codebook_size)
    model = build_model(cfg.lm.model, vocab, seed=seed).eval()
    rng = np.random.default_rng(seed)
    space = vocab.codebook_size**vocab.levels
    flat = np.unique(rng.integers(0, space, size=int(items * 1.2)))[:items]
    rng.shuffle(flat)
    shape = (vocab.codebook_size,) * vocab.levels
    codes = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        info = random_model_info(Path(tmp))
    return model, codes, vocab, info


def histories(n_items: int, users: int, length: int, repeat: float, seed: int) -> list[list[int]]:
    """Histories of `length` items; each item repeats an earlier one with probability `repeat`
    (so users have fewer distinct recent items, as on data with repeat visits)."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(users):
        h: list[int] = []
        for _ in range(length):
            h.append(
                int(rng.choice(h)) if h and rng.random() < repeat else int(rng.integers(n_items))
            )
        out.append(h)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="a trained bundle (default: random)")
    p.add_argument("--items", type=int, default=20000, help="random catalogue size (Yelp: 20,033)")
    p.add_argument("--batch", type=int, default=256, help="users per batch (evaluate's batch)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat-share", type=float, default=0.3)
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--users", type=int, default=30431, help="test users of the projection")
    p.add_argument("--out", default="repeat-eval-cpu")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = header()
    if args.bundle is not None:
        bundle = Bundle.load(args.bundle)
        model, codes, vocab = load_lm(bundle.lm_dir), bundle.catalogue.codes, bundle.vocab
        info = model_info(args.bundle)
    else:
        model, codes, vocab, info = random_setup(args.items, args.seed)
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    decoder = make_decoder(model)
    variants = {
        "repeat, one prefill": lambda pr, hi: repeat_candidates(
            decoder, pr, hi, trie, vocab, args.beam, args.beam
        ),
        "repeat, two prefills": lambda pr, hi: repeat_candidates(
            NoFork(decoder), pr, hi, trie, vocab, args.beam, args.beam
        ),
        "plain beam": lambda pr, hi: beam_search(decoder, pr, trie, vocab, args.beam, 10),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds + 1):  # round 0 warms up
        hist = histories(len(codes), args.batch, vocab.history_items, args.repeat_share, r)
        prompts = [vocab.prompt(codes[h]) for h in hist]
        for name in names[r % 3 :] + names[: r % 3]:
            t0 = time.perf_counter()
            variants[name](prompts, hist)
            if r:
                times[name].append(time.perf_counter() - t0)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v))
    rows = []
    base = float(np.median(times["repeat, two prefills"]))
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append(
            {
                "variant": name,
                "median_s_per_batch": med,
                "users_per_s": args.batch / med,
                "speedup_vs_two_prefills": base / med,
                f"projected_s_{args.users}_users": args.users / (args.batch / med),
                "seconds": ts,
            }
        )
    payload = {
        **head,
        **info,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "beam_width": args.beam,
        "items": len(codes),
        "prompt_tokens": len(vocab.prompt(codes[: vocab.history_items])),
        "rows": rows,
    }
    cols = [
        "variant",
        "median_s_per_batch",
        "users_per_s",
        "speedup_vs_two_prefills",
        f"projected_s_{args.users}_users",
    ]
    md = md_header(
        "Repeat-aware scoring: one prefill for the beam and the history scores", {**head, **info}
    ) + (
        f"{len(codes):,} items, batches of {args.batch} users with {vocab.history_items}-item "
        f"histories ({payload['prompt_tokens']}-token prompts), beam {args.beam}, "
        f"{payload['threads']} thread(s); medians of {args.rounds} paired rounds.\n\n"
        + md_table(rows, cols)
    )
    path = write(args.out, payload, md, args.results)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
