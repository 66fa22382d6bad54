"""Decoders: run the language model for beam search (prefill the prompts, then one token per
beam per step), with beam reordering inside.

Where the time goes: a user's W beams share its history prefix. `SharedPrefixDecoder` runs the
prefix once per user and keeps ONE prefix KV cache per user; each decoding step feeds the B*W
beams' new tokens, and every beam attends to its user's shared prefix keys plus its own few
generated keys (`shared_prefix_attention`). Nothing of the prefix is copied per beam. Model
families without that path use `HFCacheDecoder` (HF cache repeated per beam, as `generate` does:
correct for any causal LM, slower). `FusedDecoder` (models/fused_decoder.py) is the shared-prefix
decoder with its weights folded and fused for speed; `SharedPrefixDecoder` stays its readable
reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

log = logging.getLogger(__name__)

SHARED_PREFIX_MODEL_TYPES = frozenset({"llama", "qwen2"})
"""HF model types whose layers the shared-prefix decoder knows how to run."""


class Decoder(Protocol):
    """Runs the language model for beam search; state is opaque to the search."""

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any]:
        """Prompts -> (next-token logits [B, V'], state). V' >= the vocabulary size V: a decoder
        may pad the head for GEMM speed, and every padding column is -inf (zero probability, so
        a log-softmax over V' equals one over V)."""
        ...

    def step(self, state: Any, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Reorder beams by `parents` [B, W] (indices into the previous beams, the prefix state
        counting as one beam repeated), feed `tokens` [B, W]; returns logits [B, W, V'] (padded
        as in `prefill`)."""
        ...


def fork(decoder: Decoder, state: Any) -> Any | None:
    """A second state over the same prefill, as `prefill` returned it, for a second decode of
    the same prompts (the repeat-aware mode scores the user's recent items after the beam
    search): the shared-prefix decoders share the read-only prefix KV and start their own
    generated tokens afresh. Call it before the first `step` on `state`. None where the decoder
    cannot fork (the caller prefills again)."""
    method = getattr(decoder, "fork", None)
    return method(state) if method is not None else None


Prefilled = tuple[torch.Tensor, Any]
"""A decoder's (next-token logits, unstepped state) of some prompts, as `prefill` returns it."""


def prefills(decoder: Decoder, prompts: Sequence[Sequence[int]], n: int) -> list[Prefilled | None]:
    """`n` unstepped prefills of `prompts` for `n` decodes, from one `prefill` where the decoder
    can `fork` its state; None for each it cannot fork (its user prefills again)."""
    logits, state = decoder.prefill(prompts)
    out: list[Prefilled | None] = [(logits, state)]
    for _ in range(n - 1):
        forked = fork(decoder, state)
        out.append((logits, forked) if forked is not None else None)
    return out


def make_decoder(model: Any, kind: str = "auto") -> Decoder:
    """'fused' (shared prefix KV over re-laid-out weights, the fastest; on the CPU in float32 its
    attention and elementwise work run in native kernels, models/native), 'fused-torch' (the
    same in torch ops only), 'shared' (its readable reference), 'hf' (any causal LM) or 'auto'
    (the fastest that supports the model)."""
    from models.fused_decoder import FusedDecoder, supports_fused

    choices: dict[str, Callable[[Any], Decoder]] = {
        "fused": FusedDecoder,
        "fused-torch": lambda m: FusedDecoder(m, use_native=False),
        "shared": SharedPrefixDecoder,
        "hf": HFCacheDecoder,
    }
    if kind == "auto":
        kind = (
            "fused"
            if supports_fused(model)
            else "shared"
            if supports_shared_prefix(model)
            else "hf"
        )
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

    def fork(self, state: _SharedState) -> _SharedState:
        """The prefix KV shared (never written after `prefill`), no generated tokens."""
        return _SharedState(state.prefix_k, state.prefix_v, state.prefix_bias, state.lengths)

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
