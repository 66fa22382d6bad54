"""The offline stages, each resumable: outputs go under BUNDLE/stages/ and a stage whose output
exists is skipped (unless forced). The bundle files are written by the tokenizer stage."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import Bundle, Catalogue, Manifest, update_recommend
from models.item_tokenizer import TextTemplate
from models.recommender import load_lm, save_lm
from models.text_encoder import TextEncoder
from models.vocab import CodeVocab
from training.cf import evaluate as sasrec_evaluate
from training.cf import train_sasrec
from training.config import PipelineConfig
from training.data import Dataset, Split, k_core, leave_one_out, load_dataset
from training.ddp import train_lm_parallel
from training.distill import load_sasrec, save_sasrec, teacher_topk
from training.embed import embed_texts, item_texts
from training.evaluate import evaluate_generative, evaluate_popularity, evaluate_recent
from training.lm import LMResult, window_bounds
from training.repeat import choose_mode, default_prior
from training.tokenizer import TokenizerResult, train_tokenizer
from training.tokenizer_report import (
    plot_code_frequency,
    plot_spectrum,
    tokenizer_report,
    write_json,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Workspace:
    out: Path
    cfg: PipelineConfig
    data_spec: str
    force: bool = False
    progress: bool = True
    _ds: Dataset | None = None

    @property
    def stages(self) -> Path:
        return self.out / "stages"

    def dataset(self) -> Dataset:
        if self._ds is None:
            ds = load_dataset(self.data_spec)
            if self.cfg.k_core > 1:
                ds = k_core(ds, self.cfg.k_core)
            self._ds = ds
        return self._ds

    def split(self) -> Split:
        return leave_one_out(self.dataset(), self.cfg.max_history)

    def done(self, name: str) -> bool:
        return not self.force and (self.stages / name).exists()


def stage_data(ws: Workspace) -> dict[str, Any]:
    ds = ws.dataset()
    split = ws.split()
    summary = {**ds.summary(), "eval_users": len(split.test)}
    write_json(summary, ws.stages / "data.json")
    return summary


def stage_embed(ws: Workspace) -> dict[str, Any]:
    path = ws.stages / "embeddings.npy"
    if ws.done("embeddings.npy"):
        return {"embeddings": str(path), "skipped": True}
    ds = ws.dataset()
    texts, fallbacks = item_texts(ds, TextTemplate(ws.cfg.text_fields))
    encoder = TextEncoder(ws.cfg.encoder, device=ws.cfg.tokenizer.device)
    t0 = time.perf_counter()
    emb, hit = embed_texts(texts, encoder, progress=ws.progress)
    ws.stages.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    meta = {
        "encoder": ws.cfg.encoder,
        "encoder_fingerprint": encoder.fingerprint(),
        "dim": int(emb.shape[1]),
        "items": int(emb.shape[0]),
        "text_fallbacks": fallbacks,
        "cache_hit": hit,
        "seconds": time.perf_counter() - t0,
    }
    write_json(meta, ws.stages / "embeddings.json")
    return meta


def stage_cf(ws: Workspace) -> dict[str, Any]:
    if ws.done("cf.npy"):
        return {**json.loads((ws.stages / "sasrec.json").read_text()), "skipped": True}
    ds = ws.dataset()
    res = train_sasrec(ws.split(), ds.n_items, ws.cfg.cf, progress=ws.progress)
    ws.stages.mkdir(parents=True, exist_ok=True)
    np.save(ws.stages / "cf.npy", res.embeddings)
    assert res.model is not None  # train_sasrec returns its best model
    save_sasrec(res.model, ws.stages / "sasrec.pt")
    summary = {
        "valid": res.valid,
        "test": res.test,
        "epochs": res.epochs,
        "seconds": res.seconds,
        "config": res.config,
        "history": res.history,
    }
    write_json(summary, ws.stages / "sasrec.json")
    return summary


def _train(
    ws: Workspace, emb: np.ndarray, cf: np.ndarray | None, alpha: float, beta: float
) -> TokenizerResult:
    meta = json.loads((ws.stages / "embeddings.json").read_text())
    tcfg = dataclasses.replace(ws.cfg.tokenizer, alpha=alpha, beta=beta)
    return train_tokenizer(
        emb,
        cf,
        tcfg,
        encoder=ws.cfg.encoder,
        encoder_fingerprint=meta["encoder_fingerprint"],
        template=TextTemplate(ws.cfg.text_fields),
        progress=ws.progress,
    )


def stage_tokenizer(ws: Workspace) -> dict[str, Any]:
    if ws.done("tokenizer.json") and (ws.out / "manifest.json").exists():
        return {**json.loads((ws.stages / "tokenizer.json").read_text()), "skipped": True}
    ds = ws.dataset()
    emb = np.load(ws.stages / "embeddings.npy")
    cf = np.load(ws.stages / "cf.npy")
    tcfg = ws.cfg.tokenizer
    t0 = time.perf_counter()
    main = _train(ws, emb, cf, tcfg.alpha, tcfg.beta)
    wall = time.perf_counter() - t0
    report = tokenizer_report(
        main.tokenizer, emb, main.codes, main.greedy_codes, main.resolution.moved, cf
    )
    report.update(
        {
            "train_seconds": main.seconds,
            "cluster_seconds": main.cluster_seconds,
            "wall_seconds": wall,
            "config": main.config,
            "history": main.history,
        }
    )
    codes_by_name = {f"LETTER (alpha={tcfg.alpha:g}, beta={tcfg.beta:g})": main.codes}
    spectra = {"LETTER": report["latent_singular_values"]}
    if ws.cfg.ablation:
        plain = _train(ws, emb, cf, 0.0, 0.0)
        ab = tokenizer_report(
            plain.tokenizer, emb, plain.codes, plain.greedy_codes, plain.resolution.moved, cf
        )
        report["ablation_plain"] = {k: v for k, v in ab.items() if k != "latent_singular_values"}
        report["cf_alignment"] = {
            "with_alpha": report["cf_code_overlap"],
            "alpha_zero": ab["cf_code_overlap"],
        }
        codes_by_name["RQ-VAE (alpha=0, beta=0)"] = plain.codes
        spectra["RQ-VAE"] = ab["latent_singular_values"]
    report_dir = ws.out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_code_frequency(codes_by_name, tcfg.codebook_size, report_dir / "code_frequency.png")
    plot_spectrum(spectra, report_dir / "latent_spectrum.png")
    write_json(report, report_dir / "tokenizer.json")

    main.tokenizer.save(ws.out / "tokenizer")
    vocab = CodeVocab(
        levels=main.tokenizer.levels,
        codebook_size=tcfg.codebook_size,
        history_items=ws.cfg.max_history,
    )
    catalogue = Catalogue(ds.item_ids, main.codes, [str(it.get("title", "")) for it in ds.items])
    manifest = Manifest(vocab=vocab, config=ws.cfg.to_dict(), data=ds.summary())
    Bundle(ws.out, manifest, catalogue).save()
    summary = {
        "items": report["items"],
        "unique_ids": report["unique_ids"],
        "levels": report["levels"],
        "collisions": report["collisions"],
        "recon_mse": report["recon_mse"],
        "cf_alignment": report.get("cf_alignment"),
        "wall_seconds": wall,
    }
    write_json(summary, ws.stages / "tokenizer.json")
    return summary


def stage_lm(ws: Workspace) -> dict[str, Any]:
    """Train the recommender on the bundle's codes (from scratch, or the LLM of
    `cfg.recommender = 'llm'`); write `lm/`, the manifest's vocabulary, report/lm.json."""
    if ws.done("lm.json") and (ws.out / "lm" / "config.json").exists():
        done = json.loads((ws.stages / "lm.json").read_text())
        if done.get("recommender", "scratch") == ws.cfg.recommender:
            return {**done, "skipped": True}
    bundle = Bundle.load(ws.out)
    split = ws.split()
    if ws.cfg.recommender == "llm":
        return _stage_llm(ws, bundle, split)
    # The code layout of the tokenizer stage (an earlier LLM run may have changed the manifest's).
    bundle.manifest.vocab = CodeVocab(
        levels=bundle.vocab.levels,
        codebook_size=bundle.vocab.codebook_size,
        history_items=bundle.vocab.history_items,
    )
    lcfg = ws.cfg.lm
    teacher = None
    if lcfg.distill > 0:
        teacher = teacher_topk(
            load_sasrec(ws.stages / "sasrec.pt", lcfg.device),
            split.train,
            window_bounds(
                split.train, lcfg.window_items, lcfg.max_windows_per_user, lcfg.context_items
            ),
            bundle.vocab.history_items,
            lcfg.distill_top_k,
            lcfg.distill_temperature,
            progress=ws.progress,
        )
    res = train_lm_parallel(  # one process (lm.nproc = 1): train_lm itself
        split.train,
        split.valid,
        bundle.catalogue.codes,
        bundle.vocab,
        ws.cfg.lm,
        checkpoint=ws.stages / "lm_checkpoint.pt",
        progress=ws.progress,
        teacher=teacher,
    )
    save_lm(res.model, bundle.vocab, bundle.lm_dir, extra={"train": ws.cfg.lm.to_dict()})
    bundle.manifest.config = ws.cfg.to_dict()
    bundle.save()
    return _lm_summary(ws, res, ws.cfg.lm.device, {"recommender": "scratch"})


