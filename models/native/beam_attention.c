/* Attention kernels of the fused decoder (models/fused_decoder.py) on the CPU, float32: the
 * prefill's causal attention and each beam-search step's attention over a user's shared prefix
 * K/V plus every beam's own generated K/V. See models/native/__init__.py for why they exist and
 * how they are built; the decoder's torch path computes the same with ~20 tensor ops per layer
 * and is the reference in tests/models/test_native.py.
 *
 * Layouts. Per (user b, kv head h): prefix keys rotated and transposed, kt [D, P8] with P8 a
 * multiple of 8 (zero columns past the prompt), so 8 keys' scores sit in one vector register
 * across the D products; prefix values [P, D]. Own cache: row n = b*W + j of step s at
 * own_k + s*own_step_stride + (n*Hkv + h)*D (same for own_v); `anc[s*N + n]` is the row that
 * holds beam n's ancestor's token of step s, so reordering beams never copies K/V.
 *
 * The 1/sqrt(D) scale is folded into W_q by the decoder. Padding keys (p >= len_b) are skipped,
 * never set to -inf: this file is built with -ffast-math. D must be a multiple of 8.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 8
/* GCC/Clang vector extension: 8 floats, one AVX register on x86 (two NEON registers on ARM);
 * unaligned loads and stores go through memcpy, which compiles to single vector moves. */
typedef float v8f __attribute__((vector_size(CHUNK * sizeof(float))));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline void scaled_copy(const float *restrict x, float scale, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = scale * x[i];
}

static inline void rope_pair(const float *restrict x, float scale, const float *restrict cs,
                             float *restrict y, int64_t half) {
    /* interleaved pairs (x0, x1), times `scale`, rotated by (cos, sin): the complex product
     * (x0 + i x1) e^{i a} */
    for (int64_t i = 0; i < half; i++) {
        float a = scale * x[2 * i], b = scale * x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        y[2 * i] = a * c - b * s;
        y[2 * i + 1] = a * s + b * c;
    }
}

/* sc[r*S + p] = q[r] . kt[:, p] for R rows and p < 8*chunks; 4 rows x 2 key vectors per pass,
 * so each loaded key vector serves 4 rows and each broadcast query value 2 key vectors. */
static inline __attribute__((always_inline)) void scores(const int64_t D, int64_t R,
                                                         const float *restrict q,
                                                         const float *restrict kt, int64_t P8,
                                                         int64_t chunks, float *restrict sc,
                                                         int64_t S) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
        const float *q0 = q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
        int64_t c = 0;
        for (; c + 2 <= chunks; c += 2) {
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
            const float *k = kt + c * CHUNK;
            for (int64_t d = 0; d < D; d++) {
                const v8f k0 = load8(k + d * P8), k1 = load8(k + d * P8 + CHUNK);
                a0 += q0[d] * k0, b0 += q0[d] * k1;
                a1 += q1[d] * k0, b1 += q1[d] * k1;
                a2 += q2[d] * k0, b2 += q2[d] * k1;
                a3 += q3[d] * k0, b3 += q3[d] * k1;
            }
            float *s = sc + r * S + c * CHUNK;
            store8(s, a0), store8(s + CHUNK, b0);
            store8(s + S, a1), store8(s + S + CHUNK, b1);
            store8(s + 2 * S, a2), store8(s + 2 * S + CHUNK, b2);
            store8(s + 3 * S, a3), store8(s + 3 * S + CHUNK, b3);
        }
        for (; c < chunks; c++) {
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            const float *k = kt + c * CHUNK;
            for (int64_t d = 0; d < D; d++) {
                const v8f k0 = load8(k + d * P8);
                a0 += q0[d] * k0, a1 += q1[d] * k0, a2 += q2[d] * k0, a3 += q3[d] * k0;
            }
            float *s = sc + r * S + c * CHUNK;
            store8(s, a0), store8(s + S, a1), store8(s + 2 * S, a2), store8(s + 3 * S, a3);
        }
    }
    for (; r < R; r++)
        for (int64_t c = 0; c < chunks; c++) {
            v8f a = {0};
            const float *k = kt + c * CHUNK;
            for (int64_t d = 0; d < D; d++) a += q[r * D + d] * load8(k + d * P8);
            store8(sc + r * S + c * CHUNK, a);
        }
}

/* s[0, live) <- exp(s - max); returns the sum. Arguments are clamped at -60 (exp: 8.8e-27,
 * nothing beside the max's 1): the C library's vector expf leaves its fast path for the whole
 * vector when one lane would underflow, which made whole steps 3x slower on real scores. */
static inline float softmax_numerators(float *restrict s, int64_t live) {
    float m = s[0];
    for (int64_t p = 1; p < live; p++) m = s[p] > m ? s[p] : m;
    float sum = 0.0f;
    for (int64_t p = 0; p < live; p++) {
        s[p] = expf(fmaxf(s[p] - m, -60.0f));
        sum += s[p];
    }
    return sum;
}

