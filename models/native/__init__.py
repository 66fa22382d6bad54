"""Native CPU kernels for the fused decoder, compiled from C on first use (ctypes, no torch headers).

Why hand-written: a TIGER-size model's decoding step on the CPU spends about as long in attention
bookkeeping as in its matmuls. Each layer's step attention (RoPE, writing the step's K/V, scores
over the user's shared prefix and the beam's own tokens, softmax, weighted values) is ~20 small
torch ops with their dispatch, temporaries and page faults, plus a copy of every beam's generated
K/V on each reorder. No library has this kernel for the CPU: SDPA wants one K/V per query batch
(here 20 beams share a prefix and differ in their last few tokens); vLLM's CPU paged attention
does share blocks, but through its engine's block tables and private ops. One C loop nest does it
in a single pass over L1-resident data, following ancestor pointers instead of copying K/V.

Built with the system C compiler (`CC`, else `cc`) with `-O3 -march=native -ffast-math` into a
per-machine cache (`LETTERREC_NATIVE_DIR`, default ~/.cache/letterrec/native), keyed by the
source, the flags and the CPU. Missing compiler or a failed build: `load()` returns None and the
decoder keeps its torch path (same results; tests/models/test_fused_decoder.py checks both).
`LETTERREC_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("beam_attention.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
"""Compile flags. Linking is a separate step without -ffast-math: gcc would otherwise link
crtfastmath.o, whose constructor turns on flush-to-zero for the whole process (torch included)."""
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpuinfo_lines() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]


def _cpu_key() -> str:
    lines = _cpuinfo_lines()
    return "\n".join(lines[:2]) if lines else platform.processor()


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (x86 `flags`, ARM `Features`)."""
    for ln in _cpuinfo_lines():
        if ln.startswith(("flags", "Features")):
            return set(ln.split(":", 1)[1].split())
    return set()