def _stage_llm(ws: Workspace, bundle: Bundle, split: Split) -> dict[str, Any]:
    """LoRA fine-tuning of `cfg.llm.base_model`; the manifest's vocabulary becomes the enlarged
    one, with the prompt template as token ids."""
    from training.lora import train_lora  # peft is only needed here

    shutil.rmtree(bundle.lm_dir, ignore_errors=True)  # a previous recommender's files
    res, vocab = train_lora(
        ws.cfg.llm,
        split.train,
        split.valid,
        bundle.catalogue.codes,
        bundle.vocab.levels,
        bundle.vocab.codebook_size,
        bundle.vocab.history_items,
        bundle.lm_dir,
        checkpoint=ws.stages / "llm_checkpoint.pt",
        progress=ws.progress,
    )
    bundle.manifest.vocab = vocab
    bundle.manifest.config = ws.cfg.to_dict()
    bundle.save()
    extra = {
        "recommender": "llm",
        "base_model": ws.cfg.llm.base_model,
        "code_offset": vocab.code_offset,
        "prompt_tokens": len(vocab.head) + len(vocab.prompt_suffix),
    }
    return _lm_summary(ws, res, ws.cfg.llm.train.device, extra)


def _lm_summary(ws: Workspace, res: LMResult, device: str, extra: dict[str, Any]) -> dict[str, Any]:
    summary = {
        **extra,
        "valid": res.valid,
        "epochs": res.epochs,
        "train_seconds": res.seconds,
        "tokens_per_s": res.tokens_per_s,
        "device": device,
        "history": res.history,
    }
    write_json(summary, ws.out / "report" / "lm.json")
    write_json(summary, ws.stages / "lm.json")
    return summary


