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


def test_inputs_are_padded_to_a_few_shapes_and_embeddings_do_not_change():
    from models.text_encoder import PAD_MULTIPLE

    enc = shared_encoder()
    texts = ["word " * n for n in range(1, 60)]
    shapes = []
    model = enc._model
    real = model.forward

    def recording(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    model.forward = recording
    try:
        one_by_one = np.stack([enc.encode([t])[0] for t in texts])
    finally:
        model.forward = real
    assert len(shapes) == len(texts)
    lengths = {s[1] for s in shapes}
    assert all(n % PAD_MULTIPLE == 0 for n in lengths) and len(lengths) <= 3
    # the padding is masked: the same as the texts batched together, and unit norm
    assert np.allclose(one_by_one, enc.encode(texts), atol=1e-5)
    assert np.allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)
