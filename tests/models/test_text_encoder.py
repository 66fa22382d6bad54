import numpy as np
import pytest

from models.text_encoder import TextEncoder, resolve_encoder_path
from tests.bundlefactory import shared_encoder


def test_minilm_matches_sentence_transformers_pipeline():
    st = pytest.importorskip("sentence_transformers")
    enc = shared_encoder()
    texts = ["Toy Story. Animation, Comedy", "a much longer text " * 20, "x"]
    ours = enc.encode(texts)
    ref = st.SentenceTransformer(str(enc.path), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == (3, 384)
    assert np.allclose(ours, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_same_text_same_embedding_whatever_the_batch():
    enc = shared_encoder()
    alone = enc.encode(["Pizza place. Italian, Pizza"])
    batched = enc.encode(["short", "Pizza place. Italian, Pizza", "a longer text " * 10])
    assert np.allclose(alone[0], batched[1], atol=1e-5)


def test_unknown_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a known alias"):
        resolve_encoder_path(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a known alias"):
        TextEncoder("bert-base-uncased")  # hub names cannot be downloaded offline
