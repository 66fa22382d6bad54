"""Decoding benchmark: reference (HF generate + dict trie) vs the torch and vLLM engines.

    python benchmarks/decode.py                       # the moderate default grid (< 15 min, 2 cores)
    python benchmarks/decode.py --ref-batches 1,32,256 --ref-max-items 1000000 \
        --vllm-batches 1,32,256 --vllm-max-items 1000000 --memory-batches 10000 --llm
                                                      # the full grid (hours on 2 cores)
    python benchmarks/decode.py --bundle runs/ml      # a trained bundle on its own catalogue

One model, one process. For each catalogue size it builds the ItemTrie (timed, bytes), draws
users (20 history items each, so prompts are 81 tokens), and measures every engine at every batch
size: users/s, per-batch p50/p99 latency, peak RSS during the row. The reference runs on fewer
batches (it is slow); `identical_to_reference` compares the engines' top-k items (and scores
within a relative 2e-5, SCORE_RTOL) with the reference's on the same inputs. A memory-flatness run decodes many
consecutive batches of varying shapes (with items added along the way) and reports RSS before
and after. `--llm` adds rows for a random ~0.5B-parameter Llama (the LC-Rec case).

The model is a random Llama (--hidden/--layers/--heads) on random catalogues (--items), or with
`--bundle DIR` the bundle's recommender (DIR/lm) on the bundle's whole catalogue, histories drawn
from its rows. Either way the result says which: `model_profile`, `weights`, `model`.

Results: benchmarks/results/decode-<device>.json and .md (schema in DESIGN.md).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    header,
    md_header,
    md_table,
    model_info,
    random_model_info,
    write_result,
)
from models.bundle import Bundle, BundleError  # noqa: E402
from models.fused_decoder import FusedDecoder  # noqa: E402
from models.trie import ItemTrie  # noqa: E402
from models.trie_reference import ReferenceTrie, reference_beam_search  # noqa: E402
from models.vocab import CodeVocab  # noqa: E402
from service.engines import load_engine_class  # noqa: E402
from service.engines.base import DecodeEngine, DecodeRequest  # noqa: E402
from tests.lmfactory import make_tiny_llama, random_catalogue, tiny_llama_config  # noqa: E402

log = logging.getLogger("benchmarks.decode")
VOCAB = CodeVocab(levels=4, codebook_size=256, history_items=20)
# The LC-Rec case: an LLM vocabulary with the code tokens appended after it.
LLM_VOCAB = CodeVocab(levels=4, codebook_size=256, history_items=20, code_offset=32000)


class PeakRss:
    """Samples this process's RSS in a thread; `.peak_mb` is the max since `reset()`."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.proc = psutil.Process()
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def reset(self) -> None:
        self.peak = self.proc.memory_info().rss

    @property
    def peak_mb(self) -> float:
        return max(self.peak, self.proc.memory_info().rss) / 2**20

    def stop(self) -> None:
        self._stop.set()


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def make_requests(codes: np.ndarray, n: int, seed: int, vocab: CodeVocab) -> list[DecodeRequest]:
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, len(codes), size=(n, vocab.history_items))
    return [DecodeRequest(vocab.prompt(codes[h]), k=10) for h in hist]


