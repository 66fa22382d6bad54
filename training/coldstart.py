"""New items: are they recommended the moment they are tokenized? (`letterrec evaluate
--cold-items SHARE`)

Protocol:
- Cold items: the `share` of the items (with interactions) that arrived last. The datasets'
  sequences are ordered but carry no common clock (LC-Rec JSON has no timestamps), so an
  item's age is counted in its users' own steps: the largest number of interactions any user
  made after first visiting it. A new item has been visited only at the very ends of
  sequences; the newest are those with the smallest age, ties to the item listed later in the
  item file.
- Every training stage (SASRec, the tokenizer, the recommender) runs on the warm dataset: the
  cold items removed from the catalogue and from every sequence (the rest of each sequence
  stays), in `BUNDLE/coldstart/`, with the same configuration.
- Before testing, the cold items are encoded by the trained tokenizer from their text through
  `ItemTokenizer.encode` with the catalogue's identifiers taken: the call POST /tokenize makes,
  so their identifiers are unique; they join the trie.
- Test: the full dataset's leave-one-out test users (their histories may hold cold items; the
  recommender's prompt shows their codes, SASRec cannot see them and skips them). The catalogue
  is served as the service holds it (bundle rows, then tokenized rows) and the new-item bonus
  (models.beam.NewItemBonus) is fitted on validation users (BONUS_GRID, best NDCG@10, kept
  beyond two standard errors of the paired gain over none), then the new-item slots
  (models.new_items: SLOT_GRID x MARGIN_GRID, the most cold validation targets found within
  NEW_ITEM_COST of the validation NDCG@10); both go into the manifests of the cold-start bundle
  and of the bundle trained on everything, whose later arrivals they serve. Rows: LETTER (this
  cold-start model with the fitted bonus and slots), LETTER (no new-item prior), SASRec (0 on cold targets by construction: it has no embedding for
  an item it never saw), Content (cosine of item text embeddings to the mean of the user's last
  5 items, history excluded: the usual cold-start answer), Popularity (warm training counts),
  and, when BUNDLE holds a model trained on the whole catalogue, `LETTER (full catalogue)` for
  the cost on warm targets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.beam import NewItemBonus, beam_search
from models.bundle import Bundle, update_recommend
from models.decoders import make_decoder, prefills
from models.item_tokenizer import ItemTokenizer
from models.new_items import NewItemSlots, new_item_search, place
from models.recommender import load_lm
from models.trie import ItemTrie
from models.vocab import CodeVocab
from training.cf import left_pad
from training.data import Dataset, leave_one_out
from training.distill import load_sasrec
from training.evaluate import item_popularity
from training.lm import history_prompts, recommend
from training.metrics import gains_at, ranks_from_lists, standard_errors, summarize

log = logging.getLogger(__name__)


def cold_items(ds: Dataset, share: float) -> np.ndarray:
    """Rows of the newest `share` of the items with interactions (see the module docstring)."""
    if not 0 < share < 1:
        raise ValueError(f"--cold-items must be a share in (0, 1), got {share}")
    after = np.full(ds.n_items, -1)
    for seq in ds.sequences:
        n = len(seq)
        seen: set[int] = set()
        for pos, item in enumerate(seq):
            if item not in seen:
                seen.add(item)
                after[item] = max(after[item], n - 1 - pos)
    known = np.flatnonzero(after >= 0)
    count = max(1, int(round(share * len(known))))
    # Newest first: the fewest interactions after their first visit, then the later row.
    order = np.lexsort((-known, after[known]))
    return np.sort(known[order[:count]])


def without_items(ds: Dataset, drop: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """The dataset without the `drop` rows (catalogue and sequences); returns it and, for each
    of its rows, the row in `ds`."""
    keep = np.setdiff1d(np.arange(ds.n_items), drop)
    new_row = np.full(ds.n_items, -1)
    new_row[keep] = np.arange(len(keep))
    warm = Dataset(
        name=f"{ds.name} (warm)",
        item_ids=[ds.item_ids[i] for i in keep],
        items=[ds.items[i] for i in keep],
        user_ids=list(ds.user_ids),
        sequences=[[int(new_row[i]) for i in s if new_row[i] >= 0] for s in ds.sequences],
        source=ds.source,
        stats={"cold_items_removed": len(drop)},
    )
    return warm, keep


def encode_cold(
    tokenizer: ItemTokenizer, items: list[dict[str, Any]], warm_codes: np.ndarray
) -> np.ndarray:
    """The cold items' identifiers as POST /tokenize assigns them: `ItemTokenizer.encode` on
    their text, with every catalogue identifier taken (so all are unique)."""
    taken = {tuple(int(c) for c in row) for row in warm_codes}
    return tokenizer.encode(items, is_taken=lambda t: tuple(t) in taken)


BONUS_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
"""New-item bonuses tried on validation (log-probability units)."""
SLOT_GRID = (1, 2)
"""New-item slots tried on validation (places of the top 10, models.new_items)."""
MARGIN_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, math.inf)
"""Slot margins tried on validation (log-probability units; inf: always a new item)."""
NEW_ITEM_COST = 0.02
"""The share of validation NDCG@10 (all users) the new-item slots may cost: among the slot
settings within it, the one that finds the most cold validation targets is served. New items
earn little accuracy at first (few users pick them before they are shown), and a catalogue that
never shows them never learns about them; this is the price of their exposure, a product
setting rather than a property of the data."""
FIT_USERS = 4000
"""Validation users the bonus is fitted on (a seeded sample when there are more)."""


@dataclasses.dataclass
class ServedCatalogue:
    """The catalogue as the service holds it after POST /tokenize: the warm (bundle) rows
    first, the cold (tokenized) rows after them. Maps the dataset's rows to and fro."""

    codes: np.ndarray  # [n, L] identifiers by dataset row
    keep: np.ndarray  # dataset rows of the warm items, in bundle order
    cold: np.ndarray  # dataset rows of the cold items
    codebook_size: int

    def __post_init__(self) -> None:
        self.order = np.concatenate([self.keep, self.cold])  # served row -> dataset row
        self.row = np.empty_like(self.order)
        self.row[self.order] = np.arange(len(self.order))  # dataset row -> served row
        self.served_codes = self.codes[self.order]  # [n, L] by served row
        self.trie = ItemTrie.from_codes(self.served_codes, self.codebook_size)

    def recommend(
        self,
        model: Any,
        histories: list[list[int]],
        vocab: CodeVocab,
        beam_width: int,
        bonus: float,
        progress: bool = False,
    ) -> list[list[int]]:
        """Top-10 dataset rows per history (dataset rows), new items favoured by `bonus`."""
        served = [self.row[h].tolist() for h in histories]
        recs = recommend(
            model,
            served,
            self.served_codes,
            vocab,
            self.trie,
            10,
            beam_width,
            progress=progress,
            new_from=len(self.keep),
            new_bonus=bonus,
        )
        return [self.order[r].tolist() for r in recs]

    @torch.no_grad()
    def search(
        self,
        model: Any,
        histories: list[list[int]],
        vocab: CodeVocab,
        beam_width: int,
        bonus: float,
        new_k: int,
        progress: bool = False,
        batch_size: int = 256,
    ) -> Searched:
        """The main search's top 10 (served rows, with scores; new items favoured by `bonus`)
        and the top `new_k` of the search over new items only, from one prefill per batch."""
        decoder = make_decoder(model)
        out = Searched([], [], [], [])
        first = len(self.keep)
        starts = range(0, len(histories), batch_size)
        for s in tqdm(starts, desc="beam + new items", unit="batch", disable=not progress):
            served = [self.row[h].tolist() for h in histories[s : s + batch_size]]
            prompts = history_prompts(served, self.served_codes, vocab)
            pre = prefills(decoder, prompts, 2 if new_k else 1)
            new = NewItemBonus(first, [bonus] * len(prompts)) if bonus > 0 else None
            main = beam_search(
                decoder, prompts, self.trie, vocab, beam_width, 10, None, new, pre[0]
            )
            out.items.extend(main.items.tolist())
            out.scores.extend(main.scores.tolist())
            if new_k:
                fresh = new_item_search(
                    decoder, prompts, self.trie, vocab, first, new_k, beam_width, None, pre[1]
                )
                out.new_items.extend(fresh.items.tolist())
                out.new_scores.extend(fresh.scores.tolist())
        return out

    def lists(self, searched: Searched, slots: NewItemSlots) -> list[list[int]]:
        """Top-10 dataset rows per user: the main lists with the new-item `slots` filled."""
        out = []
        for u, (items, scores) in enumerate(zip(searched.items, searched.scores, strict=True)):
            if slots.active:
                new_items, new_scores = searched.new_items[u], searched.new_scores[u]
                placed = place(items, scores, new_items, new_scores, slots, 10, len(self.keep))
                items = [i for i, _, _ in placed]
            out.append(self.order[[i for i in items if i >= 0][:10]].tolist())
        return out


