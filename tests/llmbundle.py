"""An LLM-recommender bundle built as a user builds one: a tiny dataset on disk (LC-Rec JSON),
a toy pretrained LLM (training.toy_llm) as the base model, and the `letterrec pipeline` command
with `--base-model` (data, embed, cf, tokenizer and the LoRA lm stage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from letterrec.cli import app
from tests.bundlefactory import synthetic_items
from training.lm import LMTrainConfig
from training.toy_llm import ToyLLMConfig, make_toy_llm

N_ITEMS = 80
LEVELS, CODEBOOK = 3, 8
"""3 x 8 code tokens after a 400-token BPE tokenizer: the enlarged vocabulary (424) is padded
to 448 rows, so the served vocabulary has rows that are neither text nor codes."""
PROMPT = "History: {history}\nNext: "
BEAM = 10


def write_dataset(root: Path, n_users: int = 60, seed: int = 0) -> Path:
    """Users walk the catalogue (item i is followed by item i + 1), in LC-Rec JSON."""
    root.mkdir(parents=True, exist_ok=True)
    items = synthetic_items(N_ITEMS, seed)
    rng = np.random.default_rng(seed)
    inter = {}
    for u in range(n_users):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(5, 9))
        inter[f"u{u}"] = [items[(start + j) % N_ITEMS]["item_id"] for j in range(length)]
    fields = {
        it["item_id"]: {"title": it["title"], "description": it["description"]} for it in items
    }
    (root / "tiny.item.json").write_text(json.dumps(fields))
    (root / "tiny.inter.json").write_text(json.dumps(inter))
    return root


def item_texts(data: Path) -> list[str]:
    fields = json.loads((data / "tiny.item.json").read_text())
    return [f"{f['title']}. {f['description']}" for f in fields.values()]


def experiment(path: Path, epochs: int = 2) -> Path:
    """A small experiment file: tiny SASRec and tokenizer, the LLM trained for `epochs`."""
    train = LMTrainConfig(
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        warmup=0.1,
        eval_every=epochs,
        eval_users=40,
        patience=1,
        beam_width=BEAM,
    )
    cfg = {
        "max_history": 5,
        "ablation": False,
        "cf": {"epochs": 1, "eval_every": 1, "patience": 1, "negatives": 64},
        "tokenizer": {
            "levels": LEVELS,
            "codebook_size": CODEBOOK,
            "hidden": [32],
            "epochs": 10,
            "batch_size": 64,
        },
        "lm": LMTrainConfig(beam_width=BEAM).to_dict(),
        "llm": {"prompt": PROMPT, "r": 8, "alpha": 16, "dropout": 0.0, "train": train.to_dict()},
    }
    path.write_text(json.dumps(cfg))
    return path


def build_llm_bundle(root: Path, arch: str = "llama") -> Path:
    """Dataset, toy base model and bundle under `root`; returns the bundle directory."""
    data = write_dataset(root / "data")
    base = make_toy_llm(item_texts(data), root / "base", ToyLLMConfig(arch=arch))
    out = root / "bundle"
    args = [
        "pipeline",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(experiment(root / "experiment.json")),
        "--base-model",
        str(base),
        "--stages",
        "data,embed,cf,tokenizer,lm",
        "--device",
        "cpu",
        "--quiet",
    ]
    old = os.environ.get("LETTERREC_CACHE")
    os.environ["LETTERREC_CACHE"] = str(root / "cache")
    try:
        result = CliRunner().invoke(app, args)
    finally:
        if old is None:
            os.environ.pop("LETTERREC_CACHE", None)
        else:
            os.environ["LETTERREC_CACHE"] = old
    if result.exit_code != 0:
        raise RuntimeError(f"letterrec pipeline failed ({result.exit_code}):\n{result.output}")
    return out
