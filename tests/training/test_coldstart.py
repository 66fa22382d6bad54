"""The new-item protocol's split and identifiers: no cold item reaches a training input, and
cold identifiers come from the tokenizer call POST /tokenize makes, unique in the catalogue."""

import numpy as np

from models.new_items import NewItemSlots
from tests.bundlefactory import make_tokenizer, shared_encoder, synthetic_items
from training.coldstart import cold_items, content_lists, encode_cold, metrics, without_items
from training.data import Dataset, leave_one_out


def fixture_dataset() -> Dataset:
    # Items 0..5 are old (visited early by someone); 6 and 7 only ever end a sequence.
    seqs = [[0, 1, 2, 3, 6], [1, 2, 4, 5, 7], [0, 3, 5, 7], [2, 4, 0, 1, 6], [5, 4, 3, 2, 1]]
    items = [{"title": f"item {i}", "description": ""} for i in range(8)]
    return Dataset("fixture", [str(i) for i in range(8)], items, ["u"] * 5, seqs)


def test_cold_items_are_the_newest_by_the_documented_rule() -> None:
    ds = fixture_dataset()
    assert cold_items(ds, 0.125).tolist() == [7]  # 6 and 7 tie at 0 steps after: the later row
    assert cold_items(ds, 0.25).tolist() == [6, 7]


def test_no_cold_item_appears_in_any_training_input() -> None:
    ds = fixture_dataset()
    cold = cold_items(ds, 0.25)
    warm, keep = without_items(ds, cold)
    assert sorted(set(keep.tolist()) | set(cold.tolist())) == list(range(ds.n_items))
    assert warm.item_ids == [ds.item_ids[i] for i in keep]
    split = leave_one_out(warm)
    seen = {keep[i] for s in split.train for i in s}
    seen |= {keep[i] for h, t in split.valid for i in [*h, t]}
    seen |= {keep[i] for h, t in split.test for i in [*h, t]}
    assert not seen & set(cold.tolist())
    # The rest of each sequence stays, in order.
    assert [[keep[i] for i in s] for s in warm.sequences] == [
        [i for i in s if i not in set(cold.tolist())] for s in ds.sequences
    ]


def test_cold_identifiers_are_the_tokenize_calls_and_unique() -> None:
    items = synthetic_items(60, seed=3)
    emb = shared_encoder().encode([f"{it['title']}. {it['description']}" for it in items])
    tok = make_tokenizer(emb, levels=2, codebook_size=16)
    warm_codes = tok.encode(items[:50])
    cold = encode_cold(tok, items[50:], warm_codes)
    # What POST /tokenize computes: the same call with the catalogue's identifiers taken.
    taken = {tuple(r) for r in warm_codes.tolist()}
    direct = tok.encode(items[50:], is_taken=lambda t: tuple(t) in taken)
    assert np.array_equal(cold, direct)
    everything = [tuple(r) for r in np.concatenate([warm_codes, cold]).tolist()]
    assert len(set(everything)) == 60


def test_content_baseline_and_metrics_by_hand() -> None:
    emb = np.eye(12)[:, :12] + 0.0
    emb[11] = emb[3] * 0.9 + emb[2] * 0.1  # item 11 (cold) reads like item 3
    pairs = [([1, 3], 11), ([5], 0)]
    recs = content_lists(emb, pairs, recent=1)
    assert recs[0][0] == 11 and 3 not in recs[0]  # the history is excluded
    m = metrics(recs, pairs, np.array([11]))
    assert m["cold_targets"] == 1
    assert m["recall@10_cold"] == 1.0 and m["ndcg@10_cold"] == 1.0
    assert m["recall@10_warm"] == 1.0  # item 0 is somewhere in the 10 of 11 remaining