@dataclasses.dataclass
class Searched:
    """Per user (served rows, best first): the main search's items and scores, and the new-item
    search's."""

    items: list[list[int]]
    scores: list[list[float]]
    new_items: list[list[int]]
    new_scores: list[list[float]]


def fit_pairs(valid: list[tuple[list[int], int]], cfg: Any) -> list[tuple[list[int], int]]:
    """The validation users the bonus is fitted on: all, or a seeded sample of FIT_USERS."""
    if len(valid) <= FIT_USERS:
        return valid
    pick = np.random.default_rng(cfg.lm.seed + 3).permutation(len(valid))[:FIT_USERS]
    return [valid[i] for i in sorted(pick)]


def fit_new_item_bonus(
    model: Any,
    pairs: list[tuple[list[int], int]],
    served: ServedCatalogue,
    vocab: CodeVocab,
    beam_width: int,
    progress: bool = False,
    grid: tuple[float, ...] = BONUS_GRID,
) -> dict[str, Any]:
    """The bonus of `grid` with the best validation NDCG@10 (ties to the smaller), kept only when
    it beats the first value (no bonus) by more than two standard errors of the paired
    difference; with every grid point's figures."""
    targets = [t for _, t in pairs]
    hists = [h for h, _ in pairs]
    cold = np.isin(targets, served.cold)
    gains: dict[float, np.ndarray] = {}
    table = []
    for b in tqdm(grid, desc="new-item bonus", unit="value", disable=not progress):
        recs = served.recommend(model, hists, vocab, beam_width, b)
        ranks = ranks_from_lists(recs, targets)
        gains[b] = gains_at(ranks, 10)
        table.append(
            {
                "bonus": b,
                "ndcg@10": float(gains[b].mean()),
                "recall@10": float((ranks < 10).mean()),
                "recall@10_cold": float((ranks[cold] < 10).mean()) if cold.any() else 0.0,
            }
        )
    best = max(grid, key=lambda b: (round(float(gains[b].mean()), 12), -b))
    diff = gains[best] - gains[grid[0]]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    # As the served mode (training.repeat.pick_mode): leave the first grid value (no bonus) only
    # for a gain beyond two standard errors of the paired difference.
    chosen = best if diff.mean() > 2 * se else grid[0]
    return {
        "new_item_bonus": float(chosen),
        "best_on_validation": float(best),
        "users": len(pairs),
        "cold_targets": int(cold.sum()),
        "gain_ndcg@10": float(diff.mean()),
        "se_gain_ndcg@10": se,
        "grid": table,
    }


