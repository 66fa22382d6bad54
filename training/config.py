"""Typed pipeline configuration and the named profiles (an explicit registry)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.recommender import RecommenderConfig
from training.cf import CFTrainConfig
from training.lm import LMTrainConfig
from training.lora import LoRAConfig
from training.tokenizer import TokenizerTrainConfig


@dataclass(frozen=True)
class PipelineConfig:
    encoder: str = "minilm"
    """Text encoder alias or local Hugging Face model directory."""
    text_fields: tuple[str, ...] = ("title", "description")
    k_core: int = 0
    """Optional k-core filter (0 = keep the data as it is, the paper's protocol)."""
    max_history: int = 20
    cf: CFTrainConfig = field(default_factory=CFTrainConfig)
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    lm: LMTrainConfig = field(default_factory=LMTrainConfig)
    recommender: str = "scratch"
    """The generative recommender the `lm` stage trains: 'scratch' (a small Llama over the code
    vocabulary, trained with `lm`) or 'llm' (the pretrained model `llm.base_model` fine-tuned
    with LoRA, trained with `llm.train`; LC-Rec style)."""
    llm: LoRAConfig = field(default_factory=LoRAConfig)
    """The LLM recommender: base model directory, prompt template, LoRA and training settings."""
    mode_users: int = 10000
    """Validation users (a fixed random subset) on which the recommendation mode and the
    repeat prior are chosen (`letterrec fit-mode`); 0 = all."""
    ablation: bool = True
    """Also train an alpha = 0 tokenizer to measure what CF alignment adds (report only)."""

    def __post_init__(self) -> None:
        if self.recommender not in RECOMMENDERS:
            raise ValueError(f"unknown recommender {self.recommender!r}; valid: {RECOMMENDERS}")
        if self.recommender == "llm" and max(self.lm.nproc, self.llm.train.nproc) > 1:
            raise ValueError(
                "nproc > 1 trains the from-scratch recommender; the llm recommender (LoRA)"
                " trains in one process: set lm.nproc to 1 (--nproc 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_llm(self, base_model: str | None, recommender: str | None) -> PipelineConfig:
        """The command line's `--base-model` (which alone means `--recommender llm`) and
        `--recommender` over this configuration."""
        cfg = self
        if base_model:
            cfg = dataclasses.replace(
                cfg, llm=dataclasses.replace(cfg.llm, base_model=base_model), recommender="llm"
            )
        if recommender:
            cfg = dataclasses.replace(cfg, recommender=recommender)
        if cfg.recommender == "llm" and not cfg.llm.base_model:
            raise ValueError("the llm recommender needs a base model: --base-model DIR")
        return cfg

    def with_nproc(self, nproc: int | None) -> PipelineConfig:
        """The command line's `--nproc` (None: the configuration's) over `lm.nproc`."""
        if nproc is None:
            return self
        return dataclasses.replace(self, lm=dataclasses.replace(self.lm, nproc=nproc))

    def with_device(self, device: str) -> PipelineConfig:
        return dataclasses.replace(
            self,
            cf=dataclasses.replace(self.cf, device=device),
            tokenizer=dataclasses.replace(self.tokenizer, device=device),
            lm=dataclasses.replace(self.lm, device=device),
            llm=dataclasses.replace(
                self.llm, train=dataclasses.replace(self.llm.train, device=device)
            ),
        )


RECOMMENDERS = ("scratch", "llm")


def _from_dict(cls: type, d: dict[str, Any], base: Any = None) -> Any:
    """`cls` built from `d`; fields `d` does not name keep `base`'s values (None: the
    dataclass defaults); nested sections merge field by field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown field(s) {sorted(unknown)}; valid: {sorted(fields)}"
        )
    kwargs = {}
    for k, v in d.items():
        nested = NESTED.get((cls, k))
        if nested is not None:
            if not isinstance(v, dict):
                raise ValueError(f"{cls.__name__}.{k}: expected an object of fields, got {v!r}")
            kwargs[k] = _from_dict(nested, v, None if base is None else getattr(base, k))
            continue
        if isinstance(v, list) and "tuple" in str(fields[k].type):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


NESTED: dict[tuple[type, str], type] = {
    (PipelineConfig, "cf"): CFTrainConfig,
    (PipelineConfig, "tokenizer"): TokenizerTrainConfig,
    (PipelineConfig, "lm"): LMTrainConfig,
    (LMTrainConfig, "model"): RecommenderConfig,
    (PipelineConfig, "llm"): LoRAConfig,
    (LoRAConfig, "train"): LMTrainConfig,
}


def load_config(path: str | Path, base: PipelineConfig | None = None) -> PipelineConfig:
    """A JSON file with any subset of PipelineConfig's fields, applied over `base` (a profile;
    None: the dataclass defaults): the fields the file names replace the base's, section by
    section; every other field keeps the base's value."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object of configuration fields")
    try:
        return _from_dict(PipelineConfig, d, base)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def resolve_config(profile: str, config: str | Path | None) -> PipelineConfig:
    """What the command line's `--profile NAME [--config FILE]` means: the named profile, with
    the file's fields (if any) over it."""
    base = get_profile(profile)
    return load_config(config, base) if config else base


FULL_RECIPE = "yelp-cpu-distill05"
"""The experiment file under benchmarks/configs/ that the `full` profile reproduces."""

PROFILES: dict[str, PipelineConfig] = {
    # The paper's setting on real data (Yelp): 4 x 256 codes, and the recommender recipe with
    # the best validation NDCG@10 on Yelp: benchmarks/configs/<FULL_RECIPE>.json (kept equal by
    # a test): 256-d Llama, dropout, context items, repeat weight, and distillation from the
    # pipeline's own SASRec (results in benchmarks/results/quality-yelp.md).
    "full": PipelineConfig(
        cf=CFTrainConfig(epochs=30, eval_every=2, patience=3, negatives=2048),
        tokenizer=TokenizerTrainConfig(
            levels=4, codebook_size=256, alpha=0.1, cf_temperature=0.1, beta=1e-4
        ),
        lm=LMTrainConfig(
            model=RecommenderConfig(hidden=256, layers=4, heads=4, intermediate=1024),
            epochs=16,
            batch_size=64,
            lr=3e-3,
            warmup=0.05,
            eval_every=2,
            eval_users=2000,
            patience=3,
            beam_width=20,
            hidden_dropout=0.3,
            repeat_weight=10.0,
            context_items=10,
            bf16=True,
            distill=0.5,
        ),
    ),
    # The README demo on the embedded ml-100k: minutes on a 2-core CPU. 1,682 items need
    # fewer codes per level than 256 for a meaningful code distribution.
    "quick": PipelineConfig(
        cf=CFTrainConfig(epochs=15, eval_every=3, patience=2),
        tokenizer=TokenizerTrainConfig(levels=3, codebook_size=64, epochs=100, batch_size=512),
        lm=LMTrainConfig(
            epochs=10,
            batch_size=64,
            lr=3e-3,
            max_windows_per_user=2,
            eval_every=5,
            eval_users=300,
            patience=1,
        ),
        ablation=False,
    ),
}


def get_profile(name: str) -> PipelineConfig:
    if name not in PROFILES:
        raise ValueError(f"unknown profile '{name}'; valid: {sorted(PROFILES)}")
    return PROFILES[name]
