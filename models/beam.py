"""Trie-constrained beam search over item identifiers, batched over users.

Scoring is the reference's (HF `generate` with `prefix_allowed_tokens_fn`, `length_penalty=0`):
at each of the L steps, log-softmax over the whole vocabulary in float32, disallowed codes set to
-inf (no renormalisation), cumulative sum, top-W over all W x N continuations of a user.

Where the time goes: a user's W beams share its history prefix. The fast decoder
(`SharedPrefixDecoder`) runs the prefix once per user and keeps ONE prefix KV cache per user;
each decoding step feeds the B*W beams' new tokens, and every beam attends to its user's shared
prefix keys plus its own few generated keys (`shared_prefix_attention`). Nothing of the prefix is
copied per beam. Model families without that path use `HFCacheDecoder` (HF cache repeated per
beam: correct for any causal LM, slower).

Per-request exclusions are exact: a code is allowed iff the active items under the extended prefix
outnumber the excluded active items under it, so a prefix whose items are all excluded is masked
at every level, exactly as if the excluded items were not in the trie.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.trie import ItemTrie
from models.vocab import CodeVocab

log = logging.getLogger(__name__)

SHARED_PREFIX_MODEL_TYPES = frozenset({"llama", "qwen2"})
"""HF model types whose layers the shared-prefix decoder knows how to run."""


class Decoder(Protocol):
    """Runs the language model for beam search; state is opaque to the search."""

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any]:
        """Prompts -> (next-token logits [B, V], state)."""
        ...

    def step(self, state: Any, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Reorder beams by `parents` [B, W] (indices into the previous beams, the prefix state
        counting as one beam repeated), feed `tokens` [B, W]; returns logits [B, W, V]."""
        ...


@dataclass(frozen=True)
class BeamSearchOutput:
    items: torch.Tensor  # [B, k] int64 item indices, best first; -1 where fewer than k exist
    scores: torch.Tensor  # [B, k] float32 summed masked log-probs; -inf where items is -1


# ---- pure steps ----------------------------------------------------------------------------
def allowed_codes(
    child_counts: torch.Tensor,  # [B, W, N] active items under prefix + (c,)
    beam_keys: torch.Tensor,  # [B, W] packed prefix of each beam
    ex_keys: torch.Tensor,  # [B, E] packed prefix (same length) of each excluded item
    ex_next: torch.Tensor,  # [B, E] next code of each excluded item
    ex_valid: torch.Tensor,  # [B, E] bool, False for padding
) -> torch.Tensor:
    """[B, W, N] bool: codes leading to at least one active, non-excluded item."""
    if ex_keys.shape[1] == 0:
        return child_counts > 0
    match = (beam_keys[:, :, None] == ex_keys[:, None, :]) & ex_valid[:, None, :]  # [B, W, E]
    index = ex_next[:, None, :].expand_as(match)  # [B, W, E]
    excluded = torch.zeros_like(child_counts).scatter_add_(2, index, match.to(child_counts.dtype))
    return child_counts > excluded


def masked_log_probs(
    logits: torch.Tensor, level_start: int, codebook_size: int, allowed: torch.Tensor
) -> torch.Tensor:
    """logits [..., V] -> [..., N] float32: full-vocabulary log-softmax of this level's codes,
    -inf where not `allowed` [..., N] (broadcastable)."""
    lp = F.log_softmax(logits.float(), dim=-1)[..., level_start : level_start + codebook_size]
    return lp.masked_fill(~allowed, float("-inf"))