def fit_new_item_slots(
    searched: Searched,
    pairs: list[tuple[list[int], int]],
    served: ServedCatalogue,
    slot_grid: tuple[int, ...] = SLOT_GRID,
    margin_grid: tuple[float, ...] = MARGIN_GRID,
    cost: float = NEW_ITEM_COST,
) -> dict[str, Any]:
    """The slot setting that finds the most cold validation targets (R@10 on them; ties: the
    higher NDCG@10, then fewer slots and the smaller margin) among those costing at most
    `cost` of the validation NDCG@10 without slots; none when no setting finds more cold
    targets than no slots. `searched`: `ServedCatalogue.search` of `pairs` with the fitted
    bonus and max(slot_grid) new items."""
    targets = [t for _, t in pairs]
    cold = np.isin(targets, served.cold)

    def score(slots: NewItemSlots) -> dict[str, Any]:
        ranks = ranks_from_lists(served.lists(searched, slots), targets)
        gains = gains_at(ranks, 10)
        return {
            "slots": slots.slots,
            "margin": slots.margin,
            "ndcg@10": float(gains.mean()),
            "recall@10": float((ranks < 10).mean()),
            "recall@10_cold": float((ranks[cold] < 10).mean()) if cold.any() else 0.0,
            "gains": gains,
        }

    base = score(NewItemSlots())
    table = [base] + [score(NewItemSlots(n, m)) for n in slot_grid for m in margin_grid]
    floor = (1 - cost) * base["ndcg@10"]
    ok = [
        r
        for r in table[1:]
        if r["ndcg@10"] >= floor and r["recall@10_cold"] > base["recall@10_cold"]
    ]
    best = max(
        ok,
        key=lambda r: (r["recall@10_cold"], r["ndcg@10"], -r["slots"], -r["margin"]),
        default=base,
    )
    diff = best["gains"] - base["gains"]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    # How far the best new item scores below the main list's last item: the margin a slot needs.
    gaps = [
        sc[-1] - ns[0]
        for sc, ns in zip(searched.scores, searched.new_scores, strict=True)
        if sc and ns and math.isfinite(sc[-1]) and math.isfinite(ns[0])
    ]
    return {
        "new_item_slots": NewItemSlots(best["slots"], best["margin"]).to_dict(),
        "median_gap": float(np.median(gaps)) if gaps else None,
        "cost": cost,
        "users": len(pairs),
        "cold_targets": int(cold.sum()),
        "gain_ndcg@10": float(diff.mean()),
        "se_gain_ndcg@10": se,
        "gain_recall@10_cold": best["recall@10_cold"] - base["recall@10_cold"],
        "grid": [{k: v for k, v in r.items() if k != "gains"} for r in table],
    }


