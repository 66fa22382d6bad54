"""The recommender end to end on data whose answer is known, and its saved format."""

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.recommender import RecommenderConfig, build_model, save_lm, token_strings
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import random_catalogue
from training.lm import (
    LMTrainConfig,
    evaluate_pairs,
    ranking_guided_loss,
    residual_dropout,
    train_lm,
    windows,
)
from training.metrics import ranks_from_lists, recall_at

N_ITEMS = 40
VOCAB = CodeVocab(levels=2, codebook_size=8, history_items=5)


def successor_data(seed: int = 0):
    """Users walk the catalogue: item i is always followed by item i + 1 (mod N)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(300):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(4, 9))
        seqs.append([(start + j) % N_ITEMS for j in range(length)])
    train = [s[:-2] for s in seqs]
    valid = [(s[:-2][-5:], s[-2]) for s in seqs]
    test = [(s[:-1][-5:], s[-1]) for s in seqs]
    return train, valid, test


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, test = successor_data()
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=32, layers=2, heads=2, intermediate=64, dropout=0.0),
        epochs=40,
        batch_size=64,
        lr=5e-3,
        window_items=6,
        eval_every=10,
        eval_users=100,
        patience=10,
        beam_width=10,
    )
    result = train_lm(train, valid, codes, VOCAB, cfg, progress=False)
    return result, codes, test


@pytest.mark.parametrize(("min_epochs", "ran"), [(0, 3), (5, 5)])
def test_early_stopping_waits_for_min_epochs(monkeypatch, min_epochs, ran):
    # Validation NDCG only falls after epoch 1: patience 2 stops after epoch 3, unless
    # min_epochs asks for more; the best (epoch 1) weights are kept either way.
    import training.lm as lm

    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    monkeypatch.setattr(lm, "evaluate_pairs", lambda *a, **k: ({"ndcg@10": next(scores)}, []))
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, _ = successor_data()
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32),
        epochs=6,
        batch_size=256,
        window_items=6,
        eval_every=1,
        patience=2,
        min_epochs=min_epochs,
    )
    result = train_lm(train, valid, codes, VOCAB, cfg, progress=False)
    assert result.epochs == ran == len(result.history)
    assert result.valid == {"ndcg@10": 0.5}


def test_learns_the_successor_rule(trained):
    result, codes, test = trained
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    metrics, recs = evaluate_pairs(result.model, test, codes, VOCAB, trie, beam_width=10)
    ranks = ranks_from_lists(recs, [t for _, t in test])
    assert recall_at(ranks, 1) >= 0.95, metrics
    assert all(len(r) == 10 and len(set(r)) == 10 for r in recs)


def test_saved_lm_loads_with_transformers_and_gives_the_same_logits(tmp_path, trained):
    result, _, _ = trained
    path = save_lm(result.model, VOCAB, tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[VOCAB.bos_id, 3, 11 + 3, 5]])
    with torch.no_grad():
        assert torch.allclose(result.model(ids).logits, loaded(ids).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(path)
    strings = token_strings(VOCAB)
    assert tok.convert_ids_to_tokens(list(range(VOCAB.vocab_size))) == strings
    assert tok("<bos> <a_0> <b_7>")["input_ids"] == [
        VOCAB.bos_id,
        VOCAB.level_start(0),
        VOCAB.level_start(1) + 7,
    ]
    assert loaded.generation_config.max_new_tokens == VOCAB.levels


def test_windows_cover_every_item_once():
    codes = np.arange(20).reshape(10, 2) % 8
    wins = windows([[0, 1, 2, 3, 4, 5, 6]], codes, VOCAB, window_items=3)
    # cut from the end: [4,5,6], [1,2,3], [0]
    assert [len(w) for w in wins] == [7, 7, 3]
    assert all(w[0] == VOCAB.bos_id for w in wins)


def test_ranking_guided_loss_is_ce_of_scaled_logits():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    target = torch.tensor([[0]])
    for tau in (1.0, 0.5):
        z = logits[0, 0] / tau
        expected = -(z[0] - torch.logsumexp(z, 0))
        assert ranking_guided_loss(logits, target, tau, -100).item() == pytest.approx(
            expected.item(), abs=1e-6
        )
    # a smaller tau puts more weight on the hard negative -> larger loss when it is wrong
    wrong = torch.tensor([[[0.0, 1.0, -1.0]]])
    assert ranking_guided_loss(wrong, target, 0.5, -100) > ranking_guided_loss(
        wrong, target, 1.0, -100
    )


def test_residual_dropout_acts_in_training_only_and_comes_off() -> None:
    cfg = RecommenderConfig(hidden=32, layers=2, heads=2, intermediate=64, dropout=0.0)
    model = build_model(cfg, VOCAB, seed=0)
    ids = torch.randint(VOCAB.code_offset, VOCAB.vocab_size, (3, 7))
    model.eval()
    ref = model(input_ids=ids).logits
    hooks = residual_dropout(model, 0.5)
    assert len(hooks) == 1 + 2 * cfg.layers  # embeddings, then attention and MLP per layer
    assert torch.equal(model(input_ids=ids).logits, ref)  # eval: no dropout
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)
    for h in hooks:
        h.remove()
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)  # train mode, hooks gone
    assert residual_dropout(model, 0.0) == []


def test_training_with_residual_dropout_leaves_no_hooks() -> None:
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, _ = successor_data()
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32, dropout=0.0),
        epochs=1,
        batch_size=64,
        window_items=6,
        eval_users=20,
        hidden_dropout=0.3,
    )
    model = train_lm(train[:50], valid[:20], codes, VOCAB, cfg, progress=False).model
    assert all(not m._forward_hooks for m in model.modules())


def test_ema_weights_are_validated_and_kept(monkeypatch) -> None:
    # The model that validation scores, and the one returned, is the exponential moving average
    # of the weights after every optimiser step: e_1 = p_1, e_t = d e_{t-1} + (1 - d) p_t.
    import training.lm as lm

    decay = 0.8
    seen: list[dict[str, torch.Tensor]] = []
    steps: list[list[torch.Tensor]] = []

    def record(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return {"ndcg@10": 1.0 / len(seen)}, []

    def after_step(opt, *_):
        steps.append([p.detach().clone() for g in opt.param_groups for p in g["params"]])

    monkeypatch.setattr(lm, "evaluate_pairs", record)
    handle = register_optimizer_step_post_hook(after_step)
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, _ = successor_data()
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32),
        epochs=2,
        batch_size=64,
        lr=1e-2,
        window_items=6,
        eval_every=1,
        ema=decay,
        hidden_dropout=0.1,
    )
    try:
        result = train_lm(train, valid, codes, VOCAB, cfg, progress=False)
    finally:
        handle.remove()
    per_epoch = len(steps) // 2
    assert per_epoch > 1 and len(seen) == 2
    names = [k for k, p in result.model.named_parameters() if p.requires_grad]
    expected = [p.clone() for p in steps[0]]
    for step in steps[1:per_epoch]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, step, strict=True)]
    for name, want in zip(names, expected, strict=True):
        assert torch.allclose(seen[0][name], want, atol=1e-6), name
    raw = zip(names, steps[per_epoch - 1], strict=True)
    assert any(not torch.allclose(seen[0][n], last) for n, last in raw)
    # epoch 1 validated best, so its averaged weights are the returned model's
    for name, p in result.model.named_parameters():
        assert torch.equal(p.detach(), seen[0][name]), name
    assert all(not m._forward_hooks for m in result.model.modules())


def test_ema_decay_out_of_range_is_refused() -> None:
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, _ = successor_data()
    cfg = LMTrainConfig(model=RecommenderConfig(hidden=16, layers=1, heads=2), ema=1.0)
    with pytest.raises(ValueError, match="lm.ema"):
        train_lm(train, valid, codes, VOCAB, cfg, progress=False)


def test_tied_embeddings_train_save_and_decode_as_one_matrix(tmp_path) -> None:
    from models.beam import beam_search
    from models.decoders import SharedPrefixDecoder
    from models.fused_decoder import FusedDecoder

    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, test = successor_data()
    mcfg = RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32, tie_embeddings=True)
    cfg = LMTrainConfig(model=mcfg, epochs=1, batch_size=64, window_items=6, eval_users=20)
    model = train_lm(train, valid[:20], codes, VOCAB, cfg, progress=False).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(save_lm(model, VOCAB, tmp_path / "lm")).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[VOCAB.bos_id, 3, 11 + 3, 5]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    trie = ItemTrie.from_codes(codes, VOCAB.codebook_size)
    prompts = [VOCAB.prompt(codes[h]) for h, _ in test[:30]]
    want = beam_search(SharedPrefixDecoder(loaded), prompts, trie, VOCAB, 10, 5)
    got = beam_search(FusedDecoder(loaded), prompts, trie, VOCAB, 10, 5)
    assert torch.equal(got.items, want.items)
    # untied (the default): two matrices
    untied = build_model(RecommenderConfig(hidden=16, layers=1, heads=2), VOCAB)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_repeat_flags_follow_the_windows_and_count_earlier_items() -> None:
    from training.lm import repeat_flags, token_weights

    train = [[1, 2, 1, 3, 3], [4]]
    flags = repeat_flags(train, window_items=3)  # a repeat of the previous 2 items
    # windows from the end: items [1, 3, 3] (1 repeats the 1 two back, before the window)
    # and [1, 2]; then [4]
    assert [f.tolist() for f in flags] == [[True, False, True], [False, False], [False]]
    codes = random_catalogue(5, VOCAB.levels, VOCAB.codebook_size, seed=0)
    wins = windows(train, codes, VOCAB, 3)
    assert [len(w) - 1 for w in wins] == [VOCAB.levels * len(f) for f in flags]
    assert token_weights(flags[0], 2, 3.0).tolist() == [3, 3, 1, 1, 3, 3]
    assert [f.tolist() for f in repeat_flags(train, 3, per_user=1)] == [
        [True, False, True],
        [False],
    ]


def test_weighted_loss_is_the_weighted_mean_of_token_losses() -> None:
    from training.lm import lm_loss

    torch.manual_seed(0)
    model = build_model(RecommenderConfig(hidden=16, layers=1, heads=2), VOCAB).eval()
    ids = torch.tensor([[VOCAB.bos_id, 3, 11, 4, 12], [VOCAB.bos_id, 5, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    plain = lm_loss(model, ids, mask, 1.0, VOCAB.pad_id)
    ones = torch.ones(2, 4)
    torch.testing.assert_close(lm_loss(model, ids, mask, 1.0, VOCAB.pad_id, ones), plain)
    w = torch.tensor([[3.0, 3.0, 1.0, 1.0], [1.0, 1.0, 7.0, 7.0]])  # padding weights ignored
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    real = mask[:, 1:].bool()
    want = (nll * w)[real].sum() / w[real].sum()
    torch.testing.assert_close(lm_loss(model, ids, mask, 1.0, VOCAB.pad_id, w), want)


def test_training_with_a_repeat_weight_runs_and_logs_the_share(caplog) -> None:
    import logging

    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, _ = successor_data()
    train = [s + s[:2] for s in train[:60]]  # every user revisits its first two items
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32),
        epochs=1,
        batch_size=32,
        window_items=6,
        eval_users=10,
        repeat_weight=3.0,
    )
    with caplog.at_level(logging.INFO, logger="training.lm"):
        result = train_lm(train, valid[:10], codes, VOCAB, cfg, progress=False)
    assert np.isfinite(result.history[0]["loss"])
    assert "repeat targets" in caplog.text and "loss weight 3" in caplog.text


def test_context_windows_show_earlier_items_without_scoring_them() -> None:
    from training.lm import context_flags, repeat_flags, token_weights

    train = [[0, 1, 2, 3, 4, 5, 6]]
    codes = np.arange(20).reshape(10, 2) % 8
    # targets cut from the end as before ([4,5,6], [1,2,3], [0]), each after up to 2 items
    wins = windows(train, codes, VOCAB, window_items=3, context_items=2)
    tok = VOCAB.tokens(codes)
    assert [w[1:].tolist() for w in wins] == [
        tok[[2, 3, 4, 5, 6]].reshape(-1).tolist(),
        tok[[0, 1, 2, 3]].reshape(-1).tolist(),
        tok[[0]].reshape(-1).tolist(),
    ]
    ctx = context_flags(train, 3, context_items=2)
    assert [c.tolist() for c in ctx] == [
        [True, True, False, False, False],
        [True, False, False, False],
        [False],
    ]
    flags = repeat_flags([[1, 2, 1, 3, 3]], 3, context_items=2)
    assert [f.tolist() for f in flags] == [[False, False, True, False, True], [False, False]]
    w = token_weights(flags[0], 2, 3.0, context_flags([[1, 2, 1, 3, 3]], 3, 0, 2)[0])
    assert w.tolist() == [0, 0, 0, 0, 3, 3, 1, 1, 3, 3]
    # every item is still a target exactly once per epoch
    assert int((~np.concatenate(ctx)).sum()) == len(train[0])


def test_context_items_let_a_one_item_window_learn_to_copy() -> None:
    """With window_items=1 every target is alone in its window: without context the model
    cannot see the item it should repeat; with context it learns to copy it."""
    rng = np.random.default_rng(0)
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=5)
    # every user visits a random item, then a second random one, then the first again
    seqs = [[int(a), int(b), int(a)] for a, b in rng.integers(0, N_ITEMS, (440, 2)) if a != b]
    train = seqs[:-40]
    valid = [(s[:2], s[0]) for s in seqs[-40:]]  # users not seen in training
    found = {}
    for context in (0, 2):
        cfg = LMTrainConfig(
            model=RecommenderConfig(hidden=32, layers=2, heads=2, intermediate=64),
            epochs=30,
            batch_size=64,
            lr=3e-3,
            window_items=1,
            context_items=context,
            eval_every=30,
            eval_users=40,
        )
        result = train_lm(train, valid, codes, VOCAB, cfg, progress=False)
        found[context] = result.valid["ndcg@5"]
    assert found[2] > 0.8 > 0.4 > found[0], found


def test_windows_longer_than_the_model_positions_are_refused() -> None:
    codes = random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=3)
    train, valid, _ = successor_data()
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=16, layers=1, heads=2, intermediate=32),
        epochs=1,
        window_items=21,
        context_items=20,  # 1 + 41 * 2 = 83 tokens > 64 positions (history_items 5)
    )
    with pytest.raises(ValueError, match="context_items = 41 items.*max_position_embeddings 64"):
        train_lm(train, valid[:5], codes, VOCAB, cfg, progress=False)


def test_bf16_only_where_the_cpu_computes_it_natively() -> None:
    from training.lm import native_bf16

    cpu = torch.device("cpu")
    assert native_bf16(cpu, "flags : fpu sse avx2 avx512f avx512_bf16 amx_tile")
    assert native_bf16(cpu, "flags : fpu avx2 amx_bf16 amx_tile")
    # AVX2 or plain AVX-512 only: bfloat16 would be emulated, far slower than float32.
    assert not native_bf16(cpu, "flags : fpu sse avx2 fma")
    assert not native_bf16(cpu, "flags : fpu avx2 avx512f avx512bw")