def _tiny_lm(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from models.vocab import CodeVocab
    from tests.lmfactory import make_tiny_llama, random_catalogue

    vocab = CodeVocab(levels=2, codebook_size=8, history_items=4)
    path = make_tiny_llama(vocab, tmp_path, init_std=0.2)
    model = AutoModelForCausalLM.from_pretrained(path).to(torch.float64).eval()
    return model, vocab, random_catalogue(40, 2, 8, seed=4)


def test_served_catalogue_puts_tokenized_rows_last_and_maps_back(tmp_path) -> None:
    from training.coldstart import ServedCatalogue

    model, vocab, codes = _tiny_lm(tmp_path)
    cold = np.array([3, 17, 30])
    keep = np.setdiff1d(np.arange(40), cold)
    served = ServedCatalogue(codes, keep, cold, vocab.codebook_size)
    assert served.order[-3:].tolist() == cold.tolist()
    assert (served.order[served.row] == np.arange(40)).all()
    hists = [[1, 3], [17, 2, 5]]
    lifted = served.recommend(model, hists, vocab, beam_width=40, bonus=1000.0)
    plain = served.recommend(model, hists, vocab, beam_width=40, bonus=0.0)
    for got in lifted:
        assert sorted(got[:3]) == cold.tolist()  # dataset rows, the cold ones first
    assert any(set(p[:3]) != set(cold.tolist()) for p in plain)


def test_bonus_fit_follows_the_validation_targets(tmp_path) -> None:
    """Users who go on to pick cold items want a bonus; users who pick warm ones do not (a
    tie or a loss keeps the smaller value, 0)."""
    from training.coldstart import ServedCatalogue, fit_new_item_bonus

    model, vocab, codes = _tiny_lm(tmp_path)
    cold = np.array([3, 17, 30])
    keep = np.setdiff1d(np.arange(40), cold)
    served = ServedCatalogue(codes, keep, cold, vocab.codebook_size)
    rng = np.random.default_rng(0)
    hists = [rng.choice(keep, 3).tolist() for _ in range(12)]
    to_cold = [(h, int(cold[i % 3])) for i, h in enumerate(hists)]
    fit = fit_new_item_bonus(model, to_cold, served, vocab, 40, grid=(0.0, 1000.0))
    assert fit["new_item_bonus"] == 1000.0 and fit["cold_targets"] == 12
    assert fit["grid"][1]["recall@10_cold"] == 1.0 and fit["gain_ndcg@10"] > 0
    plain = served.recommend(model, hists, vocab, 40, 0.0)
    to_top = [(h, p[0]) for h, p in zip(hists, plain, strict=True) if p[0] not in cold]
    fit = fit_new_item_bonus(model, to_top, served, vocab, 40, grid=(0.0, 1000.0))
    assert fit["new_item_bonus"] == 0.0
    # A gain within noise keeps no bonus: one user gains, the rest (warm targets outside both
    # top-10s) neither gain nor lose.
    far = [(h, next(i for i in keep if i not in p)) for h, p in zip(hists, plain, strict=True)]
    fit = fit_new_item_bonus(model, far + to_cold[:1], served, vocab, 40, grid=(0.0, 1000.0))
    assert fit["best_on_validation"] == 1000.0 and fit["gain_ndcg@10"] > 0
    assert fit["new_item_bonus"] == 0.0


def test_slot_fit_serves_slots_for_cold_targets_within_the_cost() -> None:
    """Hand-made searches: users whose targets are cold items the main search misses get a slot
    (the cold targets found, the warm ones at places 1-9 kept); users whose targets sit at the
    last place, where a slot would displace them, keep none (the cost exceeds the budget)."""
    from training.coldstart import Searched, ServedCatalogue, fit_new_item_slots

    cold = np.array([30, 31])
    keep = np.setdiff1d(np.arange(40), cold)
    codes = np.stack(np.unravel_index(np.arange(40), (4, 4, 4)), axis=1)
    served = ServedCatalogue(codes, keep, cold, 4)
    main = list(range(10))  # served rows 0..9 (warm), scores -1..-10
    searched = Searched(
        [main] * 4, [[-1.0 - j for j in range(10)]] * 4, [[38, 39]] * 4, [[-12.0, -13.0]] * 4
    )
    # Served rows 38, 39 are the dataset's cold rows 30, 31.
    assert served.order[38:].tolist() == cold.tolist()
    to_cold = [([0], 30), ([0], 31), ([0], int(served.order[0])), ([0], int(served.order[1]))]
    fit = fit_new_item_slots(searched, to_cold, served, slot_grid=(1, 2), margin_grid=(1.0, 8.0))
    assert fit["new_item_slots"] == {"slots": 2, "margin": 8.0}  # margin 1 admits nothing
    assert fit["gain_recall@10_cold"] == 1.0 and fit["cold_targets"] == 2
    assert fit["median_gap"] == 2.0  # the last main item -10, the best new item -12
    # One cold target found against three warm targets at the last place lost: too costly.
    at_last = [([0], 30)] + [([0], int(served.order[9]))] * 3
    fit = fit_new_item_slots(searched, at_last, served, slot_grid=(1,), margin_grid=(8.0,))
    assert fit["grid"][1]["recall@10_cold"] == 1.0
    assert fit["grid"][1]["ndcg@10"] < 0.98 * fit["grid"][0]["ndcg@10"]
    assert fit["new_item_slots"] == {"slots": 0, "margin": 0.0}
    lists = served.lists(searched, NewItemSlots(1, 8.0))
    assert lists[0][-1] == 30 and lists[0][:9] == served.order[:9].tolist()
