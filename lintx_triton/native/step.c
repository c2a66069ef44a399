/* One decode step of causal linear attention on the CPU, fp32: the arithmetic of
 * lintx_triton.reference.linear_attention_step_torch_ in one pass over the state (issue #17).
 *
 * For each batch row b and kv head h (its G = H / HKV query heads share its state):
 *   S[b, h] = S0[b, h] + phi(k[b, h]) v[b, h]^T        [M, DV]
 *   z[b, h] = z0[b, h] + phi(k[b, h])                   [M]
 *   num = phi(q)^T S, den = phi(q)^T z                   (the updated state, as the torch step)
 *   o = scale num / (scale den + eps)   (normalize), o = scale num (not)
 * Each row of S is read once, updated, and folded into the G outputs while it is in L1: one read and one write
 * of the state, its memory floor. S0 == S (and z0 == z) updates in place, else S0, z0 are read and S, z written.
 *
 * Layouts (contiguous, checked by the caller): q [B, H, D], k [B, HKV, D], v [B, HKV, DV], S [B, HKV, M, DV],
 * z [B, HKV, M], o [B, H, DV]; M = D (elementwise maps only). Query head i uses kv head i / G.
 *
 * dims: B, H, HKV, D, DV, map (LINTX_MAP_*). Built with the system C compiler at the first eligible call
 * (lintx_triton/native/__init__.py) with -O3 -std=c99: no -march (the clones below pick the ISA at load time, so
 * the cached binary runs on any CPU of its machine type), no -ffast-math (comparisons keep IEEE semantics: NaN
 * propagates as in torch), and ISO C's no-contraction of a * b + c into an FMA: every clone rounds alike (the
 * sums run in the same order at every vector width), so the results do not depend on the CPU.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GCC's (and clang's) function multiversioning: one clone per ISA in the same binary, the loader's resolver
 * picks the one the running CPU has, so the cached library is safe on any x86-64 CPU. The helpers below are
 * always inlined, so each clone gets them compiled for its ISA. AVX-512 against the baseline (SSE2): 8.3 against
 * 11.2 us at B = 1, 130 against 174 us at B = 16 (H = 8, D = DV = 64, elu, one EPYC core). */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define LINTX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef LINTX_CLONES
#define LINTX_CLONES
#endif
#define LINTX_INLINE static inline __attribute__((always_inline))

/* The maps, as lintx_triton/feature_maps/builtin.py defines them (the Triton expression in the comment). */
enum { LINTX_MAP_ELU = 1, LINTX_MAP_RELU = 2, LINTX_MAP_IDENTITY = 3 };

/* exp(x) for x <= 0 (Cephes' expf: Cody-Waite reduction by ln 2, a degree-7 polynomial; within 2 ulp of the
 * exact value, checked against float64 exp in tests/test_native_step.py), written so that it vectorizes: libm's
 * expf is a call per element, 2.7 ns each, 44 us of a 130 us step at B = 16 (H = 8, D = 64). x = -inf gives 0,
 * results below 2^-126 come out subnormal (rounded once), NaN is left to the caller. */
LINTX_INLINE float exp_nonpos(float x) {
    const float xc = x < -104.0f ? -104.0f : (x <= 0.0f ? x : 0.0f);  /* exp(-104) rounds to 0; NaN -> 0 */
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x / ln 2): 1.5 2^23 */
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  /* x - n ln 2, |r| <= ln 2 / 2 */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;  /* exp(r) */
    /* 2^n as two factors 2^(n/2) 2^(n - n/2), each normal for n >= -150: one rounding into the subnormals */
    const int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1;
    const uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

/* y = phi(x) over n entries */
LINTX_INLINE void phi(int map, float *restrict y, const float *restrict x, int64_t n) {
    switch (map) {
    case LINTX_MAP_ELU:  /* tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0))); NaN stays NaN */
        for (int64_t i = 0; i < n; i++) {
            const float xi = x[i], e = exp_nonpos(xi);
            y[i] = xi > 0.0f ? xi + 1.0f : (xi <= 0.0f ? e : xi);
        }
        break;
    case LINTX_MAP_RELU:  /* tl.maximum(x, 0.0); NaN stays NaN, as torch.relu */
        for (int64_t i = 0; i < n; i++)
            y[i] = x[i] < 0.0f ? 0.0f : x[i];
        break;
    default:  /* LINTX_MAP_IDENTITY: x */
        memcpy(y, x, (size_t)n * sizeof(float));
        break;
    }
}

/* Where a row of the new state starts from: the state itself (in place), or another state. */
enum { SRC_INPLACE = 0, SRC_STATE = 1 };

/* Chunks of CHUNK columns (one AVX-512 register, two AVX2 ones) with a constant trip count: no per-row loop
 * prologue, alignment peeling or aliasing check, which cost more than the arithmetic at DV = 64 (a plain loop
 * per row: 129 against 80 us at B = 16, identity map). */
#define CHUNK 16

LINTX_INLINE float row_start(int src, const float *restrict row, const float *restrict row0, int64_t j) {
    return src == SRC_INPLACE ? row[j] : row0[j];
}