@torch.no_grad()
def sasrec_lists(
    model: Any, pairs: list[tuple[list[int], int]], warm_row: np.ndarray, keep: np.ndarray
) -> list[list[int]]:
    """SASRec's top-10 (full rows) for histories in full rows; cold history items are
    skipped, cold items are never scored."""
    out: list[list[int]] = []
    for s in range(0, len(pairs), 512):
        hists = [[int(warm_row[i]) for i in h if warm_row[i] >= 0] for h, _ in pairs[s : s + 512]]
        length = max(1, min(model.config.max_len, max(len(h) for h in hists)))
        scores = model.full_sort_predict(left_pad(hists, length)).float()
        top = scores.topk(min(10, scores.shape[1]), dim=1).indices.numpy()
        out.extend(keep[top].tolist())
    return out


def content_lists(
    emb: np.ndarray, pairs: list[tuple[list[int], int]], recent: int = 5
) -> list[list[int]]:
    """Top-10 by cosine of item text embeddings to the mean of the last `recent` history items,
    history excluded."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    out = []
    for s in range(0, len(pairs), 1024):
        chunk = pairs[s : s + 1024]
        users = np.stack([x[h[-recent:]].mean(0) if h else np.zeros(x.shape[1]) for h, _ in chunk])
        scores = users @ x.T
        for r, (h, _) in enumerate(chunk):
            scores[r, h] = -np.inf
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
        out.extend(np.take_along_axis(top, order, 1).tolist())
    return out


def metrics(
    recs: list[list[int]], pairs: list[tuple[list[int], int]], cold: np.ndarray
) -> dict[str, Any]:
    """R@10 / N@10 (with standard errors) on all test users, on cold and on warm targets; the
    share of cold items among the recommendations."""
    targets = np.array([t for _, t in pairs])
    ranks = ranks_from_lists(recs, targets.tolist())
    is_cold = np.isin(targets, cold)
    cold_set = set(cold.tolist())
    flat = [i for r in recs for i in r[:10]]
    out: dict[str, Any] = {
        **{k: v for k, v in summarize(ranks).items() if k.endswith("@10")},
        **{k: v for k, v in standard_errors(ranks).items() if k.endswith("@10")},
        "cold_share@10": sum(i in cold_set for i in flat) / max(1, len(flat)),
        "cold_targets": int(is_cold.sum()),
    }
    for name, mask in (("cold", is_cold), ("warm", ~is_cold)):
        sub = ranks[mask]
        out[f"recall@10_{name}"] = float((sub < 10).mean()) if len(sub) else 0.0
        out[f"ndcg@10_{name}"] = float(gains_at(sub, 10).mean()) if len(sub) else 0.0
        se = standard_errors(sub) if len(sub) > 1 else {}
        out[f"se_recall@10_{name}"] = se.get("se_recall@10", 0.0)
        out[f"se_ndcg@10_{name}"] = se.get("se_ndcg@10", 0.0)
    return out


def evaluate_coldstart(ws: Any, share: float) -> dict[str, Any]:
    """Run the protocol for the workspace `ws` (training.pipeline.Workspace of the full
    dataset); the warm stages resume from `ws.out / 'coldstart'`."""
    from training import pipeline

    ds = ws.dataset()
    cold = cold_items(ds, share)
    warm_ds, keep = without_items(ds, cold)
    warm_row = np.full(ds.n_items, -1)
    warm_row[keep] = np.arange(len(keep))
    cfg = dataclasses.replace(ws.cfg, ablation=False)
    wws = pipeline.Workspace(
        out=ws.out / "coldstart", cfg=cfg, data_spec=ws.data_spec, progress=ws.progress
    )
    wws._ds = warm_ds
    t0 = time.perf_counter()
    for stage in (pipeline.stage_embed, pipeline.stage_cf, pipeline.stage_tokenizer):
        stage(wws)
    pipeline.stage_lm(wws)
    train_seconds = time.perf_counter() - t0
    bundle = Bundle.load(wws.out)
    vocab: CodeVocab = bundle.vocab
    tokenizer = ItemTokenizer.load(bundle.tokenizer_dir)
    cold_items_fields = [{"item_id": ds.item_ids[i], **ds.items[i]} for i in cold]
    cold_codes = encode_cold(tokenizer, cold_items_fields, bundle.catalogue.codes)
    codes = np.zeros((ds.n_items, vocab.levels), dtype=np.int64)
    codes[keep] = bundle.catalogue.codes
    codes[cold] = cold_codes
    assert len({tuple(r) for r in codes.tolist()}) == ds.n_items, "identifiers must be unique"

    split = leave_one_out(ds, cfg.max_history)
    pairs = split.test
    # Serve as the service does: the bundle's rows first, then the tokenized ones, so the
    # new-item bonus applies to rows >= the warm catalogue's size.
    served = ServedCatalogue(codes, keep, cold, vocab.codebook_size)
    model = load_lm(bundle.lm_dir, cfg.lm.device)
    fit = fit_new_item_bonus(
        model, fit_pairs(split.valid, cfg), served, vocab, cfg.lm.beam_width, ws.progress
    )
    bonus = fit["new_item_bonus"]
    valid = fit_pairs(split.valid, cfg)
    slot_fit = fit_new_item_slots(
        served.search(
            model,
            [h for h, _ in valid],
            vocab,
            cfg.lm.beam_width,
            bonus,
            max(SLOT_GRID),
            ws.progress,
        ),
        valid,
        served,
    )
    slots = NewItemSlots.from_dict(slot_fit["new_item_slots"])
    t1 = time.perf_counter()
    hists = [h for h, _ in pairs]
    searched = served.search(
        model, hists, vocab, cfg.lm.beam_width, bonus, slots.slots, ws.progress
    )
    letter = served.lists(searched, slots)
    eval_seconds = time.perf_counter() - t1
    unboosted = (
        served.recommend(model, hists, vocab, cfg.lm.beam_width, 0.0, ws.progress)
        if bonus > 0
        else served.lists(searched, NewItemSlots())
    )
    sasrec = load_sasrec(wws.stages / "sasrec.pt", cfg.cf.device)
    pop = item_popularity(
        [[int(keep[i]) for i in s] for s in leave_one_out(warm_ds).train], ds.n_items
    )
    emb = np.load(ws.stages / "embeddings.npy") if (ws.stages / "embeddings.npy").exists() else None
    if emb is None:
        pipeline.stage_embed(ws)
        emb = np.load(ws.stages / "embeddings.npy")
    rows = [
        {
            "model": "LETTER",
            "new_item_bonus": bonus,
            "new_item_slots": slots.to_dict(),
            **metrics(letter, pairs, cold),
        },
        {"model": "LETTER (no new-item prior)", **metrics(unboosted, pairs, cold)},
        {"model": "SASRec", **metrics(sasrec_lists(sasrec, pairs, warm_row, keep), pairs, cold)},
        {"model": "Content", **metrics(content_lists(emb, pairs), pairs, cold)},
        {
            "model": "Popularity",
            **metrics([np.argsort(-pop, kind="stable")[:10].tolist()] * len(pairs), pairs, cold),
        },
    ]
    fitted = {"new_item_bonus": bonus, "new_item_slots": slots.to_dict()}
    update_recommend(bundle.root, fitted)
    if (ws.out / "lm" / "config.json").exists():
        full = Bundle.load(ws.out)
        if len(full.catalogue) == ds.n_items:
            full_model = load_lm(full.lm_dir, cfg.lm.device)
            full_trie = ItemTrie.from_codes(full.catalogue.codes, vocab.codebook_size)
            recs = recommend(
                full_model,
                hists,
                full.catalogue.codes,
                full.vocab,
                full_trie,
                10,
                cfg.lm.beam_width,
                progress=ws.progress,
            )
            rows.append({"model": "LETTER (full catalogue)", **metrics(recs, pairs, cold)})
            # The new-item prior carries over: the bundle trained on everything serves later
            # arrivals.
            update_recommend(full.root, fitted)
    return {
        "share": share,
        "cold_items": len(cold),
        "items": ds.n_items,
        "test_users": len(pairs),
        "rule": "newest = fewest interactions made by any user after first visiting the item",
        "rows": rows,
        "new_item_bonus": fit,
        "new_item_slots": slot_fit,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "config": cfg.to_dict(),
    }