class ReferenceEngine(DecodeEngine):
    """HF generate + prefix_allowed_tokens_fn over the dict trie (models.trie_reference)."""

    name = "reference"

    def __init__(self, model_dir: Path, vocab: CodeVocab, dtype: str, beam_width: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        self.vocab, self.beam_width = vocab, beam_width
        self.tries: dict[int, ReferenceTrie] = {}

    def recommend(self, requests, trie):  # type: ignore[override]
        ref = self.tries.get(id(trie))
        if ref is None:
            ref = self.tries[id(trie)] = ReferenceTrie.from_codes(
                trie.codes_array(), self.vocab.codebook_size
            )
        items, scores = reference_beam_search(
            self.model,
            [r.prompt for r in requests],
            ref,
            self.vocab,
            self.beam_width,
            max(r.k for r in requests),
            [r.exclude for r in requests],
        )
        return [list(zip(i, s, strict=True)) for i, s in zip(items, scores, strict=True)]


def as_pairs(recs: list[Any]) -> list[tuple[int, float]]:
    return [r if isinstance(r, tuple) else (r.item_index, r.score) for r in recs]


SCORE_RTOL = 2e-5
"""Relative tolerance on scores. A score sums L float32 log-softmax values over the whole
vocabulary; each carries rounding of a few ulps of the largest logit (float32 eps 1.2e-7 times
logits up to ~30, times the V-term sum's log(V) ~ 7-10 in the log-sum-exp), and two correct
implementations that order their sums differently disagree by up to ~1e-5 relative (1.09e-4 was
seen on a score of ~25). Item lists are compared exactly; only scores get this tolerance."""

MAX_DIFF: list[float] = [0.0]
"""The largest absolute score difference among the comparisons behind the headline (float32
rows of the main model): reported beside `identical_to_reference`."""


def same_outputs(
    a: list[list[Any]], b: list[list[Any]], rtol: float = SCORE_RTOL, headline: bool = False
) -> bool:
    """Item lists identical and every score within `rtol` relative (at least 1 in scale);
    `headline`: the comparison counts toward the headline, so its differences go to MAX_DIFF."""
    for ra, rb in zip(a, b, strict=True):
        pa, pb = as_pairs(ra), as_pairs(rb)
        if [i for i, _ in pa] != [i for i, _ in pb]:
            return False
        for (_, x), (_, y) in zip(pa, pb, strict=True):
            if headline:
                MAX_DIFF[0] = max(MAX_DIFF[0], abs(x - y))
            if abs(x - y) > rtol * max(1.0, abs(y)):
                return False
    return True


def time_engine(
    engine: DecodeEngine,
    trie: ItemTrie,
    requests: list[DecodeRequest],
    batch: int,
    n_batches: int,
    rss: PeakRss,
    desc: str,
    warm: bool = True,
) -> tuple[dict[str, float], list[list[Any]]]:
    """Warm up once, then time `n_batches` consecutive batches; outputs of all timed users."""
    if warm:
        engine.recommend(requests[:batch], trie)
    gc.collect()
    rss.reset()
    lat, cpu, outputs = [], [], []
    for i in tqdm(range(n_batches), desc=desc, leave=False):
        chunk = requests[(i * batch) % len(requests) :][:batch]
        chunk = chunk if len(chunk) == batch else requests[:batch]
        t0, c0 = time.perf_counter(), time.process_time()
        outputs.extend(engine.recommend(chunk, trie))
        lat.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    lat_ms = np.array(lat) * 1e3
    return {
        "users_per_s": round(batch * n_batches / float(np.sum(lat)), 2),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "peak_rss_mb": round(rss.peak_mb, 1),
        "n_batches": n_batches,
        # CPU seconds of this process per user: less sensitive than wall time to other load
        # (vLLM works in other processes, so its figure is not comparable).
        "cpu_ms_per_user": round(float(np.sum(cpu)) * 1e3 / (batch * n_batches), 2),
    }, outputs


FLOOR = "dense GEMMs alone (floor, not an engine)"
PAIRED = {
    # name -> (engine, dtype, decoder)
    "reference": ("reference", "float32", ""),
    "torch float32, shared-prefix decoder": ("torch", "float32", "shared"),
    "torch float32, fused decoder in torch ops only": ("torch", "float32", "fused-torch"),
    "torch float32": ("torch", "float32", "auto"),
    "torch bfloat16": ("torch", "bfloat16", "auto"),
}


class GemmFloor:
    """The dense matmuls of one fused-decoder batch, alone: the same weights and shapes as
    `FusedDecoder` (q/k/v, o, gate/up, down per layer; prefill over every prompt token, the last
    layer's output half and the head on the last token only; then L-1 steps over B x W beams),
    on random inputs, with no attention, norms, rotary, masking or beam bookkeeping. Its time is
    a floor for any exact implementation built on this CPU's GEMM: the reference's time over it
    is the largest speed-up such an engine could reach."""

    def __init__(self, decoder: Any, batch: int, prompt_len: int, width: int, steps: int) -> None:
        self.layers, self.head = decoder.layers, decoder.head
        self.steps = steps
        # With a layer-0 table (FusedDecoder.qkv0), layer 0's q/k/v are a lookup, not a GEMM.
        self.layer0_table = getattr(decoder, "qkv0", None) is not None
        hidden = self.head.in_features
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, dtype=decoder.dtype)

        ly = self.layers[0]
        self.sizes = [batch * prompt_len, batch, batch * width]  # prefill, last token, steps
        self.h = [rand(n, hidden) for n in self.sizes]
        self.o = [rand(n, ly.o.in_features) for n in self.sizes]
        self.act = [rand(n, ly.down.in_features) for n in self.sizes]

    def _layer(self, ly: Any, i: int, qkv_rows: int | None = None) -> None:
        # The decoder's own GEMM kernels (`Dense`: matmul or oneDNN) on its weights.
        h = self.h[i]
        if not (self.layer0_table and ly is self.layers[0]):
            _ = ly.qkv(self.h[qkv_rows] if qkv_rows is not None else h)
        ly.o.add(h, self.o[i])
        _ = ly.gu(h)
        ly.down.add(h, self.act[i])

    @torch.inference_mode()
    def run(self) -> None:
        *first, last = self.layers
        for ly in first:
            self._layer(ly, 0)
        self._layer(last, 1, qkv_rows=0)  # K/V for every prompt token, the rest for the last
        _ = self.head(self.h[1])
        for _step in range(self.steps):
            for ly in self.layers:
                self._layer(ly, 2)
            _ = self.head(self.h[2])


