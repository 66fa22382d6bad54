"""`FusedDecoder`: the shared-prefix Llama decoder (models/decoders.py) with its weights
re-laid out once, so each layer is a few large kernels instead of dozens of small ones.

Small models (TIGER-size: 128-d, 4 layers) spend most of a decoding step in elementwise ops, not
matmuls; every rewrite below is an exact identity up to float rounding:

- RMSNorm's weight is folded into the matrix that follows it (q/k/v, gate/up, lm_head), and the
  per-row 1/rms scale is applied to the input; q, k, v and gate, up are one matmul each.
- The attention scale 1/sqrt(d) is folded into W_q (RoPE is linear, so it commutes).
- RoPE as one complex multiply: W_q's and W_k's rows are permuted inside every head from HF's
  half-split layout to interleaved pairs (the same permutation on q and k leaves q.k unchanged),
  so the rotation of q and k together is `view_as_complex(qk) * e^{i pos theta}`.
- Residual adds ride in the matmuls (`addmm`), SiLU and the gate product run in place.
- The head's output width is padded to a multiple of 16 columns, whose logits are set to -inf:
  a GEMM whose row stride is an odd number of floats (1027 for 4 x 256 codes + 3 specials) ran
  at half the speed of a padded one on the CPUs measured, and -inf adds exactly zero to a
  softmax (the Decoder protocol allows V' >= V).
- Prefill attention is a plain causal softmax over right-padded prompts (the causal mask alone
  hides the padding from every real token); only the last real token goes through the last
  layer's output half and the head.

`SharedPrefixDecoder` stays the readable reference; tests/models/test_fused_decoder.py checks this
one against it (and both against HF `generate`) on random models.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models import native
from models.decoders import _right_pad, supports_shared_prefix


def supports_fused(model: Any) -> bool:
    """Llama-family models with SiLU MLPs and RoPE whose cos/sin halves agree."""
    cfg = getattr(model, "config", None)
    return (
        supports_shared_prefix(model)
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(cfg, "mlp_bias", False)
    )


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear ops (what torch.compile's CPU backend
    uses): `torch.ops.mkldnn._linear_pointwise` and its `binary` (residual add) overload."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        return bool(torch.backends.mkldnn.is_available()) and "binary" in op.overloads()
    except (AttributeError, RuntimeError):
        return False


class Dense:
    """One weight matrix W [out, in] and the GEMM that applies it, `x W^T` (+ bias, + a
    residual). Two kernels: torch's matmul (MKL's sgemm for float32 on the CPU) over W^T laid
    out [in, out], or oneDNN's linear over W itself. On the AVX-512 CPUs measured oneDNN ran the
    decoder's float32 shapes 1.1-1.4x faster than MKL (prefill shapes most); both are exact
    GEMMs, differing only in float rounding order."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = False):
        self.onednn = onednn
        self.bias = bias
        self.out_features, self.in_features = w.shape
        # oneDNN takes W as it is (copied: a fresh, aligned allocation of its own, never the
        # model's possibly memory-mapped storage); matmul a contiguous W^T.
        self.w = (
            w.detach().clone(memory_format=torch.contiguous_format)
            if onednn
            else w.t().contiguous()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.bias, "none", [], "")
        y = x @ self.w
        return y if self.bias is None else y.add_(self.bias)

    def add(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h + x W^T (+ bias): the residual rides in the GEMM."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, h, self.w, self.bias, "add")
        if self.bias is None:
            return torch.addmm(h, x, self.w)
        return h + F.linear(x, self.w.t(), self.bias)


@dataclass
class _Layer:
    eps1: float
    qkv: Dense  # [(H + 2*Hkv) * D, hidden]: norm weight folded, q scaled, q/k interleaved; bias
    # (Qwen2) with the q part scaled and interleaved
    o: Dense  # [hidden, H * D]
    eps2: float
    gu: Dense  # [2 * I, hidden]: gate | up, norm weight folded
    down: Dense  # [hidden, I]


@dataclass
class _FusedState:
    prefix_k: list[torch.Tensor]  # per layer [B, Hkv, P, D]; [B, Hkv, D, P] on the native path
    prefix_v: list[torch.Tensor]
    prefix_bias: torch.Tensor | None  # [B, 1, 1, P] 0 / -inf; None when no prompt is padded
    lengths: torch.Tensor  # [B]
    own: torch.Tensor | None = None  # [capacity, layers, 2, B*W, Hkv, D] generated K/V
    spare: torch.Tensor | None = None  # same shape: the reorder's destination, then swapped
    anc: torch.Tensor | None = None  # native path [T, B*W]: own-cache row of each ancestor
    generated: int = 0


HEAD_ALIGN = 16
"""Head columns are padded to a multiple of this (see the module docstring)."""

TABLE_MAX_BYTES = 32 << 20
"""Layer 0's q/k/v of every vocabulary token is precomputed when the table is at most this big
(a code vocabulary: about 1.6 MB for 128-d; an LLM's vocabulary would not fit, and is skipped)."""


def _interleave(d: int) -> torch.Tensor:
    """Row order turning HF's half-split rotary layout [x1 | x2] into pairs (x1_j, x2_j)."""
    half = torch.arange(d // 2)
    return torch.stack([half, half + d // 2], dim=1).reshape(-1)


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] / rms(x), with HF LlamaRMSNorm's float32 ops in its order (cheaper
    one-pass norms drift further from the reference's rounding)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class FusedDecoder:
    """Decoder protocol of models/decoders.py over re-laid-out Llama/Qwen2 weights. It keeps no
    reference to the model beyond its embedding table and rotary module, so a caller may drop
    the model once this is built (the torch engine does: an LLM's weights are not held twice)."""

    def __init__(
        self, model: Any, use_native: bool | None = None, onednn: bool | None = None
    ) -> None:
        """`use_native`: the C step-attention kernel (models/native) for float32 on the CPU;
        None: wherever it builds, False: the torch ops only. `onednn`: oneDNN's linear for the
        float32 GEMMs on the CPU where torch has it (None), or matmul everywhere (False)."""
        if not supports_fused(model):
            raise ValueError("fused decoding needs a Llama-family model with a SiLU MLP")
        cfg = model.config
        inner = model.model
        attn0 = inner.layers[0].self_attn
        self.head_dim: int = attn0.head_dim
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv: int = cfg.num_key_value_heads
        self.pad_id: int = cfg.pad_token_id or 0
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach()
        self.dtype = self.embed.dtype
        # oneDNN's linear for float32 on the CPU (see Dense); other dtypes and devices: matmul.
        self.onednn = (
            onednn is not False
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and onednn_linear_available()
        )
        with torch.no_grad():
            self.layers = [self._fold(layer, float(attn0.scaling)) for layer in inner.layers]
            self.eps_f = float(inner.norm.variance_epsilon)
            head = model.lm_head.weight * inner.norm.weight[None, :]  # [V, hidden]
            self.vocab_size = head.shape[0]
            padded = head.new_zeros(-(-self.vocab_size // HEAD_ALIGN) * HEAD_ALIGN, head.shape[1])
            padded[: self.vocab_size] = head
            self.head = Dense(padded, onednn=self.onednn)
            self.qkv0 = self._layer0_table()
        self._freqs = torch.zeros(0, self.head_dim // 2, dtype=self._complex_dtype())
        native_ok = (
            self.device.type == "cpu" and self.dtype == torch.float32 and self.head_dim % 8 == 0
        )
        if use_native and not native_ok:
            raise ValueError("the native kernels take float32 models on the CPU, head dim % 8 == 0")
        self.native = native.load() if native_ok and use_native is not False else None
        if use_native and self.native is None:
            raise RuntimeError("the native kernels could not be built here (see the log)")

    def _layer0_table(self) -> torch.Tensor | None:
        """[V, (H + 2Hkv) * D]: layer 0's q/k/v before RoPE depend on the token alone, so a
        lookup replaces the first norm and matmul of every prompt and generated token."""
        ly = self.layers[0]
        if self.embed.shape[0] * ly.qkv.out_features * self.embed.element_size() > TABLE_MAX_BYTES:
            return None
        return ly.qkv(_rms_scale(self.embed, ly.eps1))

    def _complex_dtype(self) -> torch.dtype:
        return torch.complex128 if self.dtype == torch.float64 else torch.complex64

    def _fold(self, layer: Any, scale: float) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        d, h, hkv = self.head_dim, self.n_heads, self.n_kv
        perm = _interleave(d)
        g1 = layer.input_layernorm.weight[None, :]

        def heads(w: torch.Tensor, n: int) -> torch.Tensor:  # permute rows inside each head
            return w.view(n, d, *w.shape[1:])[:, perm].reshape(w.shape)

        wq = heads(attn.q_proj.weight, h) * scale
        wk = heads(attn.k_proj.weight, hkv)
        w_qkv = torch.cat([wq, wk, attn.v_proj.weight]) * g1
        b_qkv = None
        if attn.q_proj.bias is not None:
            b_qkv = torch.cat(
                [heads(attn.q_proj.bias, h) * scale, heads(attn.k_proj.bias, hkv), attn.v_proj.bias]
            )
        g2 = layer.post_attention_layernorm.weight[None, :]
        w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * g2
        b_o = None if attn.o_proj.bias is None else attn.o_proj.bias.detach()
        return _Layer(
            eps1=float(layer.input_layernorm.variance_epsilon),
            qkv=Dense(w_qkv, b_qkv, onednn=self.onednn),
            o=Dense(attn.o_proj.weight, b_o, onednn=self.onednn),
            eps2=float(layer.post_attention_layernorm.variance_epsilon),
            gu=Dense(w_gu, onednn=self.onednn),
            down=Dense(mlp.down_proj.weight, onednn=self.onednn),
        )

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # ---- pieces ------------------------------------------------------------------------------
    def freqs(self, pos: torch.Tensor) -> torch.Tensor:
        """e^{i pos theta} [..., D/2] from the model's own rotary embedding (cached table)."""
        need = int(pos.max()) + 1 if pos.numel() else 0
        if need > self._freqs.shape[0]:
            n = max(need, 2 * self._freqs.shape[0], 128)
            positions = torch.arange(n, device=self.device)[None, :]
            probe = torch.zeros(1, dtype=torch.float32, device=self.device)
            cos, sin = self.rotary(probe, positions)  # [1, n, D]
            half = self.head_dim // 2
            cos, sin = cos[0].double(), sin[0].double()
            if not (
                torch.equal(cos[:, :half], cos[:, half:])
                and torch.equal(sin[:, :half], sin[:, half:])
            ):
                raise ValueError("fused decoding needs rotary cos/sin with equal halves")
            self._freqs = torch.complex(cos[:, :half], sin[:, :half]).to(self._complex_dtype())
        return self._freqs[pos]

    def _rope_(self, qk: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs: qk [..., heads, D], f [..., 1, D/2] complex -> new tensor."""
        if qk.dtype in (torch.float32, torch.float64):
            z = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
            return torch.view_as_real(z * f).flatten(-2)
        x = qk.unflatten(-1, (-1, 2)).float()
        c, s = f.real.float(), f.imag.float()
        a, b = x[..., 0], x[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(qk.dtype)

    def _qkv(
        self, ly: _Layer, h: torch.Tensor, f: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """h [..., hidden] -> q [..., H, D], k and v [..., Hkv, D] (RoPE applied to q and k).
        With `ids` (layer 0 only; h's token ids), q/k/v come from the precomputed table."""
        qkv = self._qkv_raw(ly, h, ids).unflatten(-1, (-1, self.head_dim))  # [..., H + 2Hkv, D]
        qk = self._rope_(qkv[..., : self.n_heads + self.n_kv, :], f)
        return qk[..., : self.n_heads, :], qk[..., self.n_heads :, :], qkv[..., -self.n_kv :, :]

    def _out_mlp(self, ly: _Layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual attention output and MLP: h, o [N, hidden] -> [N, hidden]."""
        h = ly.o.add(h, o)
        gu = ly.gu(_rms_scale(h, ly.eps2))  # [N, 2I]
        i = gu.shape[-1] // 2
        act = F.silu(gu[:, :i], inplace=True).mul_(gu[:, i:])
        return ly.down.add(h, act)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(_rms_scale(h, self.eps_f))  # [N, V'], V' >= V
        logits[:, self.vocab_size :] = float("-inf")
        return logits

    # ---- the protocol ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, _FusedState]:
        if self.native is not None:
            return self._prefill_native(prompts)
        ids, lengths = _right_pad(prompts, self.pad_id, self.device)  # [B, P], [B]
        b, p = ids.shape
        d, g = self.head_dim, self.n_heads // self.n_kv
        h = self.embed[ids].reshape(b * p, -1)  # [B*P, hidden]
        f = self.freqs(torch.arange(p, device=ids.device))[None, :, None, :]  # [1, P, 1, D/2]
        last = lengths - 1
        rows = torch.arange(b, device=ids.device)
        state = _FusedState([], [], None, lengths)
        for i, ly in enumerate(self.layers):
            q, k, v = self._qkv(ly, h.view(b, p, -1), f, ids if i == 0 else None)  # [B, P, ., D]
            k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, Hkv, P, D]
            state.prefix_k.append(k)
            state.prefix_v.append(v)
            if i == len(self.layers) - 1:
                # Only the last real token's output is needed after the last layer's K/V.
                q = q[rows, last].view(b, self.n_kv, g, d)  # [B, Hkv, G, D]
                s = q @ k.transpose(-1, -2)  # [B, Hkv, G, P]
                s = s.masked_fill(
                    (torch.arange(p, device=ids.device) > last[:, None])[:, None, None],
                    float("-inf"),
                )
                o = torch.softmax(s, dim=-1) @ v  # [B, Hkv, G, D]
                h = h.view(b, p, -1)[rows, last]  # [B, hidden]
                h = self._out_mlp(ly, h, o.reshape(b, -1))
            else:
                # W_q carries the 1/sqrt(d) scale already.
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k, v, is_causal=True, scale=1.0, enable_gqa=g > 1
                )  # [B, H, P, D]
                h = self._out_mlp(ly, h, o.transpose(1, 2).reshape(b * p, -1))
        if bool((lengths < p).any()):
            pad = torch.arange(p, device=ids.device)[None, :] >= lengths[:, None]  # [B, P]
            zero = torch.zeros(b, p, dtype=self.dtype, device=ids.device)
            state.prefix_bias = zero.masked_fill(pad, float("-inf"))[:, None, None, :]
        return self._logits(h), state  # [B, V]

    def fork(self, state: _FusedState) -> _FusedState:
        """The prefix KV shared (never written after `prefill`), no generated tokens."""
        return _FusedState(state.prefix_k, state.prefix_v, state.prefix_bias, state.lengths)

    @torch.inference_mode()
    def step(self, state: _FusedState, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self._step_native(state, parents, tokens)
        b, w = tokens.shape
        t, d, hkv = state.generated, self.head_dim, self.n_kv
        g = self.n_heads // hkv
        own = self._own_cache(state, parents, w)  # [C, layers, 2, B*W, Hkv, D]
        h = self.embed[tokens.reshape(-1)]  # [B*W, hidden]
        f = self.freqs(state.lengths + t)[:, None, None, :]  # [B, 1, 1, D/2]
        for i, ly in enumerate(self.layers):
            q, k, v = self._qkv(ly, h.view(b, w, -1), f, tokens if i == 0 else None)
            own[t, i, 0] = k.reshape(b * w, hkv, d)
            own[t, i, 1] = v.reshape(b * w, hkv, d)
            ok = own[: t + 1, i, 0].view(t + 1, b, w, hkv, 1, d)
            ov = own[: t + 1, i, 1].view(t + 1, b, w, hkv, 1, d)
            qg = q.view(b, w, hkv, g, d)
            # Scores over the user's shared prefix and over the beam's own few tokens.
            qp = qg.permute(0, 2, 3, 1, 4).reshape(b, hkv, g * w, d)  # [B, Hkv, G*W, D]
            s_pre = qp @ state.prefix_k[i].transpose(-1, -2)  # [B, Hkv, G*W, P]
            if state.prefix_bias is not None:
                s_pre = s_pre + state.prefix_bias
            # T <= L own keys per beam: broadcast products beat thousands of tiny matmuls.
            s_own = (qg * ok).sum(-1)  # [T, B, W, Hkv, G]
            s_own = s_own.permute(1, 3, 4, 2, 0).reshape(b, hkv, g * w, t + 1)
            p_all = torch.softmax(torch.cat([s_pre, s_own], dim=-1), dim=-1)
            n_pre = s_pre.shape[-1]
            o = (p_all[..., :n_pre] @ state.prefix_v[i]).view(b, hkv, g, w, d)
            p_own = p_all[..., n_pre:].reshape(b, hkv, g, w, t + 1).permute(4, 0, 3, 1, 2)
            o_own = (p_own.unsqueeze(-1) * ov).sum(0)  # [B, W, Hkv, G, D]
            o = o + o_own.permute(0, 2, 3, 1, 4)
            h = self._out_mlp(ly, h, o.permute(0, 3, 1, 2, 4).reshape(b * w, -1))
        state.generated += 1
        return self._logits(h).view(b, w, -1)  # [B, W, V]

    def _qkv_raw(self, ly: _Layer, h: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """[N, (H + 2Hkv) * D] q|k|v before RoPE (the layer-0 table where there is one)."""
        if ids is not None and self.qkv0 is not None:
            return self.qkv0[ids]
        return ly.qkv(_rms_scale(h, ly.eps1))

    @property
    def _lib(self) -> ctypes.CDLL:
        """The native kernels (the native paths run only when they loaded)."""
        assert self.native is not None
        return self.native

    def _qkv_native(
        self, ly: _Layer, h: torch.Tensor, ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q|k|v before RoPE and the norm's row scale, [N] or None): (r h) W = r (h W), so
        the attention kernel scales the rows it reads instead of a normalised copy of h."""
        if (ids is not None and self.qkv0 is not None) or ly.qkv.bias is not None:
            return self._qkv_raw(ly, h, ids), None  # a bias does not commute with the scale
        return ly.qkv(h), native.row_rms(self._lib, h, ly.eps1)

    def _out_mlp_native(self, ly: _Layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """`_out_mlp` with the norm's row scale and SiLU-times-up fused into one C pass."""
        h = ly.o.add(h, o)
        act = native.silu_mul(self._lib, ly.gu(h), native.row_rms(self._lib, h, ly.eps2))
        return ly.down.add(h, act)

    def _prefill_native(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, _FusedState]:
        """`prefill` with each layer's RoPE, prefix K/V layout and causal attention in one C call
        (models/native); the last layer attends from the last real token only."""
        ids, lengths = _right_pad(prompts, self.pad_id, self.device)  # [B, P], [B]
        b, p = ids.shape
        hd, n_layers = self.n_heads * self.head_dim, len(self.layers)
        p8 = -(-p // 8) * 8
        flat = ids.reshape(-1)
        h = self.embed[flat]  # [B*P, hidden]
        rope = torch.view_as_real(self.freqs(torch.arange(p))).reshape(p, -1)  # [P, D]
        state = _FusedState([], [], None, lengths)
        for i, ly in enumerate(self.layers):
            qkv, scale = self._qkv_native(ly, h, flat if i == 0 else None)
            kt = h.new_empty(b, self.n_kv, self.head_dim, p8)
            v = h.new_empty(b, self.n_kv, p, self.head_dim)
            last = i == n_layers - 1
            o = h.new_empty(b if last else b * p, hd)
            native.prefill_attention(
                self._lib, qkv, scale, rope, lengths, kt, v, o, self.n_heads, last
            )
            state.prefix_k.append(kt)
            state.prefix_v.append(v)
            if last:
                h = h.view(b, p, -1)[torch.arange(b), lengths - 1]  # [B, hidden]
            h = self._out_mlp_native(ly, h, o)
        return self._logits(h), state  # [B, V]

    def _step_native(
        self, state: _FusedState, parents: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """`step` with each layer's attention in one C call (models/native): RoPE, the cache
        write and the attention over prefix and own tokens; beams are reordered by ancestor
        indices (`state.anc`), never by copying their K/V."""
        b, w = tokens.shape
        t, n = state.generated, b * w
        if state.own is None or state.own.shape[0] <= t:
            shape = (max(4, 2 * t), len(self.layers), 2, n, self.n_kv, self.head_dim)
            grown = self.embed.new_empty(shape)
            if state.own is not None:
                grown[:t] = state.own[:t]
            state.own = grown
        anc = torch.empty(t + 1, n, dtype=torch.int64)
        if t:
            assert state.anc is not None
            flat = (torch.arange(b)[:, None] * w + parents).reshape(-1)
            torch.index_select(state.anc, 1, flat, out=anc[:t])
        anc[t] = torch.arange(n)
        state.anc = anc
        rope = torch.view_as_real(self.freqs(state.lengths + t)).reshape(b, -1)  # [B, D]
        ids = tokens.reshape(-1)
        h = self.embed[ids]  # [N, hidden]
        o = h.new_empty(n, self.n_heads * self.head_dim)
        for i, ly in enumerate(self.layers):
            qkv, scale = self._qkv_native(ly, h, ids if i == 0 else None)
            native.beam_step_attention(
                self._lib,
                qkv,
                scale,
                rope,
                state.prefix_k[i],
                state.prefix_v[i],
                state.lengths,
                state.own,
                i,
                anc,
                t,
                self.n_heads,
                o,
            )
            h = self._out_mlp_native(ly, h, o)
        state.generated += 1
        return self._logits(h).view(b, w, -1)  # [B, W, V]

    def _own_cache(self, state: _FusedState, parents: torch.Tensor, w: int) -> torch.Tensor:
        """Generated-token K/V reordered by `parents` [B, W], with room for one more token.
        Token-major ([T, layers, 2, B*W, Hkv, D]): a step's K/V is one contiguous block, and the
        reorder gathers the first t blocks straight into the spare buffer (no copy back)."""
        t, own = state.generated, state.own
        b = parents.shape[0]
        if own is None or own.shape[0] <= t:
            shape = (max(4, 2 * t), len(self.layers), 2, b * w, self.n_kv, self.head_dim)
            grown = self.embed.new_empty(shape)
            if own is not None:
                grown[:t] = own[:t]
            own = state.own = grown
            state.spare = self.embed.new_empty(shape)
        if t:
            assert state.spare is not None
            flat = (torch.arange(b, device=parents.device)[:, None] * w + parents).reshape(-1)
            rows = t * len(self.layers) * 2
            torch.index_select(
                own[:t].view(rows, b * w, -1), 1, flat, out=state.spare[:t].view(rows, b * w, -1)
            )
            state.own, state.spare = state.spare, own
            own = state.own
        return own