/* o0 = sum_p e0[p] v[p], o1 = sum_p e1[p] v[p] over p < keys (v [keys, D]): two rows per pass
 * share every loaded value vector; accumulators stay in registers for D <= 64. */
static inline __attribute__((always_inline)) void weighted_values(
    const int64_t D, int64_t keys, const float *restrict e0, const float *restrict e1,
    const float *restrict v, float *restrict o0, float *restrict o1) {
    v8f x[D / CHUNK], y[D / CHUNK];
    for (int64_t c = 0; c < D / CHUNK; c++) x[c] = (v8f){0}, y[c] = (v8f){0};
    for (int64_t p = 0; p < keys; p++) {
        const float w0 = e0[p], w1 = e1[p];
        for (int64_t c = 0; c < D / CHUNK; c++) {
            const v8f vv = load8(v + p * D + c * CHUNK);
            x[c] += w0 * vv, y[c] += w1 * vv;
        }
    }
    for (int64_t c = 0; c < D / CHUNK; c++) store8(o0 + c * CHUNK, x[c]);
    if (o1)
        for (int64_t c = 0; c < D / CHUNK; c++) store8(o1 + c * CHUNK, y[c]);
}

/* Prefix values for rows (r, r+1) (the last row of an odd count pairs with itself). */
static inline __attribute__((always_inline)) void values_rows(const int64_t D, int64_t R,
                                                              const float *restrict sc, int64_t S,
                                                              int64_t keys,
                                                              const float *restrict v,
                                                              float *const *restrict dst) {
    for (int64_t r = 0; r < R; r += 2) {
        const int two = r + 1 < R;
        weighted_values(D, keys, sc + r * S, sc + (r + two) * S, v, dst[r], two ? dst[r + 1] : 0);
    }
}