def paired_speedup(
    grid: Grid, args, rounds: int = 5, batch: int = 32, n_items: int = 20_000
) -> dict[str, Any]:
    """The reference and the torch engine's variants interleaved batch by batch (each round: one
    reference batch, then two batches of each variant on the same users), so all see the same
    background load; medians per variant, speed-ups as ratios of medians. On a bundle's
    catalogue when the grid has one, else on `n_items` random items."""
    codes = grid.catalogue(n_items)
    trie = ItemTrie.from_codes(codes, grid.vocab.codebook_size)
    requests = make_requests(codes, batch * rounds, seed=11, vocab=grid.vocab)
    engines = {
        name: build_engine(engine, grid, dtype, args, decoder)
        for name, (engine, dtype, decoder) in PAIRED.items()
        if dtype in args.dtypes
    }
    for name, engine in engines.items():
        if name != "reference":
            engine.recommend(requests[:batch], trie)
    fused = getattr(engines.get("torch float32"), "decoder", None)
    floor = None
    if isinstance(fused, FusedDecoder):
        floor = GemmFloor(fused, batch, len(requests[0].prompt), args.beam, grid.vocab.levels - 1)
        floor.run()
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    if floor is not None:
        seconds[FLOOR] = []
    same = {name: True for name in engines if name != "reference"}
    for r in tqdm(range(rounds), desc="paired reference/torch"):
        chunk = requests[r * batch : (r + 1) * batch]
        want: list[list[Any]] = []
        for name, engine in engines.items():
            for _ in range(1 if name == "reference" else 2):
                t0 = time.perf_counter()
                got = engine.recommend(chunk, trie)
                seconds[name].append(time.perf_counter() - t0)
            if name == "reference":
                want = got
            else:
                # The headline is the float32 fused decoder's (the engine served by default).
                same[name] = same[name] and same_outputs(
                    got, want, headline=name == "torch float32"
                )
        if floor is not None:
            for _ in range(2):
                t0 = time.perf_counter()
                floor.run()
                seconds[FLOOR].append(time.perf_counter() - t0)
    for engine in engines.values():
        engine.close()
    ref = float(np.median(seconds["reference"]))
    variants = [
        {
            "variant": name,
            "users_per_s": round(batch / float(np.median(s)), 2),
            "speedup": round(ref / float(np.median(s)), 1),
            "identical_to_reference": same.get(name),
        }
        for name, s in seconds.items()
    ]
    fast = next(v for v in variants if v["variant"] == "torch float32")
    floor_row = next((v for v in variants if v["variant"] == FLOOR), None)
    return {
        "model": grid.model_name,
        "items": len(codes),
        "batch": batch,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "variants": variants,
        "reference_users_per_s": variants[0]["users_per_s"],
        "torch_users_per_s": fast["users_per_s"],
        "speedup": fast["speedup"],
        "identical_to_reference": fast["identical_to_reference"],
        "gemm_floor_speedup": floor_row["speedup"] if floor_row else None,
        "share_of_floor": (
            round(float(fast["speedup"]) / float(floor_row["speedup"]), 3) if floor_row else None  # type: ignore[arg-type]
        ),
    }


