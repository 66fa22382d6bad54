"""SubprocessEngine: the torch engine in a spawned child, against the same engine in process."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from models.trie import ItemTrie
from service.engines.base import DecodeRequest
from service.engines.subprocess_engine import DecodeWorkerError, SubprocessEngine
from service.engines.torch_engine import TorchEngine
from tests.lmfactory import make_tiny_llama, random_catalogue
from tests.service.conftest import wait_until
from tests.service.engines.test_torch_engine import VOCAB, requests_for

KW = {"beam_width": 10, "max_batch": 4}


def same(got, want) -> bool:
    """Same items in the same order, scores equal to float32 rounding: the child runs 1 torch
    thread, this process the default, and a GEMM's rounding may depend on its thread count."""
    return [[r.item_index for r in row] for row in got] == [
        [r.item_index for r in row] for row in want
    ] and all(
        abs(a.score - b.score) <= 1e-5
        for x, y in zip(got, want, strict=True)
        for a, b in zip(x, y, strict=True)
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(VOCAB, tmp_path_factory.mktemp("lm"), seed=3)


@pytest.fixture(scope="module")
def engines(model_dir):
    child = SubprocessEngine("torch", threads=1, model_dir=model_dir, vocab=VOCAB, **KW)
    yield TorchEngine(model_dir, VOCAB, **KW), child
    child.close()
    assert child.pid is None


def test_same_results_as_in_process_and_trie_changes_reach_the_child(engines):
    local, child = engines
    codes = random_catalogue(400, VOCAB.levels, VOCAB.codebook_size, seed=2)
    trie = ItemTrie.from_codes(codes[:300], VOCAB.codebook_size)
    reqs = requests_for(codes[:300], 10, seed=0)
    assert same(child.recommend(reqs, trie), local.recommend(reqs, trie))
    # New items and a retired one (what /tokenize does): the next batch sees them.
    for c in codes[300:]:
        trie.add(c.tolist())
    trie.deactivate(0)
    prior = [DecodeRequest([VOCAB.bos_id], k=60)]
    got, want = child.recommend(prior, trie), local.recommend(prior, trie)
    assert same(got, want)
    rows = {r.item_index for r in got[0]}
    assert 0 not in rows and any(r >= 300 for r in rows)
    # A different trie object with the same version is shipped too.
    other = ItemTrie.from_codes(codes[:50], VOCAB.codebook_size)
    assert same(child.recommend(prior, other), local.recommend(prior, other))


def test_an_exception_in_the_child_is_raised_with_its_type(engines):
    _, child = engines
    trie = ItemTrie.from_codes(random_catalogue(30, 3, 16, seed=4), VOCAB.codebook_size)
    with pytest.raises(ValueError, match="request 0: k must be >= 1"):
        child.recommend([DecodeRequest([VOCAB.bos_id], k=0)], trie)
    assert len(child.recommend([DecodeRequest([VOCAB.bos_id], k=2)], trie)[0]) == 2


def test_a_dead_child_fails_nothing_after_it_and_is_replaced(engines):
    local, child = engines
    trie = ItemTrie.from_codes(random_catalogue(30, 3, 16, seed=5), VOCAB.codebook_size)
    req = [DecodeRequest([VOCAB.bos_id], k=3)]
    child.recommend(req, trie)
    old = child.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    # Replaced at once by the watcher thread, before any batch asks for it.
    wait_until(lambda: child.pid not in (None, old) and child._alive(), 60, 0.05)
    assert same(
        child.recommend(req, trie), local.recommend(req, trie)
    )  # the new child got the trie shipped


def test_a_child_that_cannot_build_its_engine_raises_at_start(tmp_path):
    with pytest.raises((OSError, ValueError, DecodeWorkerError)):
        SubprocessEngine("torch", model_dir=tmp_path / "missing", vocab=VOCAB, **KW)


def test_a_hung_child_times_out_and_its_batch_is_decoded_by_a_new_one(model_dir):
    """A child that stops answering (SIGSTOP: alive, not dead) is killed after batch_timeout_s
    instead of blocking for good, and the batch is answered by its replacement."""
    import time

    child = SubprocessEngine(
        "torch", threads=1, batch_timeout_s=2.0, model_dir=model_dir, vocab=VOCAB, **KW
    )
    try:
        trie = ItemTrie.from_codes(random_catalogue(30, 3, 16, seed=6), VOCAB.codebook_size)
        req = [DecodeRequest([VOCAB.bos_id], k=3)]
        want = child.recommend(req, trie)
        old = child.pid
        os.kill(old, signal.SIGSTOP)
        t0 = time.perf_counter()
        assert same(child.recommend(req, trie), want)
        assert 2.0 <= time.perf_counter() - t0 < 60
        assert child.pid not in (None, old)
        # A child that dies under a batch (stopped, then killed: exactly mid-batch) too.
        old = child.pid
        os.kill(old, signal.SIGSTOP)
        threading.Timer(0.3, os.kill, (old, signal.SIGKILL)).start()
        assert same(child.recommend(req, trie), want)
        assert child.pid not in (None, old)
    finally:
        child.close()


def test_a_pool_decodes_batches_side_by_side_with_the_same_answers(model_dir):
    """DecodePool: two children; two batches sent from two threads decode at once (each child
    is seen decoding while the other holds a batch), answers equal the in-process engine's,
    trie changes reach both children, and a killed child is replaced."""
    from service.engines.subprocess_engine import DecodePool

    local = TorchEngine(model_dir, VOCAB, **KW)
    pool = DecodePool("torch", 2, threads=1, model_dir=model_dir, vocab=VOCAB, **KW)
    try:
        assert pool.workers == 2 and len(set(pool.pids)) == 2
        codes = random_catalogue(400, VOCAB.levels, VOCAB.codebook_size, seed=8)
        trie = ItemTrie.from_codes(codes[:300], VOCAB.codebook_size)
        reqs = requests_for(codes[:300], 4, seed=1)
        want = local.recommend(reqs, trie)
        # Hold one child (SIGSTOP) mid-batch: the other must still answer a second batch.
        first = pool._workers[0]
        os.kill(first.pid, signal.SIGSTOP)
        held: list = []
        t = threading.Thread(target=lambda: held.append(pool.recommend(reqs, trie)))
        t.start()
        try:
            # The stopped child took the first batch; the second goes to the idle one.
            for _ in range(100):
                if pool._idle.qsize() == 1:
                    break
                threading.Event().wait(0.05)
            assert same(pool.recommend(reqs, trie), want)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        t.join(30)
        assert held and same(held[0], want)
        for c in codes[300:]:
            trie.add(c.tolist())
        prior = [DecodeRequest([VOCAB.bos_id], k=60)]
        want = local.recommend(prior, trie)
        assert same(pool.recommend(prior, trie), want)
        for worker in pool._workers:  # each child, whether or not the pool picked it last
            assert same(worker.recommend(prior, trie), want)
        old = pool.pids[1]
        os.kill(old, signal.SIGKILL)
        assert same(pool.recommend(prior, trie), want)  # the other child answers meanwhile
        wait_until(lambda: old not in pool.pids and None not in pool.pids, 60, 0.05)
        for worker in pool._workers:
            assert same(worker.recommend(prior, trie), want)
    finally:
        pool.close()
    assert pool.pids == [None, None]