def select_beams(
    scores: torch.Tensor, log_probs: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [B, W] + log_probs [B, W, N] -> best `width` continuations per user:
    (scores [B, width] descending, parent beam [B, width], code [B, width])."""
    n = log_probs.shape[-1]
    cand = (log_probs + scores[:, :, None]).flatten(1)  # [B, W*N]
    top, idx = torch.topk(cand, width, dim=1)
    return top, idx // n, idx % n


# ---- the search ----------------------------------------------------------------------------
def _exclusion_codes(
    trie: ItemTrie, excludes: Sequence[Collection[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of each request's excluded ACTIVE items: ([B, E, L] int64, valid [B, E] bool)."""
    active = trie.active_mask()
    rows = [sorted(i for i in ex if 0 <= i < len(trie) and active[i]) for ex in excludes]
    e = max((len(r) for r in rows), default=0)
    codes = torch.zeros(len(rows), e, trie.levels, dtype=torch.int64)
    valid = torch.zeros(len(rows), e, dtype=torch.bool)
    table = trie.codes_array()
    for b, r in enumerate(rows):
        if r:
            codes[b, : len(r)] = torch.from_numpy(table[r].astype("int64"))
            valid[b, : len(r)] = True
    return codes.to(device), valid.to(device)


@torch.inference_mode()
def beam_search(
    model: Any,
    prompts: Sequence[Sequence[int]],
    trie: ItemTrie,
    vocab: CodeVocab,
    beam_width: int = 20,
    k: int = 10,
    excludes: Sequence[Collection[int]] | None = None,
) -> BeamSearchOutput:
    """Top-k active items per prompt by constrained beam search (width max(beam_width, k)).

    `model` is an HF causal LM (a decoder is chosen by `make_decoder`) or a `Decoder`.
    """
    if trie.levels != vocab.levels or trie.codebook_size != vocab.codebook_size:
        raise ValueError(
            f"trie ({trie.levels} x {trie.codebook_size}) does not match the vocabulary "
            f"({vocab.levels} x {vocab.codebook_size})"
        )
    decoder: Decoder = model if hasattr(model, "prefill") else make_decoder(model)
    b, width, n = len(prompts), max(beam_width, k), vocab.codebook_size
    if b == 0:
        return BeamSearchOutput(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    logits, state = decoder.prefill(prompts)  # [B, V]
    device = logits.device
    tt = trie.tensors(device)
    ex_codes, ex_valid = _exclusion_codes(trie, excludes or [()] * b, device)
    ex_keys = torch.zeros(ex_valid.shape, dtype=torch.int64, device=device)  # [B, E]
    # Only beam 0 is live before the first step, so each first code is chosen once.
    scores = torch.full((b, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    keys = torch.zeros(b, width, dtype=torch.int64, device=device)  # [B, W]
    step_logits = logits[:, None, :]  # [B, 1, V], broadcast over the beams
    for t in range(vocab.levels):
        counts = tt.child_counts(keys, t)  # [B, W, N]
        allowed = allowed_codes(counts, keys, ex_keys, ex_codes[:, :, t], ex_valid)
        lp = masked_log_probs(step_logits, vocab.level_start(t), n, allowed)  # [B, W, N]
        scores, parent, code = select_beams(scores, lp, width)
        keys = keys.gather(1, parent) * n + code
        ex_keys = ex_keys * n + ex_codes[:, :, t]
        if t < vocab.levels - 1:
            step_logits = decoder.step(state, parent, code + vocab.level_start(t))
    return _finish(tt.items_of(keys), scores, k)


def _finish(items: torch.Tensor, scores: torch.Tensor, k: int) -> BeamSearchOutput:
    """Drop dead beams (-inf) and keys without an active item; best first; pad to k."""
    ok = (items >= 0) & torch.isfinite(scores)  # [B, W]
    scores = torch.where(ok, scores, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    scores, items = scores.gather(1, order), items.gather(1, order)
    items = torch.where(torch.isfinite(scores), items, -1)
    return BeamSearchOutput(items.cpu(), scores.float().cpu())


# ---- decoders ------------------------------------------------------------------------------
def make_decoder(model: Any, kind: str = "auto") -> Decoder:
    """'shared' (prefix KV shared by a user's beams), 'hf' (any causal LM) or 'auto'."""
    choices = {"shared": SharedPrefixDecoder, "hf": HFCacheDecoder}
    if kind == "auto":
        kind = "shared" if supports_shared_prefix(model) else "hf"
        if kind == "hf":
            log.info("model type %s: using the slower HF-cache decoder", model.config.model_type)
    if kind not in choices:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {sorted(choices)} or 'auto'")
    return choices[kind](model)


def supports_shared_prefix(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    return (
        cfg is not None
        and cfg.model_type in SHARED_PREFIX_MODEL_TYPES
        and not getattr(cfg, "use_sliding_window", False)
        and hasattr(getattr(model, "model", None), "rotary_emb")
    )


def _right_pad(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, ...]:
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least the bos token")
    ids = torch.full((len(prompts), int(lengths.max())), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def shared_prefix_attention(
    q: torch.Tensor,  # [B, H, W, D] queries of the W beams' newest tokens
    prefix_k: torch.Tensor,  # [B, Hkv, P, D] the user's prefix keys (shared by its beams)
    prefix_v: torch.Tensor,  # [B, Hkv, P, D]
    prefix_bias: torch.Tensor,  # [B, 1, 1, 1, P] 0 for real prefix tokens, -inf for padding
    own_k: torch.Tensor,  # [B, W, Hkv, T, D] each beam's generated keys, newest included
    own_v: torch.Tensor,  # [B, W, Hkv, T, D]
    scale: float,
) -> torch.Tensor:
    """Softmax attention over [prefix ; own tokens] without copying the prefix: [B, H, W, D]."""
    b, h, w, d = q.shape
    hkv, p = prefix_k.shape[1], prefix_k.shape[2]
    g = h // hkv  # query heads per kv head (GQA), head i reads kv head i // g as in HF
    q5 = q.reshape(b, hkv, g, w, d)
    s_pre = (q5.reshape(b, hkv, g * w, d) @ prefix_k.transpose(-1, -2)).view(b, hkv, g, w, p)
    # T <= L own keys per beam: broadcast products beat thousands of tiny batched matmuls.
    own_k5 = own_k.permute(0, 2, 1, 3, 4).unsqueeze(2)  # [B, Hkv, 1, W, T, D]
    s_own = (q5.unsqueeze(-2) * own_k5).sum(-1)  # [B, Hkv, G, W, T]
    s = torch.cat([s_pre * scale + prefix_bias, s_own * scale], dim=-1)
    s = torch.softmax(s.float(), dim=-1).to(q.dtype)  # [B, Hkv, G, W, P+T]
    out = (s[..., :p].reshape(b, hkv, g * w, p) @ prefix_v).view(b, hkv, g, w, d)
    own_v5 = own_v.permute(0, 2, 1, 3, 4).unsqueeze(2)  # [B, Hkv, 1, W, T, D]
    out = out + (s[..., p:].unsqueeze(-1) * own_v5).sum(-2)
    return out.reshape(b, h, w, d)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin` (same float ops, bit-identical) when both halves
    of cos/sin are equal, as in every Llama RoPE variant; x [..., D], cos/sin [..., D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class _SharedState:
    prefix_k: list[torch.Tensor]  # per layer [B, Hkv, P, D]
    prefix_v: list[torch.Tensor]
    prefix_bias: torch.Tensor  # [B, 1, 1, 1, P]
    lengths: torch.Tensor  # [B]
    # Every layer's generated K and V in one tensor, so reordering beams is one gather per step:
    own: torch.Tensor | None = None  # [layers, 2, B, W, Hkv, capacity, D]
    generated: int = 0


class SharedPrefixDecoder:
    """Llama-family forward with one prefix KV cache per user, shared by all its beams."""

    def __init__(self, model: Any) -> None:
        if not supports_shared_prefix(model):
            raise ValueError(
                f"shared-prefix decoding supports {sorted(SHARED_PREFIX_MODEL_TYPES)} without "
                f"sliding window, got {getattr(model.config, 'model_type', type(model).__name__)}"
            )
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.n_kv: int = model.config.num_key_value_heads
        self.scale: float = attn.scaling
        self.pad_id = model.config.pad_token_id or 0

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, S, D] (or their first halves [B, 1, S, D/2] when the halves agree)."""
        cos, sin = self.inner.rotary_emb(h, pos)  # [B, S, D]
        half = self.head_dim // 2
        if torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(
            sin[..., :half], sin[..., half:]
        ):
            cos, sin = cos[..., :half], sin[..., :half]
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _qkv(self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> q [B, H, S, D], k and v [B, Hkv, S, D], rotary applied."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(x).view(shape) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cos.shape[-1] == self.head_dim:
            q, k = apply_rotary_pos_emb(q, k, cos.squeeze(1), sin.squeeze(1))
        else:
            q, k = rotate_halves(q, cos, sin), rotate_halves(k, cos, sin)
        return q, k, v

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, _SharedState]:
        ids, lengths = _right_pad(prompts, self.pad_id, self.device)  # [B, P], [B]
        b, p = ids.shape
        h = self.inner.embed_tokens(ids)  # [B, P, hidden]
        pos = torch.arange(p, device=ids.device).expand(b, p)
        cos, sin = self._rotary(h, pos)
        valid = pos < lengths[:, None]  # [B, P]
        last = lengths - 1
        rows = torch.arange(b, device=ids.device)
        state = _SharedState([], [], torch.zeros(0), lengths)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            state.prefix_k.append(k)
            state.prefix_v.append(v)
            gqa = q.shape[1] != k.shape[1]
            if i == len(self.layers) - 1:
                # Only the last real token's output is needed after the last layer's K/V.
                q, h = q[rows, :, last].unsqueeze(2), h[rows, last].unsqueeze(1)
                mask = valid[:, None, None, :]
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa
                )
            else:
                o = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa
                )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(*h.shape[:2], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        bias = torch.zeros(b, p, dtype=h.dtype, device=h.device).masked_fill(~valid, float("-inf"))
        state.prefix_bias = bias[:, None, None, None, :]
        logits = self.model.lm_head(self.inner.norm(h[:, -1]))  # [B, V]
        return logits, state

    def step(self, state: _SharedState, parents: torch.Tensor, tokens: torch.Tensor):
        b, w = tokens.shape
        t = state.generated
        own = self._own_cache(state, parents, w)  # [layers, 2, B, W, Hkv, C, D]
        h = self.inner.embed_tokens(tokens)  # [B, W, hidden]
        cos, sin = self._rotary(h, (state.lengths[:, None] + t).expand(b, w))
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)  # [B, H|Hkv, W, D]
            own[i, 0, :, :, :, t] = k.transpose(1, 2)  # [B, W, Hkv, D]
            own[i, 1, :, :, :, t] = v.transpose(1, 2)
            o = shared_prefix_attention(
                q,
                state.prefix_k[i],
                state.prefix_v[i],
                state.prefix_bias,
                own[i, 0, :, :, :, : t + 1],
                own[i, 1, :, :, :, : t + 1],
                self.scale,
            )  # [B, H, W, D]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, w, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        state.generated += 1
        return self.model.lm_head(self.inner.norm(h))  # [B, W, V]

    def _own_cache(self, state: _SharedState, parents: torch.Tensor, w: int) -> torch.Tensor:
        """The generated-token KV reordered by `parents` [B, W], with room for one more token."""
        t, own = state.generated, state.own
        b = parents.shape[0]
        if own is None or own.shape[5] <= t:
            grown = state.prefix_k[0].new_empty(
                len(self.layers), 2, b, w, self.n_kv, max(4, 2 * t), self.head_dim
            )
            if own is not None:
                grown[..., :t, :] = own[..., :t, :]
            own = state.own = grown
        if t:
            rows = torch.arange(b, device=parents.device)[:, None]  # [B, 1]
            own[..., :t, :] = own[:, :, rows, parents, :, :t]
        return own


@dataclass
class _HFState:
    cache: Any
    mask: torch.Tensor  # [B or B*W, S] attention mask so far
    next_pos: torch.Tensor  # [B or B*W]
    width: int = 0  # 0 until the cache was repeated per beam


class HFCacheDecoder:
    """Any HF causal LM: left-padded prefill, then the HF cache repeated per beam and reordered
    each step (what `generate` does; the slow path the shared decoder avoids)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.pad_id = model.config.pad_token_id or 0

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, _HFState]:
        p = max(len(x) for x in prompts)
        ids = torch.full((len(prompts), p), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(prompts):
            ids[i, p - len(x) :] = torch.as_tensor(x, dtype=torch.long)
            mask[i, p - len(x) :] = 1
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        return out.logits[:, -1], _HFState(out.past_key_values, mask, pos[:, -1] + 1)

    def step(self, state: _HFState, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, w = tokens.shape
        if state.width == 0:
            state.cache.batch_repeat_interleave(w)
            state.mask = state.mask.repeat_interleave(w, dim=0)
            state.next_pos = state.next_pos.repeat_interleave(w, dim=0)
            state.width = w
        flat = (torch.arange(b, device=tokens.device)[:, None] * w + parents).reshape(-1)
        state.cache.reorder_cache(flat)
        state.mask = torch.cat([state.mask, state.mask.new_ones(b * w, 1)], dim=1)
        out = self.model(
            input_ids=tokens.reshape(-1, 1),
            attention_mask=state.mask,
            position_ids=state.next_pos[:, None],
            past_key_values=state.cache,
            use_cache=True,
        )
        state.next_pos = state.next_pos + 1
        return out.logits[:, -1].view(b, w, -1)