def fresh_codes(codes: np.ndarray, vocab: CodeVocab, n: int, seed: int) -> np.ndarray:
    """Up to len(codes) + n random identifiers of `vocab`'s layout (fewer where the code space
    is smaller): candidates for items added after the catalogue, once those in it are skipped."""
    space = vocab.codebook_size**vocab.levels
    return random_catalogue(min(space, len(codes) + n), vocab.levels, vocab.codebook_size, seed)


def trie_stats(
    codes: np.ndarray, vocab: CodeVocab = VOCAB, n_adds: int = 1000
) -> tuple[ItemTrie, dict[str, Any]]:
    before = rss_mb()
    t0 = time.perf_counter()
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    build = time.perf_counter() - t0
    grown = rss_mb() - before
    fresh = fresh_codes(codes, vocab, n_adds * 2, seed=99)
    probe = ItemTrie.from_bytes(trie.to_bytes())  # time adds on a copy; keep the measured trie
    add_ms: list[float] = []
    for row in fresh.tolist():
        if len(add_ms) == n_adds:
            break
        if probe.lookup(row) is None:
            t0 = time.perf_counter()
            probe.add(row)
            add_ms.append((time.perf_counter() - t0) * 1e3)
    data = trie.to_bytes()
    return trie, {
        "items": len(codes),
        "build_seconds": round(build, 3),
        "bytes": len(data),
        "array_bytes": trie.nbytes(),
        "rss_growth_mb": round(grown, 1),
        "adds": len(add_ms),
        # None when the code space holds no free identifier (a catalogue that fills it).
        "add_ms_mean": round(float(np.mean(add_ms)), 4) if add_ms else None,
        "add_ms_p99": round(float(np.percentile(add_ms, 99)), 4) if add_ms else None,
        "add_ms_max": round(float(np.max(add_ms)), 3) if add_ms else None,
    }


def build_engine(name: str, grid: Grid, dtype: str, args, decoder: str = "") -> DecodeEngine:
    if name == "reference":
        return ReferenceEngine(grid.model_dir, grid.vocab, dtype, args.beam)
    cls: Callable[..., DecodeEngine] = load_engine_class(name)  # each engine's own signature
    max_batch = max(max(b) for b in grid.batches.values())
    extra = {"decoder": decoder} if decoder else {}
    return cls(
        grid.model_dir,
        grid.vocab,
        device=args.device,
        dtype=dtype,
        beam_width=args.beam,
        max_batch=max_batch,
        **extra,
    )


