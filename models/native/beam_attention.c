/* One beam-search decoding step's attention for one layer, over a user's shared prefix K/V and
 * each beam's own generated K/V, on the CPU (float32). See models/native/__init__.py for why this
 * exists and how it is built; models/fused_decoder.py for the layouts (its torch path computes
 * the same thing with ~20 tensor ops per layer and is the reference for the tests).
 *
 * For every beam n = b*W + j of user b:
 *   q, k = RoPE(raw q, k of the step's token) at the user's position; k and v are stored as
 *   step t of the own cache (row n), and for each query head (kv head h = head / G):
 *   out = softmax([q . prefix_k[b, h, p] for p < len_b] ++
 *                 [q . own_k[s, anc[s, n], h] for s <= t]) @ (prefix_v ++ own_v)
 * `anc[s, n]` is the own-cache row holding beam n's ancestor's token of step s, so beams are never
 * copied when they are reordered. The 1/sqrt(D) scale is already folded into W_q. Padding
 * (p >= len_b) is skipped, never set to -inf: this file is built with -ffast-math.
 *
 * Prefix keys come transposed, [D, P8] per (user, kv head) with P8 a multiple of 8, so scores
 * are computed 8 keys at a time in one vector register across the D products.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 8
/* GCC/Clang vector extension: 8 floats, one AVX register on x86 (two NEON registers on ARM);
 * unaligned loads go through memcpy, which compiles to a single vector load. */
typedef float v8f __attribute__((vector_size(CHUNK * sizeof(float))));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void rope_pair(const float *restrict x, const float *restrict cs, float *restrict y,
                             int64_t half) {
    /* interleaved pairs (x0, x1) rotated by (cos, sin): the complex product (x0 + i x1) e^{i a} */
    for (int64_t i = 0; i < half; i++) {
        float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        y[2 * i] = a * c - b * s;
        y[2 * i + 1] = a * s + b * c;
    }
}

/* Attention of R query rows (q [R, D]) of one (user, kv head); D is a literal at each call site
 * so the compiler unrolls the D loops and keeps accumulators in registers. */
static inline __attribute__((always_inline)) void attend(
    const int64_t D, int64_t R, int64_t G, const float *restrict q, const float *restrict kt,
    int64_t P8, const float *restrict pv, int64_t len, const float *restrict own_k,
    const float *restrict own_v, int64_t own_step_stride, const int64_t *restrict anc, int64_t N,
    int64_t n0, int64_t Hkv, int64_t h, int64_t t, float *restrict sc, int64_t S,
    float *restrict out, int64_t out_stride) {
    const int64_t chunks = (len + CHUNK - 1) / CHUNK;
    /* Prefix scores, 4 query rows x 8 keys per pass: each key vector loaded once for 4 rows. */
    int64_t r0 = 0;
    for (; r0 + 4 <= R; r0 += 4) {
        const float *q0 = q + r0 * D;
        for (int64_t c = 0; c < chunks; c++) {
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            const float *k = kt + c * CHUNK;
#pragma GCC unroll 8
            for (int64_t d = 0; d < D; d++) {
                const v8f kv = load8(k + d * P8);
                a0 += q0[d] * kv;
                a1 += q0[D + d] * kv;
                a2 += q0[2 * D + d] * kv;
                a3 += q0[3 * D + d] * kv;
            }
            memcpy(sc + r0 * S + c * CHUNK, &a0, sizeof a0);
            memcpy(sc + (r0 + 1) * S + c * CHUNK, &a1, sizeof a1);
            memcpy(sc + (r0 + 2) * S + c * CHUNK, &a2, sizeof a2);
            memcpy(sc + (r0 + 3) * S + c * CHUNK, &a3, sizeof a3);
        }
    }
    for (; r0 < R; r0++) {
        for (int64_t c = 0; c < chunks; c++) {
            v8f acc = {0};
            const float *k = kt + c * CHUNK;
            for (int64_t d = 0; d < D; d++) acc += q[r0 * D + d] * load8(k + d * P8);
            memcpy(sc + r0 * S + c * CHUNK, &acc, sizeof acc);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        const float *qr = q + r * D;
        float *s = sc + r * S;
        const int64_t n = n0 + r / G;
        for (int64_t u = 0; u <= t; u++) {
            const float *k = own_k + u * own_step_stride + (anc[u * N + n] * Hkv + h) * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += qr[d] * k[d];
            s[len + u] = dot;
        }
        const int64_t live = len + t + 1;
        float m = s[0];
        for (int64_t p = 1; p < live; p++) m = s[p] > m ? s[p] : m;
        float sum = 0.0f;
        for (int64_t p = 0; p < live; p++) {
            s[p] = expf(s[p] - m);
            sum += s[p];
        }
        float o[D];
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t p = 0; p < len; p++) {
            const float e = s[p], *v = pv + p * D;
            for (int64_t d = 0; d < D; d++) o[d] += e * v[d];
        }
        for (int64_t u = 0; u <= t; u++) {
            const float e = s[len + u];
            const float *v = own_v + u * own_step_stride + (anc[u * N + n] * Hkv + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] += e * v[d];
        }
        float *dst = out + (r / G) * out_stride + (r % G) * D;
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) dst[d] = o[d] * inv;
    }
}

