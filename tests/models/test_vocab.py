"""The code vocabulary layout: the from-scratch default and an LLM's prompt template."""

import numpy as np
import pytest

from models.vocab import CodeVocab

OLD_MANIFEST_VOCAB = {
    "levels": 2,
    "codebook_size": 4,
    "history_items": 2,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "code_offset": 3,
}


def test_an_existing_manifest_loads_and_saves_unchanged():
    vocab = CodeVocab.from_dict(OLD_MANIFEST_VOCAB)
    assert vocab.to_dict() == OLD_MANIFEST_VOCAB
    # [bos] + codes of the last 2 items: level 0 at 3 + c, level 1 at 7 + c
    assert vocab.prompt(np.array([[0, 0], [1, 2], [3, 1]])) == [1, 4, 9, 6, 8]
    assert vocab.prompt(np.zeros((0, 2))) == [1]
    assert vocab.max_prompt_len == 5


def test_a_template_surrounds_the_history_and_round_trips():
    vocab = CodeVocab(
        levels=2,
        codebook_size=4,
        history_items=2,
        pad_id=5,
        bos_id=6,
        eos_id=5,
        code_offset=10,
        prompt_prefix=(6, 0, 1),
        prompt_suffix=(2, 3),
    )
    assert vocab.prompt(np.array([[1, 2]])) == [6, 0, 1, 11, 16, 2, 3]
    assert vocab.prompt([]) == [6, 0, 1, 2, 3]
    assert vocab.max_prompt_len == 3 + 4 + 2
    d = vocab.to_dict()
    assert d["prompt_prefix"] == [6, 0, 1] and d["prompt_suffix"] == [2, 3]
    assert CodeVocab.from_dict(d) == vocab


@pytest.mark.parametrize("prefix, suffix", [((), (1,)), ((1,), (10,)), ((-1,), ())])
def test_template_ids_must_be_text_tokens(prefix, suffix):
    with pytest.raises(ValueError, match="prompt template ids"):
        CodeVocab(
            levels=2, codebook_size=4, code_offset=10, prompt_prefix=prefix, prompt_suffix=suffix
        )