/* row = start + b v, then o_g += a_g row for the G query heads (a = fq + m, stride M; o stride DV) */
LINTX_INLINE void row_step(int src, float *restrict row, const float *restrict row0, float b,
                           const float *restrict v, const float *restrict a, int64_t M, float *restrict o,
                           int64_t DV, int64_t G) {
    int64_t j = 0;
    if (G == 1) {  /* the update and the output in one sweep */
        const float a0 = a[0];
        for (; j + CHUNK <= DV; j += CHUNK)
            for (int64_t i = j; i < j + CHUNK; i++) {
                const float r = row_start(src, row, row0, i) + b * v[i];
                row[i] = r;
                o[i] += a0 * r;
            }
        for (; j < DV; j++) {
            const float r = row_start(src, row, row0, j) + b * v[j];
            row[j] = r;
            o[j] += a0 * r;
        }
        return;
    }
    for (; j + CHUNK <= DV; j += CHUNK)
        for (int64_t i = j; i < j + CHUNK; i++)
            row[i] = row_start(src, row, row0, i) + b * v[i];
    for (; j < DV; j++)
        row[j] = row_start(src, row, row0, j) + b * v[j];
    for (int64_t g = 0; g < G; g++) {
        const float ag = a[g * M];
        float *restrict og = o + g * DV;
        for (j = 0; j + CHUNK <= DV; j += CHUNK)
            for (int64_t i = j; i < j + CHUNK; i++)
                og[i] += ag * row[i];
        for (; j < DV; j++)
            og[j] += ag * row[j];
    }
}

/* One (b, kv head): z, the normalizers, then S row by row into the G outputs, which are then scaled. */
LINTX_INLINE void head(int src, const float *restrict S0, float *restrict S, const float *restrict z0,
                       float *restrict z, const float *restrict v, const float *restrict fk,
                       const float *restrict fq, double *restrict den, float *restrict o, int64_t M, int64_t DV,
                       int64_t G, int normalize, float scale, float eps) {
    /* z = z0 + phi(k), then den = phi(q)^T z (in double: cheap here) */
    for (int64_t m = 0; m < M; m++)
        z[m] = row_start(src, z, z0, m) + fk[m];
    for (int64_t g = 0; g < G; g++) {
        double d = 0.0;
        for (int64_t m = 0; m < M; m++)
            d += (double)fq[g * M + m] * z[m];
        den[g] = d;
    }
    memset(o, 0, (size_t)(G * DV) * sizeof(float));
    for (int64_t m = 0; m < M; m++)  /* row m of S: updated, then folded into the outputs while in L1 */
        row_step(src, S + m * DV, src == SRC_STATE ? S0 + m * DV : NULL, fk[m], v, fq + m, M, o, DV, G);
    for (int64_t g = 0; g < G; g++) {
        float *restrict og = o + g * DV;
        if (normalize) {
            /* as the torch step: (scale num) / (scale den + eps), in fp32 */
            const float d = (float)den[g] * scale + eps;
            for (int64_t j = 0; j < DV; j++)
                og[j] = og[j] * scale / d;
        } else if (scale != 1.0f) {
            for (int64_t j = 0; j < DV; j++)
                og[j] *= scale;
        }
    }
}

/* Returns 0, or 1 when the scratch (phi of a head group's queries and of its key) cannot be allocated; nothing
 * is written then. */
LINTX_CLONES int lintx_step_f32(const int64_t *dims, const float *q, const float *k, const float *v,
                                const float *S0, const float *z0, float *S, float *z, float *o, int normalize,
                                float scale, float eps) {
    const int64_t B = dims[0], H = dims[1], HKV = dims[2], D = dims[3], DV = dims[4];
    const int map = (int)dims[5];
    const int64_t G = H / HKV, M = D;
    float *fk = malloc((size_t)((G + 1) * M + 1) * sizeof(float));  /* [M] phi(k), then [G, M] phi(q) */
    double *den = malloc((size_t)(G + 1) * sizeof(double));
    if (fk == NULL || den == NULL) {
        free(fk);
        free(den);
        return 1;
    }
    float *fq = fk + M;
    for (int64_t bh = 0; bh < B * HKV; bh++) {
        /* the group's G query heads are adjacent in q and o */
        const int64_t st = bh * M * DV;
        float *Sp = S + st, *zp = z + bh * M, *op = o + bh * G * DV;
        const float *vp = v + bh * DV;
        phi(map, fk, k + bh * D, M);
        phi(map, fq, q + bh * G * D, G * M);
        /* one call per source, each inlined with its constant: the compiler sees no aliasing in any */
        if (S0 == S)
            head(SRC_INPLACE, NULL, Sp, NULL, zp, vp, fk, fq, den, op, M, DV, G, normalize, scale, eps);
        else
            head(SRC_STATE, S0 + st, Sp, z0 + bh * M, zp, vp, fk, fq, den, op, M, DV, G, normalize, scale, eps);
    }
    free(fk);
    free(den);
    return 0;
}