def stage_mode(ws: Workspace) -> dict[str, Any]:
    """Choose the recommendation mode (plain, history excluded, repeat-aware) and fit the
    repeat prior on validation users -> manifest `recommend`, report/mode.json."""
    bundle = Bundle.load(ws.out)
    if ws.done("mode.json") and bundle.manifest.recommend:
        return {**json.loads((ws.stages / "mode.json").read_text()), "skipped": True}
    split = ws.split()
    valid = split.valid
    if 0 < ws.cfg.mode_users < len(valid):
        pick = np.random.default_rng(ws.cfg.lm.seed + 2).permutation(len(valid))
        valid = [valid[i] for i in sorted(pick[: ws.cfg.mode_users])]
    model = load_lm(bundle.lm_dir, ws.cfg.lm.device)
    t0 = time.perf_counter()
    chosen = choose_mode(
        model,
        valid,
        bundle.catalogue.codes,
        bundle.vocab,
        ws.cfg.lm.beam_width,
        progress=ws.progress,
    )
    # Merged under the manifest lock: fields of the new-item protocol (`new_item_bonus`,
    # `new_item_slots`), which may be fitting at the same time, stay.
    update_recommend(ws.out, chosen)
    summary = {**chosen, "seconds": time.perf_counter() - t0}
    write_json(summary, ws.out / "report" / "mode.json")
    write_json(summary, ws.stages / "mode.json")
    return summary


def stage_evaluate(ws: Workspace) -> dict[str, Any]:
    """Test metrics with bootstrap standard errors of popularity, recent history, SASRec and
    the bundle's recommender (plain, and in its validation-chosen mode when that is not plain;
    the repeat-aware row whenever a prior was fitted), each with its repeat-visit breakdown
    -> report/eval.json."""
    bundle = Bundle.load(ws.out)
    split = ws.split()
    model = load_lm(bundle.lm_dir, ws.cfg.lm.device)
    recommend = bundle.manifest.recommend
    gen = evaluate_generative(
        model,
        split.train,
        split.test,
        bundle.catalogue.codes,
        bundle.vocab,
        ws.cfg.lm.beam_width,
        progress=ws.progress,
        prior=default_prior(recommend) if recommend else None,
        exclude_history=recommend.get("mode") == "exclude_history",
    )
    rows = {
        "popularity": evaluate_popularity(split.train, split.test, ws.dataset().n_items),
        "recent": evaluate_recent(
            split.train, split.test, ws.dataset().n_items, bundle.vocab.history_items
        ),
        "sasrec": _sasrec_test(ws, split.test, bundle.vocab.history_items),
        "letterrec": gen["plain"],
    }
    if "repeat" in gen:
        rows["letterrec_repeat"] = gen["repeat"]
    if "exclude_history" in gen:
        rows["letterrec_exclude_history"] = gen["exclude_history"]
    write_json(rows, ws.out / "report" / "eval.json")
    return {
        name: {k: round(v, 4) for k, v in r.items() if "@" in k and "se_" not in k}
        for name, r in rows.items()
    } | {"eval_seconds": gen["plain"]["eval_seconds"], "mode": recommend.get("mode", "")}


def _sasrec_test(
    ws: Workspace, test: list[tuple[list[int], int]], history_items: int
) -> dict[str, Any]:
    """SASRec's test row, re-scored from its saved weights (with standard errors, on the same
    history length as the other rows); the cf stage's figures for older stage directories."""
    path = ws.stages / "sasrec.pt"
    if not path.exists():
        return json.loads((ws.stages / "sasrec.json").read_text())["test"]
    model = load_sasrec(path, ws.cfg.cf.device)
    return sasrec_evaluate(model, test, with_se=True, history_items=history_items)