def _cache_dir() -> Path:
    env = os.environ.get("LETTERREC_NATIVE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "letterrec" / "native"


def _build(compiler: str, out: Path, march: str = "native") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    obj = tmp + ".o"
    flags = [f if f != "-march=native" else f"-march={march}" for f in FLAGS]
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run([compiler, *flags, "-c", str(SOURCE), "-o", obj], **run)  # type: ignore[call-overload]
        subprocess.run([compiler, "-shared", obj, "-o", tmp, "-lm"], **run)  # type: ignore[call-overload]
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from an image's non-root user
        os.replace(tmp, out)  # atomic: concurrent builders (test workers) never see half a file
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _prebuilt() -> Path | None:
    """`LETTERREC_NATIVE_LIB`, a library built ahead (`python -m models.native build`, as the CPU
    image does for x86-64-v3), if this CPU has the flags it was built for
    (`LETTERREC_NATIVE_LIB_CPU_FLAGS`, space-separated /proc/cpuinfo names)."""
    path = os.environ.get("LETTERREC_NATIVE_LIB")
    if not path:
        return None
    missing = set(os.environ.get("LETTERREC_NATIVE_LIB_CPU_FLAGS", "").split()) - cpu_flags()
    if missing:
        log.warning("prebuilt native kernels %s need CPU flags %s: not used", path, sorted(missing))
        return None
    if not Path(path).is_file():
        log.warning("prebuilt native kernels %s: no such file", path)
        return None
    return Path(path)


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (logged once)."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("LETTERREC_NATIVE", "1") == "0" or platform.system() != "Linux":
            return None
        path = _prebuilt()
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if path is None and compiler is None:
            log.warning("no C compiler: the fused decoder keeps its torch attention path")
            return None
        try:
            if path is None:
                assert compiler is not None
                key = hashlib.sha256(
                    "\0".join([SOURCE.read_text(), " ".join(FLAGS), compiler, _cpu_key()]).encode()
                ).hexdigest()[:16]
                path = _cache_dir() / f"beam_attention-{key}.so"
                if not path.exists():
                    _build(compiler, path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            log.warning("native kernels not built (%s): torch attention path", detail)
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn = lib.beam_step_attention
        # B W H Hkv D | qkv stride scale rope kt v P P8 lengths own_k own_v step_stride anc t out
        fn.argtypes = [i64] * 5 + [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i64]
        fn.argtypes += [ptr, i64, ptr, i64, i64]
        fn.restype = ctypes.c_int
        fn = lib.prefill_attention
        fn.argtypes = [i64] * 6 + [ptr, i64, ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ptr, i64, i64]
        fn.restype = ctypes.c_int
        lib.row_rms.argtypes = [ptr, i64, i64, i64, ctypes.c_float, ptr]
        lib.row_rms.restype = None
        lib.silu_mul.argtypes = [ptr, i64, i64, ptr, ptr]
        lib.silu_mul.restype = None
        _lib = lib
        return lib


def _f32(x: torch.Tensor) -> int:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"native kernels take float32 CPU tensors, got {x.dtype} on {x.device}")
    return x.data_ptr()


def beam_step_attention(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,  # [N, >= (H + 2Hkv) * D] raw (pre-RoPE) q|k|v, rows contiguous
    qkv_scale: torch.Tensor | None,  # [N] row scale of qkv (RMSNorm's, see row_rms) or None
    rope: torch.Tensor,  # [B, D] (cos, sin) pairs per user
    prefix_kt: torch.Tensor,  # [B, Hkv, D, P8] contiguous, P8 = P rounded up to a multiple of 8
    prefix_v: torch.Tensor,  # [B, Hkv, P, D] contiguous
    lengths: torch.Tensor,  # [B] int64
    own: torch.Tensor,  # [C, layers, 2, N, Hkv, D] contiguous
    layer: int,
    anc: torch.Tensor,  # [>= t + 1, N] int64 contiguous
    t: int,
    n_heads: int,
    out: torch.Tensor,  # [N, H * D] contiguous
) -> torch.Tensor:
    b, hkv, d, p8 = prefix_kt.shape
    p = prefix_v.shape[2]
    n = qkv.shape[0]
    assert qkv.stride(1) == 1 and own.is_contiguous() and anc.is_contiguous()
    assert prefix_kt.is_contiguous() and prefix_v.is_contiguous() and out.is_contiguous()
    assert rope.is_contiguous() and lengths.dtype == torch.int64 and anc.dtype == torch.int64
    assert own.shape[0] > t and anc.shape[0] > t and n % b == 0
    step_stride = own.stride(0)
    own_k = own.data_ptr() + own.stride(1) * layer * own.element_size()
    own_v = own_k + own.stride(2) * own.element_size()
    call = lambda lo, hi: lib.beam_step_attention(  # noqa: E731
        b,
        n // b,
        n_heads,
        hkv,
        d,
        _f32(qkv),
        qkv.stride(0),
        _opt(qkv_scale, n),
        _f32(rope),
        _f32(prefix_kt),
        _f32(prefix_v),
        p,
        p8,
        lengths.data_ptr(),
        own_k,
        own_v,
        step_stride,
        anc.data_ptr(),
        t,
        _f32(out),
        lo,
        hi,
    )
    _check(_split(call, b), "beam_step_attention", p, p8)
    return out


def prefill_attention(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,  # [B*P, >= (H + 2Hkv) * D] raw q|k|v of right-padded prompts
    qkv_scale: torch.Tensor | None,  # [B*P] row scale of qkv or None
    rope: torch.Tensor,  # [P, D] (cos, sin) pairs per position
    lengths: torch.Tensor,  # [B] int64
    kt_out: torch.Tensor,  # [B, Hkv, D, P8] written: rotated prefix keys, transposed, padded
    v_out: torch.Tensor,  # [B, Hkv, P, D] written
    out: torch.Tensor,  # [B*P, H*D], or [B, H*D] with last_only (the last real token)
    n_heads: int,
    last_only: bool,
) -> torch.Tensor:
    b, hkv, d, p8 = kt_out.shape
    p = v_out.shape[2]
    assert qkv.stride(1) == 1 and qkv.shape[0] == b * p and rope.is_contiguous()
    assert kt_out.is_contiguous() and v_out.is_contiguous() and out.is_contiguous()
    assert out.shape[0] == (b if last_only else b * p) and lengths.dtype == torch.int64
    lengths = lengths.contiguous()
    call = lambda lo, hi: lib.prefill_attention(  # noqa: E731
        b,
        p,
        p8,
        n_heads,
        hkv,
        d,
        _f32(qkv),
        qkv.stride(0),
        _opt(qkv_scale, b * p),
        _f32(rope),
        lengths.data_ptr(),
        int(last_only),
        _f32(kt_out),
        _f32(v_out),
        _f32(out),
        lo,
        hi,
    )
    _check(_split(call, b), "prefill_attention", p, p8)
    return out


def row_rms(lib: ctypes.CDLL, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, hidden] (rows contiguous) -> [N]: 1 / sqrt(mean(x^2) + eps), RMSNorm's row scale."""
    assert x.dim() == 2 and x.stride(1) == 1
    r = x.new_empty(x.shape[0])
    base, rb, step = _f32(x), r.data_ptr(), x.stride(0) * 4

    def call(lo: int, hi: int) -> int:
        lib.row_rms(base + lo * step, hi - lo, x.shape[1], x.stride(0), eps, rb + 4 * lo)
        return 0

    _split(call, x.shape[0])
    return r


def silu_mul(lib: ctypes.CDLL, gu: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """gu = [g | u] [N, 2I] contiguous, r [N] or None -> silu(r g) * (r u) [N, I]."""
    assert gu.is_contiguous() and gu.shape[1] % 2 == 0
    n, i = gu.shape[0], gu.shape[1] // 2
    act = gu.new_empty(n, i)
    base, rb, ab = _f32(gu), _opt(r, n), act.data_ptr()

    def call(lo: int, hi: int) -> int:
        rows = None if rb is None else rb + 4 * lo
        lib.silu_mul(base + lo * 8 * i, hi - lo, i, rows, ab + lo * 4 * i)
        return 0

    _split(call, n)
    return act


_pool: ThreadPoolExecutor | None = None


def _split(call: Callable[[int, int], int], n: int) -> int:
    """call(lo, hi) over [0, n) in torch.get_num_threads() contiguous parts at once (ctypes lets
    the GIL go during a C call, and torch's own threads are idle between ops); the worst rc."""
    global _pool
    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        return call(0, n)
    with _lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="letterrec-native")
        pool = _pool
    bounds = [n * i // threads for i in range(threads + 1)]
    rest = [pool.submit(call, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    rc = call(bounds[0], bounds[1])  # this thread takes the first part
    return max([rc, *(f.result() for f in rest)])


def _opt(x: torch.Tensor | None, n: int) -> int | None:
    if x is None:
        return None
    assert x.is_contiguous() and x.numel() == n
    return _f32(x)


def _check(rc: int, name: str, p: int, p8: int) -> None:
    if rc == 1:
        raise MemoryError(f"{name}: out of memory")
    if rc != 0:
        raise ValueError(f"{name}: prefix keys padded to {p8}, not a multiple of 8 >= {p}")