int beam_step_attention(int64_t B, int64_t W, int64_t H, int64_t Hkv, int64_t D,
                        const float *restrict qkv, int64_t qkv_stride, const float *restrict rope,
                        const float *restrict prefix_kt, const float *restrict prefix_v, int64_t P,
                        int64_t P8, const int64_t *restrict lengths, float *restrict own_k,
                        float *restrict own_v, int64_t own_step_stride,
                        const int64_t *restrict anc, int64_t t, float *restrict out) {
    const int64_t G = H / Hkv, N = B * W, R = W * G, S = P8 + t + 1, half = D / 2;
    if (P8 % CHUNK || P8 < P) return 2;
    float *q = malloc(sizeof(float) * (size_t)(R * D));
    float *sc = malloc(sizeof(float) * (size_t)(R * S));
    if (!q || !sc) {
        free(q), free(sc);
        return 1;
    }
    /* This step's k (rotated) and v into the own cache, row n of step t. */
    for (int64_t n = 0; n < N; n++) {
        const float *row = qkv + n * qkv_stride, *cs = rope + (n / W) * D;
        float *kd = own_k + t * own_step_stride + n * Hkv * D;
        float *vd = own_v + t * own_step_stride + n * Hkv * D;
        for (int64_t h = 0; h < Hkv; h++) rope_pair(row + (H + h) * D, cs, kd + h * D, half);
        memcpy(vd, row + (H + Hkv) * D, sizeof(float) * (size_t)(Hkv * D));
    }
    for (int64_t b = 0; b < B; b++) {
        const float *cs = rope + b * D;
        const int64_t len = lengths[b] < P ? lengths[b] : P;
        for (int64_t h = 0; h < Hkv; h++) {
            const float *kt = prefix_kt + (b * Hkv + h) * D * P8; /* [D, P8] */
            const float *pv = prefix_v + (b * Hkv + h) * P * D;   /* [P, D] */
            /* queries of the user's beams for this kv head: row r = j*G + g */
            for (int64_t j = 0; j < W; j++)
                for (int64_t g = 0; g < G; g++)
                    rope_pair(qkv + (b * W + j) * qkv_stride + (h * G + g) * D, cs,
                              q + (j * G + g) * D, half);
            float *o = out + b * W * H * D + h * G * D;
#define ATTEND(DD)                                                                             \
    attend(DD, R, G, q, kt, P8, pv, len, own_k, own_v, own_step_stride, anc, N, b * W, Hkv, h, t, \
           sc, S, o, H * D)
            switch (D) {
            case 32: ATTEND(32); break;
            case 64: ATTEND(64); break;
            case 128: ATTEND(128); break;
            default: ATTEND(D);
            }
#undef ATTEND
        }
    }
    free(q), free(sc);
    return 0;
}
