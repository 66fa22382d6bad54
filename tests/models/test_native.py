"""The native step-attention kernel (models/native) against the fused decoder's torch path.

Both run float32 (the kernel's only dtype), so they agree to float32 rounding, not bit for bit:
the kernel sums in another order and exponentiates with the C library's vector expf.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from models import native
from models.beam import beam_search
from models.fused_decoder import FusedDecoder
from models.trie import ItemTrie
from models.vocab import CodeVocab
from tests.lmfactory import random_catalogue, tiny_llama_config
from tests.models.test_fused_decoder import VOCAB, _check_steps, _randomise_norms, llama, prompts
from tests.models.test_fused_decoder import qwen2 as qwen2_64

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
F32 = dict(atol=3e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_loader(monkeypatch, tmp_path_factory):
    """Each test sees the loader as a new process would (one shared build directory)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("LETTERREC_NATIVE_DIR", str(tmp_path_factory.getbasetemp() / "native"))
    monkeypatch.delenv("LETTERREC_NATIVE", raising=False)


def _pair(model) -> tuple[FusedDecoder, FusedDecoder]:
    return FusedDecoder(model, use_native=False), FusedDecoder(model, use_native=True)


@pytest.fixture(scope="module")
def catalogue() -> np.ndarray:
    return random_catalogue(800, VOCAB.levels, VOCAB.codebook_size, seed=5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: llama(kv_heads=2, dtype=torch.float32),  # grouped-query attention
        lambda: llama(kv_heads=4, dtype=torch.float32),
        lambda: qwen2_64().float(),  # q/k/v biases
    ],
    ids=["gqa", "mha", "qwen2"],
)
def test_steps_equal_the_torch_path(make, catalogue):
    torch_path, kernel = _pair(make())
    assert kernel.native is not None and torch_path.native is None
    _check_steps(torch_path, kernel, prompts(24, seed=3, catalogue=catalogue), VOCAB, tol=F32)


def test_ancestors_follow_beams_across_five_levels():
    """Three reorders with parents that cross beams: the kernel reads each beam's own tokens
    through ancestor indices where the torch path copies the K/V."""
    vocab = CodeVocab(levels=5, codebook_size=16, history_items=6)
    cfg = tiny_llama_config(vocab, hidden=64, layers=2, heads=2, kv_heads=1)  # head dim 32
    torch.manual_seed(2)
    model = _randomise_norms(LlamaForCausalLM(cfg), 2).eval()
    cat = random_catalogue(200, vocab.levels, vocab.codebook_size, seed=1)
    rng = np.random.default_rng(0)
    ps = [vocab.prompt(cat[rng.integers(0, 200, size=m)]) for m in (0, 3, 6, 9, 2)]
    _check_steps(*_pair(model), ps, vocab, tol=F32)


def test_beam_search_results_equal_the_torch_path(catalogue):
    torch_path, kernel = _pair(llama(seed=4, dtype=torch.float32))
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    ps = prompts(60, seed=9, catalogue=catalogue)
    excludes = [frozenset(range(i, 800, 7)) if i % 3 == 0 else frozenset() for i in range(60)]
    want = beam_search(torch_path, ps, trie, VOCAB, 20, 10, excludes)
    got = beam_search(kernel, ps, trie, VOCAB, 20, 10, excludes)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)


def test_loading_the_kernel_keeps_denormals():
    """Built with -ffast-math but linked without it: no flush-to-zero for the whole process."""
    assert native.load() is not None
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 2.0).item() > 0.0


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LETTERREC_NATIVE", "0")
    model = llama(dtype=torch.float32)
    assert FusedDecoder(model).native is None
    with pytest.raises(RuntimeError, match="could not be built"):
        FusedDecoder(model, use_native=True)


def test_a_failed_build_falls_back_to_torch(monkeypatch, tmp_path, caplog, catalogue):
    monkeypatch.setenv("LETTERREC_NATIVE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="models.native"):
        decoder = FusedDecoder(llama(dtype=torch.float32))
    assert decoder.native is None
    assert "native kernels not built" in caplog.text
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    out = beam_search(decoder, prompts(4, seed=1, catalogue=catalogue), trie, VOCAB, 5, 3)
    assert (out.items >= 0).all()


def test_other_dtypes_keep_the_torch_path():
    assert FusedDecoder(llama(dtype=torch.float64)).native is None
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        FusedDecoder(llama(dtype=torch.float64), use_native=True)


def test_decoder_kinds_choose_the_path():
    from models.decoders import make_decoder

    model = llama(dtype=torch.float32)
    assert make_decoder(model).native is not None
    assert make_decoder(model, "fused-torch").native is None


def test_a_prebuilt_library_is_loaded_without_a_compiler(monkeypatch, tmp_path, catalogue):
    """What the CPU image does: `python -m models.native build` ahead, LETTERREC_NATIVE_LIB at
    run time, no compiler there."""
    import subprocess
    import sys

    lib = tmp_path / "kernels.so"
    subprocess.run([sys.executable, "-m", "models.native", "build", str(lib)], check=True)
    assert lib.stat().st_mode & 0o444 == 0o444  # readable by an image's non-root user
    monkeypatch.setenv("LETTERREC_NATIVE_LIB", str(lib))
    monkeypatch.setenv("LETTERREC_NATIVE_LIB_CPU_FLAGS", " ".join(sorted(native.cpu_flags())[:3]))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LETTERREC_NATIVE_DIR", str(tmp_path / "cache"))
    model = llama(dtype=torch.float32)
    kernel = FusedDecoder(model)
    assert kernel.native is not None
    assert not (tmp_path / "cache").exists()  # nothing compiled
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    ps = prompts(12, seed=4, catalogue=catalogue)
    want = beam_search(FusedDecoder(model, use_native=False), ps, trie, VOCAB, 10, 5)
    got = beam_search(kernel, ps, trie, VOCAB, 10, 5)
    assert torch.equal(got.items, want.items)


def test_a_prebuilt_library_for_other_cpus_is_not_loaded(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LETTERREC_NATIVE_LIB", str(tmp_path / "never-opened.so"))
    monkeypatch.setenv("LETTERREC_NATIVE_LIB_CPU_FLAGS", "sse2 no_such_cpu_flag")
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LETTERREC_NATIVE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="models.native"):
        assert FusedDecoder(llama(dtype=torch.float32)).native is None
    assert "no_such_cpu_flag" in caplog.text


@pytest.mark.parametrize("threads", [1, 3])
def test_users_split_across_threads_give_the_same_results(threads, catalogue):
    """With several torch threads the kernels run on contiguous user ranges in parallel
    (uneven parts with 3); each range must compute exactly its own users."""
    torch_path, kernel = _pair(llama(seed=8, dtype=torch.float32))
    trie = ItemTrie.from_codes(catalogue, VOCAB.codebook_size)
    ps = prompts(17, seed=12, catalogue=catalogue)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = beam_search(torch_path, ps, trie, VOCAB, 10, 5)
        torch.set_num_threads(threads)
        got = beam_search(kernel, ps, trie, VOCAB, 10, 5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)