def memory_flatness(
    engine: DecodeEngine, codes: np.ndarray, vocab: CodeVocab, n_batches: int, seed: int = 7
):
    """Many consecutive batches of varying shape, adding an item every 100; RSS over time."""
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    rng = np.random.default_rng(seed)
    fresh = iter(fresh_codes(codes, vocab, n_batches, seed=seed + 1).tolist())
    samples: list[tuple[int, float]] = []
    warm = max(1, n_batches // 10)
    for i in tqdm(range(n_batches), desc="memory flatness"):
        b = int(rng.integers(1, 9))
        reqs = []
        for _ in range(b):
            h = rng.integers(0, len(codes), size=int(rng.integers(0, vocab.history_items + 1)))
            ex = frozenset(h.tolist())
            reqs.append(
                DecodeRequest(vocab.prompt(codes[h]), k=int(rng.integers(1, 21)), exclude=ex)
            )
        engine.recommend(reqs, trie)
        if i % 100 == 99:
            row = next(fresh, None)
            if row is not None and trie.lookup(row) is None:
                trie.add(row)
        if i + 1 == warm or (i + 1) % max(1, n_batches // 10) == 0:
            gc.collect()
            samples.append((i + 1, round(rss_mb(), 1)))
    after_warm = next(mb for n, mb in samples if n >= warm)
    return {
        "batches": n_batches,
        "items": len(codes),
        "batch_sizes": f"1..8, histories 0..{vocab.history_items} items, exclusions, k 1..20, "
        "an add every 100",
        "rss_mb_after_warmup": after_warm,
        "rss_mb_end": samples[-1][1],
        "growth_mb": round(samples[-1][1] - after_warm, 1),
        "samples": samples,
    }


@dataclass
class Grid:
    """One model's measurements: which engines run at which batch sizes, for how long."""

    model_dir: Path
    model_name: str
    vocab: CodeVocab
    items: list[int]
    batches: dict[str, list[int]]  # engine -> batch sizes
    n_batches: dict[str, int]  # engine -> timed batches per row (0: about 320 users, >= 3)
    dtypes: list[str]  # torch engine dtypes
    counts_for_identity: bool = True
    codes: np.ndarray | None = None
    """A bundle's catalogue [n_items, L]: the one catalogue measured (`items` is then its size).
    None: random catalogues of each size in `items`."""

    def timed_batches(self, engine: str, batch: int) -> int:
        return self.n_batches.get(engine) or max(3, 320 // batch)

    def catalogue(self, n_items: int) -> np.ndarray:
        """The bundle's catalogue, or `n_items` random identifiers (seeded by their number)."""
        if self.codes is not None:
            return self.codes
        return random_catalogue(n_items, self.vocab.levels, self.vocab.codebook_size, n_items)


def run_grid(args, grid: Grid, rss: PeakRss, out: dict[str, list[Any]]) -> None:
    max_users = max(b * grid.timed_batches(e, b) for e, bs in grid.batches.items() for b in bs)
    for n_items in grid.items:
        codes = grid.catalogue(n_items)
        trie, stats = trie_stats(codes, grid.vocab)
        out["tries"].append({"model": grid.model_name, **stats})
        log.info("trie %s", stats)
        requests = make_requests(codes, max_users, seed=1, vocab=grid.vocab)
        ref_out: dict[int, list[list[Any]]] = {}
        for engine_name in args.engines:
            limit = {"reference": args.ref_max_items, "vllm": args.vllm_max_items}
            # A bundle's catalogue is the one the users get: every engine measures it.
            if grid.codes is None and n_items > limit.get(engine_name, n_items):
                continue
            for dtype in grid.dtypes if engine_name == "torch" else ["float32"]:
                try:
                    engine = build_engine(engine_name, grid, dtype, args)
                except Exception as err:  # an optional engine (vllm) may be unavailable
                    log.warning("engine %s unavailable: %s", engine_name, err)
                    out["notes"].append(
                        f"{engine_name} ({grid.model_name}): not measured: {err!r}"[:400]
                    )
                    break
                for batch in grid.batches.get(engine_name, []):
                    nb = grid.timed_batches(engine_name, batch)
                    desc = f"{grid.model_name} {engine_name} {dtype} {n_items} b{batch}"
                    # The reference is only slow, not cold: skip its warm-up batch.
                    warm = engine_name != "reference"
                    stats_row, res = time_engine(engine, trie, requests, batch, nb, rss, desc, warm)
                    row = {
                        "engine": engine_name,
                        "dtype": dtype,
                        "model": grid.model_name,
                        "items": n_items,
                        "batch": batch,
                        "beam": args.beam,
                        **stats_row,
                    }
                    if engine_name == "reference":
                        ref_out[batch] = res
                    elif batch in ref_out:
                        n = min(len(ref_out[batch]), len(res))
                        counts = dtype == "float32" and grid.counts_for_identity
                        row["identical_to_reference"] = same_outputs(
                            res[:n], ref_out[batch][:n], headline=counts
                        )
                        if counts:
                            out["identical"].append(row["identical_to_reference"])
                    out["rows"].append(row)
                    log.info("%s", row)
                engine.close()
                del engine
                gc.collect()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--engines", type=words, default=["reference", "torch", "vllm"])
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="measure this bundle's recommender (lm/) on its own catalogue, histories drawn\n"
        "from its rows, instead of a random Llama on random catalogues; --items, --hidden,\n"
        "--layers and --heads do not apply (the catalogue is the bundle's, whole)",
    )
    p.add_argument(
        "--items",
        type=ints,
        default=None,
        help="random catalogue sizes (default 20000,200000,1000000; not with --bundle)",
    )
    p.add_argument("--batches", type=ints, default=[1, 32, 256], help="torch engine batch sizes")
    p.add_argument(
        "--n-batches",
        type=int,
        default=0,
        help="torch timed batches per row (0: about 320 users, at least 3)",
    )
    p.add_argument("--ref-batches", type=ints, default=[1, 32])
    p.add_argument("--ref-n-batches", type=int, default=2)
    p.add_argument(
        "--ref-max-items",
        type=int,
        default=20_000,
        help="largest random catalogue for the reference (its dict trie is slow to build;\n"
        "a bundle's catalogue is always measured)",
    )
    p.add_argument("--vllm-batches", type=ints, default=[1, 32])
    p.add_argument("--vllm-n-batches", type=int, default=3)
    p.add_argument(
        "--vllm-max-items",
        type=int,
        default=20_000,
        help="largest random catalogue for vllm (each catalogue restarts its engine;\n"
        "a bundle's catalogue is always measured)",
    )
    p.add_argument(
        "--dtypes", type=words, default=["float32", "bfloat16"], help="torch engine dtypes"
    )
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--hidden", type=int, default=None, help="random Llama (default 128)")
    p.add_argument("--layers", type=int, default=None, help="random Llama (default 4)")
    p.add_argument("--heads", type=int, default=None, help="random Llama (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--memory-batches", type=int, default=2000)
    p.add_argument("--llm", action="store_true", help="also a random ~0.5B Llama (LC-Rec case)")
    p.add_argument("--llm-batches", type=ints, default=[1, 4])
    p.add_argument("--paired-rounds", type=int, default=5)
    p.add_argument(
        "--paired-only",
        action="store_true",
        help="only the paired reference/torch measurement (batch 32; 20k random items or\n"
        "the bundle's catalogue) and the trie",
    )
    p.add_argument("--out", default="", help="result name (default decode-<device>)")
    p.add_argument("--results", type=Path, default=RESULTS, help="directory of the result files")
    args = p.parse_args(argv)
    random_only = {"--items": args.items, "--hidden": args.hidden}
    random_only.update({"--layers": args.layers, "--heads": args.heads})
    if args.bundle is not None:
        given = [flag for flag, value in random_only.items() if value is not None]
        if given:
            p.error(
                f"{', '.join(given)}: only for the random model; with --bundle the model and "
                "the catalogue are the bundle's (drop them, or drop --bundle)"
            )
    else:
        args.items = args.items or [20_000, 200_000, 1_000_000]
        args.hidden, args.layers = args.hidden or 128, args.layers or 4
        args.heads = args.heads or 4
    return args


def bundle_grid(args, bundle_dir: Path) -> tuple[Grid, dict[str, Any]]:
    """The grid of a bundle's recommender on its whole catalogue, and which model it is
    (benchmarks.common.model_info)."""
    try:
        bundle = Bundle.load(bundle_dir)
    except BundleError as err:
        raise SystemExit(f"--bundle {bundle_dir}: {err}") from err
    if not bundle.has_lm():
        raise SystemExit(
            f"--bundle {bundle_dir}: no recommender ({bundle.lm_dir}/config.json is missing); "
            "train one with `letterrec pipeline` (stage lm) first"
        )
    info = model_info(bundle_dir)
    shape = info["model"]
    codes = bundle.catalogue.codes
    grid = Grid(
        bundle.lm_dir,
        f"{info['model_profile']} llama-{shape['hidden']}d-{shape['layers']}L",
        bundle.vocab,
        [len(codes)],
        {"reference": args.ref_batches, "torch": args.batches, "vllm": args.vllm_batches},
        {"reference": args.ref_n_batches, "torch": args.n_batches, "vllm": args.vllm_n_batches},
        args.dtypes,
        codes=codes,
    )
    return grid, info


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = header()
    head["machine"].update(
        torch_threads=torch.get_num_threads(), load_avg_start=[round(x, 2) for x in os.getloadavg()]
    )
    rss = PeakRss()
    out: dict[str, list[Any]] = {"rows": [], "tries": [], "identical": [], "notes": []}
    t_start = time.time()
    memory = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is not None:
            small, info = bundle_grid(args, args.bundle)
            head.update(info)
        else:
            model_dir = make_tiny_llama(
                VOCAB, Path(tmp) / "lm", hidden=args.hidden, layers=args.layers, heads=args.heads
            )
            small = Grid(
                model_dir,
                f"llama-{args.hidden}d-{args.layers}L",
                VOCAB,
                args.items,
                {"reference": args.ref_batches, "torch": args.batches, "vllm": args.vllm_batches},
                {
                    "reference": args.ref_n_batches,
                    "torch": args.n_batches,
                    "vllm": args.vllm_n_batches,
                },
                args.dtypes,
            )
            head.update(random_model_info(model_dir))
        if args.paired_only:
            out["tries"].append(
                {"model": small.model_name, **trie_stats(small.catalogue(20_000), small.vocab)[1]}
            )
            args.memory_batches, args.llm = 0, False
        else:
            run_grid(args, small, rss, out)
        paired = None
        if {"reference", "torch"} <= set(args.engines) and "float32" in args.dtypes:
            paired = paired_speedup(small, args, rounds=args.paired_rounds)
            out["identical"].append(paired["identical_to_reference"])
            log.info("paired %s", paired)
        if args.memory_batches and "torch" in args.engines:
            engine = build_engine("torch", small, "float32", args)
            codes = small.codes
            if codes is None:
                codes = random_catalogue(20_000, VOCAB.levels, VOCAB.codebook_size, seed=5)
            memory = memory_flatness(engine, codes, small.vocab, args.memory_batches)
            engine.close()
        if args.llm:
            llm = Grid(
                make_llm(Path(tmp) / "llm"),
                "llama-0.5B",
                LLM_VOCAB,
                (args.items or [20_000])[:1],
                {
                    "reference": args.llm_batches[:1],
                    "torch": args.llm_batches,
                    "vllm": args.llm_batches[:1],
                },
                {"reference": 1, "torch": 2, "vllm": 2},
                args.dtypes,
                counts_for_identity=False,
            )
            run_grid(args, llm, rss, out)
    rss.stop()
    head["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        **head,
        "rows": out["rows"],
        # None when nothing was compared: no headline without a comparison.
        "identical_to_reference": all(out["identical"]) if out["identical"] else None,
        "max_score_diff": MAX_DIFF[0] if out["identical"] else None,
        "trie": max(out["tries"], key=lambda t: t["items"]),
        "prompt": {
            "history_items": small.vocab.history_items,
            # [bos] + L codes per history item (CodeVocab.prompt); make_requests fills it.
            "tokens": 1 + small.vocab.history_items * small.vocab.levels,
        },
        "tries": out["tries"],
        "memory": memory,
        "paired": paired,
        "ratios": ratios(out["rows"]),
        "notes": out["notes"],
        "wall_seconds": round(time.time() - t_start, 1),
    }
    name = args.out or f"decode-{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    path = write_result(name, payload, markdown(head, payload, args), args.results)
    log.info("wrote %s", path)


def make_llm(out: Path) -> Path:
    """Random Llama of ~0.5B parameters: an LLM-sized vocabulary plus the code tokens."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(LLM_VOCAB, hidden=1024, layers=24, heads=16, init_std=0.02)
    cfg.intermediate_size = 4096
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    log.info("LLM parameters: %.0fM", sum(p.numel() for p in model.parameters()) / 1e6)
    model.save_pretrained(out)
    return out


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """users/s of each engine row over the reference row with the same model, items, batch."""
    ref = {(r["model"], r["items"], r["batch"]): r for r in rows if r["engine"] == "reference"}
    out = []
    for r in rows:
        key = (r["model"], r["items"], r["batch"])
        if r["engine"] != "reference" and key in ref:
            out.append(
                {
                    "engine": r["engine"],
                    "dtype": r["dtype"],
                    "model": r["model"],
                    "items": r["items"],
                    "batch": r["batch"],
                    "speedup_vs_reference": round(r["users_per_s"] / ref[key]["users_per_s"], 1),
                    "cpu_speedup_vs_reference": round(
                        ref[key]["cpu_ms_per_user"] / r["cpu_ms_per_user"], 1
                    ),
                }
            )
    return out


def markdown(head: dict[str, Any], payload: dict[str, Any], args) -> str:
    m = head["machine"]
    text = md_header("Decoding benchmark", head)
    pr = payload["prompt"]
    if head["model"].get("bundle"):
        what = (
            f"the bundle's recommender on its whole catalogue ({payload['trie']['items']} "
            f"items; --items does not apply), histories of random catalogue rows"
        )
    else:
        what = "random catalogues, random Llama weights (init std 0.2, see tests/lmfactory.py)"
    text += (
        f"Torch threads {m['torch_threads']}; load average at start {m['load_avg_start']}, "
        f"at end {m['load_avg_end']} (other work shared the machine: compare rows of this run "
        f"with each other, not with other runs). Beam {args.beam}, k 10, prompts of "
        f"{pr['tokens']} tokens ({pr['history_items']} history items), {what}. "
        f"Wall time {payload['wall_seconds']} s.\n\n"
        + (
            f"**identical_to_reference (float32): {payload['identical_to_reference']}** (item "
            f"lists exact, scores within {SCORE_RTOL:g} relative; largest score difference "
            f"{payload['max_score_diff']:.2e})\n\n"
            if payload["identical_to_reference"] is not None
            else "No engine was compared with the reference in this run.\n\n"
        )
    )
    cols = [
        "engine",
        "dtype",
        "model",
        "items",
        "batch",
        "beam",
        "users_per_s",
        "p50_ms",
        "p99_ms",
        "peak_rss_mb",
        "n_batches",
        "cpu_ms_per_user",
        "identical_to_reference",
    ]
    text += "## Throughput and latency\n\n" + md_table(payload["rows"], cols)
    if payload["ratios"]:
        text += "\n## Speed-up over the reference (same run)\n\n"
        text += md_table(
            payload["ratios"],
            [
                "engine",
                "dtype",
                "model",
                "items",
                "batch",
                "speedup_vs_reference",
                "cpu_speedup_vs_reference",
            ],
        )
        text += (
            "\n`cpu_speedup_vs_reference` compares CPU seconds of this process per user (vLLM "
            "computes in its own processes, so its CPU figure is not comparable).\n"
        )
    if payload.get("paired"):
        pr = payload["paired"]
        text += (
            f"\n## Paired measurement\n\n{pr['rounds']} rounds on the same {pr['batch']} users "
            f"({pr['items']} items, {pr.get('threads', '?')} torch threads): each round one "
            f"reference batch, then two batches of every torch variant, interleaved so all see "
            f"the same background load. Medians; **torch float32: {pr['speedup']}x the "
            f"reference**, identical outputs: {pr['identical_to_reference']}.\n\n"
        )
        if "variants" in pr:
            text += md_table(
                pr["variants"], ["variant", "users_per_s", "speedup", "identical_to_reference"]
            )
        if pr.get("gemm_floor_speedup"):
            text += (
                f"\nThe floor row times only the dense matmuls of a fused batch (same weights "
                f"and shapes, nothing else): no exact engine on this CPU's GEMM beats "
                f"{pr['gemm_floor_speedup']}x here; the fused decoder reaches "
                f"{100 * pr['share_of_floor']:.0f}% of it.\n"
            )
    text += "\n## Trie\n\n" + md_table(
        payload["tries"],
        [
            "model",
            "items",
            "build_seconds",
            "bytes",
            "array_bytes",
            "rss_growth_mb",
            "add_ms_mean",
            "add_ms_p99",
            "add_ms_max",
        ],
    )
    if payload["memory"]:
        mem = payload["memory"]
        text += (
            f"\n## Memory flatness\n\n{mem['batches']} consecutive torch float32 batches "
            f"({mem['batch_sizes']}), {mem['items']} items: RSS "
            f"{mem['rss_mb_after_warmup']} MB after warm-up, {mem['rss_mb_end']} MB at the end (growth {mem['growth_mb']} MB).\n"
        )
    if payload["notes"]:
        text += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in payload["notes"])
    text += (
        "\n## Reproduce\n\n"
        f"This run: `{head['command']}`.\n\nThe full grid (every engine at batch 1/32/256 on "
        "20k/200k/1M items, 10,000 memory batches, the 0.5B LLM rows) takes hours on 2 cores:"
        "\n\n```\npython benchmarks/decode.py --items 20000,200000,1000000 --batches 1,32,256 "
        "--ref-batches 1,32,256 --ref-max-items 1000000 --vllm-batches 1,32,256 "
        "--vllm-max-items 1000000 --memory-batches 10000 --llm\n```\n"
    )
    return text


if __name__ == "__main__":
    main()