/* ---- one decoding step ---------------------------------------------------------------------- */
static inline __attribute__((always_inline)) void step_head(
    const int64_t D, int64_t W, int64_t G, const float *restrict q, const float *restrict kt,
    int64_t P8, const float *restrict pv, int64_t len, const float *restrict own_k,
    const float *restrict own_v, int64_t own_step_stride, const int64_t *restrict anc, int64_t N,
    int64_t n0, int64_t Hkv, int64_t h, int64_t t, float *restrict sc, int64_t S,
    float **restrict dst) {
    const int64_t R = W * G;
    scores(D, R, q, kt, P8, (len + CHUNK - 1) / CHUNK, sc, S);
    float sums[R];
    for (int64_t r = 0; r < R; r++) {
        const float *qr = q + r * D;
        float *s = sc + r * S;
        const int64_t n = n0 + r / G;
        for (int64_t u = 0; u <= t; u++) { /* the beam's own tokens after its prefix scores */
            const float *k = own_k + u * own_step_stride + (anc[u * N + n] * Hkv + h) * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += qr[d] * k[d];
            s[len + u] = dot;
        }
        sums[r] = softmax_numerators(s, len + t + 1);
    }
    values_rows(D, R, sc, S, len, pv, dst);
    for (int64_t r = 0; r < R; r++) {
        const float *s = sc + r * S;
        const int64_t n = n0 + r / G;
        float *o = dst[r];
        for (int64_t u = 0; u <= t; u++) {
            const float e = s[len + u];
            const float *v = own_v + u * own_step_stride + (anc[u * N + n] * Hkv + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] += e * v[d];
        }
        const float inv = 1.0f / sums[r];
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
}

/* For every beam n = b*W + j: q, k = RoPE(the step token's raw q, k) at the user's position;
 * k, v stored as step t of the own cache (row n); out[n, head] = softmax over the user's prefix
 * keys and the beam's own keys (steps 0..t) of q . k, applied to the matching values.
 *   qkv [N, >= (H + 2Hkv) * D] (row stride qkv_stride), times qkv_scale [N] where not NULL
 *   (RMSNorm's row scale, see row_rms), rope [B, D] (cos, sin) pairs,
 *   prefix_kt [B, Hkv, D, P8], prefix_v [B, Hkv, P, D], out [N, H*D]. */
int beam_step_attention(int64_t B, int64_t W, int64_t H, int64_t Hkv, int64_t D,
                        const float *restrict qkv, int64_t qkv_stride,
                        const float *restrict qkv_scale, const float *restrict rope,
                        const float *restrict prefix_kt, const float *restrict prefix_v, int64_t P,
                        int64_t P8, const int64_t *restrict lengths, float *restrict own_k,
                        float *restrict own_v, int64_t own_step_stride,
                        const int64_t *restrict anc, int64_t t, float *restrict out,
                        int64_t b_begin, int64_t b_end) {
    /* users [b_begin, b_end) only: callers split a batch across threads this way */
    const int64_t G = H / Hkv, N = B * W, R = W * G, S = P8 + t + 1, half = D / 2;
    if (P8 % CHUNK || P8 < P || D % CHUNK) return 2;
    float *q = malloc(sizeof(float) * (size_t)(R * D));
    float *sc = malloc(sizeof(float) * (size_t)(R * S));
    float **dst = malloc(sizeof(float *) * (size_t)R);
    if (!q || !sc || !dst) {
        free(q), free(sc), free(dst);
        return 1;
    }
    for (int64_t b = b_begin; b < b_end; b++) { /* a user's beams read only its rows */
        const float *cs = rope + b * D;
        const int64_t len = lengths[b] < P ? lengths[b] : P;
        for (int64_t n = b * W; n < (b + 1) * W; n++) {
            const float *row = qkv + n * qkv_stride, sn = qkv_scale ? qkv_scale[n] : 1.0f;
            float *kd = own_k + t * own_step_stride + n * Hkv * D;
            float *vd = own_v + t * own_step_stride + n * Hkv * D;
            for (int64_t h = 0; h < Hkv; h++)
                rope_pair(row + (H + h) * D, sn, cs, kd + h * D, half);
            scaled_copy(row + (H + Hkv) * D, sn, vd, Hkv * D);
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const float *kt = prefix_kt + (b * Hkv + h) * D * P8;
            const float *pv = prefix_v + (b * Hkv + h) * P * D;
            for (int64_t j = 0; j < W; j++) /* row r = j*G + g */
                for (int64_t g = 0; g < G; g++) {
                    rope_pair(qkv + (b * W + j) * qkv_stride + (h * G + g) * D,
                              qkv_scale ? qkv_scale[b * W + j] : 1.0f, cs, q + (j * G + g) * D,
                              half);
                    dst[j * G + g] = out + (b * W + j) * H * D + (h * G + g) * D;
                }
#define STEP(DD)                                                                                \
    step_head(DD, W, G, q, kt, P8, pv, len, own_k, own_v, own_step_stride, anc, N, b * W, Hkv, h, \
              t, sc, S, dst)
            switch (D) {
            case 32: STEP(32); break;
            case 64: STEP(64); break;
            case 128: STEP(128); break;
            default: STEP(D);
            }
#undef STEP
        }
    }
    free(q), free(sc), free(dst);
    return 0;
}

/* ---- prefill ------------------------------------------------------------------------------- */
static inline __attribute__((always_inline)) void prefill_head(
    const int64_t D, int64_t G, int last_only, int64_t len, const float *restrict kt, int64_t P8,
    const float *restrict pv, float *restrict q, float *restrict sc, float **restrict dst,
    const float *restrict base, int64_t qkv_stride, const float *restrict scale,
    const float *restrict rope, int64_t h, float *restrict out_rows, int64_t out_stride) {
    const int64_t half = D / 2, first = last_only ? len - 1 : 0;
    for (int64_t i0 = first; i0 < len; i0 += 4) { /* up to 4 positions x G heads: r = il*G + g */
        const int64_t ni = len - i0 < 4 ? len - i0 : 4, R = ni * G, keys = i0 + ni;
        for (int64_t il = 0; il < ni; il++)
            for (int64_t g = 0; g < G; g++) {
                const int64_t r = il * G + g;
                rope_pair(base + (i0 + il) * qkv_stride + (h * G + g) * D,
                          scale ? scale[i0 + il] : 1.0f, rope + (i0 + il) * D, q + r * D, half);
                dst[r] = out_rows + (last_only ? 0 : (i0 + il) * out_stride) + (h * G + g) * D;
            }
        scores(D, R, q, kt, P8, (keys + CHUNK - 1) / CHUNK, sc, P8);
        float sums[R];
        for (int64_t r = 0; r < R; r++) {
            const int64_t live = i0 + r / G + 1; /* causal: keys 0..i */
            float *s = sc + r * P8;
            sums[r] = softmax_numerators(s, live);
            for (int64_t p = live; p < keys; p++) s[p] = 0.0f;
        }
        values_rows(D, R, sc, P8, keys, pv, dst);
        for (int64_t r = 0; r < R; r++) {
            const float inv = 1.0f / sums[r];
            for (int64_t d = 0; d < D; d++) dst[r][d] *= inv;
        }
    }
}

/* Prefill attention for one layer over right-padded prompts: RoPE (position = token index),
 * the user's prefix K (rotated, transposed, zero-padded to P8 keys) and V written out for the
 * decoding steps, and causal attention for query positions [first, len_b) of each user, where
 * first = len_b - 1 when `last_only` (the last layer needs the last real token only) and 0
 * otherwise. Output rows: b*P + i, or b when last_only; rows of padding positions are zeroed.
 *   qkv [B*P, >= (H + 2Hkv) * D] (row stride qkv_stride), times qkv_scale [B*P] where not NULL,
 *   rope [P, D] (cos, sin) pairs,
 *   kt_out [B, Hkv, D, P8], v_out [B, Hkv, P, D], out [B*P or B, H*D]; users [b_begin, b_end). */
int prefill_attention(int64_t B, int64_t P, int64_t P8, int64_t H, int64_t Hkv, int64_t D,
                      const float *restrict qkv, int64_t qkv_stride,
                      const float *restrict qkv_scale, const float *restrict rope,
                      const int64_t *restrict lengths, int last_only, float *restrict kt_out,
                      float *restrict v_out, float *restrict out, int64_t b_begin,
                      int64_t b_end) {
    const int64_t G = H / Hkv, half = D / 2;
    if (P8 % CHUNK || P8 < P || D % CHUNK) return 2;
    float *kr = malloc(sizeof(float) * (size_t)D);
    float *q = malloc(sizeof(float) * (size_t)(4 * G * D));
    float *sc = malloc(sizeof(float) * (size_t)(4 * G * P8));
    float **dst = malloc(sizeof(float *) * (size_t)(4 * G));
    if (!kr || !q || !sc || !dst) {
        free(kr), free(q), free(sc), free(dst);
        return 1;
    }
    for (int64_t b = b_begin; b < b_end; b++) {
        const int64_t len = lengths[b] < P ? lengths[b] : P;
        const float *base = qkv + b * P * qkv_stride;
        const float *scale = qkv_scale ? qkv_scale + b * P : 0;
        float *rows = out + (last_only ? b : b * P) * H * D;
        if (!last_only) /* padding positions' rows: zero, never read as anything else */
            memset(rows + len * H * D, 0, sizeof(float) * (size_t)((P - len) * H * D));
        for (int64_t h = 0; h < Hkv; h++) {
            float *kt = kt_out + (b * Hkv + h) * D * P8;
            float *pv = v_out + (b * Hkv + h) * P * D;
            for (int64_t d = 0; d < D; d++) /* padding keys: zero (read in whole vectors) */
                memset(kt + d * P8 + len, 0, sizeof(float) * (size_t)(P8 - len));
            for (int64_t p = 0; p < len; p++) {
                const float *row = base + p * qkv_stride, sp = scale ? scale[p] : 1.0f;
                rope_pair(row + (H + h) * D, sp, rope + p * D, kr, half);
                for (int64_t d = 0; d < D; d++) kt[d * P8 + p] = kr[d];
                scaled_copy(row + (H + Hkv + h) * D, sp, pv + p * D, D);
            }
#define PREFILL(DD)                                                                             \
    prefill_head(DD, G, last_only, len, kt, P8, pv, q, sc, dst, base, qkv_stride, scale, rope, h, \
                 rows, H * D)
            switch (D) {
            case 32: PREFILL(32); break;
            case 64: PREFILL(64); break;
            case 128: PREFILL(128); break;
            default: PREFILL(D);
            }
#undef PREFILL
        }
    }
    free(kr), free(q), free(sc), free(dst);
    return 0;
}

/* ---- the MLP half's elementwise work ------------------------------------------------------- */
/* r[i] = 1 / sqrt(mean_j x[i, j]^2 + eps): RMSNorm's row scale. Since (r x) W = r (x W), the
 * decoder multiplies the matmul's rows by r afterwards (silu_mul, the attention kernels' q/k/v
 * row scale) instead of writing a normalised copy of x. */
void row_rms(const float *restrict x, int64_t n, int64_t h, int64_t stride, float eps,
             float *restrict r) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * stride;
        float ss = 0.0f;
        for (int64_t j = 0; j < h; j++) ss += xi[j] * xi[j];
        r[i] = 1.0f / sqrtf(ss / (float)h + eps);
    }
}

/* act[i, j] = silu(r_i g[i, j]) * (r_i u[i, j]) for gu = [g | u] ([n, 2I]); r may be NULL (1).
 * exp's argument is clamped at 80 (silu(-80) = -1.4e-33: zero beside any other term; the vector
 * expf leaves its fast path for a whole vector when a lane overflows). */
void silu_mul(const float *restrict gu, int64_t n, int64_t I, const float *restrict r,
              float *restrict act) {
    for (int64_t i = 0; i < n; i++) {
        const float s = r ? r[i] : 1.0f, *g = gu + i * 2 * I, *u = g + I;
        float *a = act + i * I;
        for (int64_t j = 0; j < I; j++) {
            const float z = s * g[j];
            a[j] = z / (1.0f + expf(fminf(-z, 80.0f))) * (s * u[j]);
        }
    }
}
