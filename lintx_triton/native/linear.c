/* A decode step's projections: y = x w^T + b for the few rows of one token per sequence (nn.Linear's layout:
 * w [N, K] row-major), called by LinearAttention.step on the CPU (lintx_triton/native/__init__.py's linear).
 * At 16 rows torch's matmul (MKL) spent 480-570 us on the four 512 x 512 projections of one step, three times a
 * copy of the step's state and weights (issue #17, bench/NOTES.md); this file 370-450 us, 63-75 % of the FMA peak.
 *
 * Each tile is MB rows of x by NB rows of w: MB x NB vector accumulators run along K (W floats at a time), then
 * each is summed across its lanes (a full AVX-512 tile's 16 at once: sums16), plus the K % W tail, plus the
 * bias. The NB rows of w of a tile stay in L1
 * while the tiles of every row block of x pass them. Compiled with -ffp-contract=fast: an FMA where the ISA has
 * one.
 *
 * While a block's tiles run, they prefetch the next block's rows of w, a few 64-byte lines at each step along K,
 * in address order: with the weights out of the caches (a model's other layers pass through them between two
 * steps of this one) a 16 x 512 x 512 projection 187-223 -> 119-136 us and a 1 x 512 x 512 one 97-125 -> 52-65 us;
 * with the weights in L3 (this layer alone, as bench/cpu_decode.py runs it) 16 rows unchanged (90-110 us), one
 * row 15-19 -> 20-32 us (bench/NOTES.md, session 11). Prefetching each next row at the step's own offset instead
 * kept one row's L3 time but lost most of its gain from memory. */

#include "maps.h"

/* a: the entries' order (int64; addresses as integers) */
enum { L_M, L_N, L_K, L_X, L_LDX, L_W, L_B, L_Y, L_LDY, L_LEN };

/* a vector's lanes summed: halves added down to 4 lanes (vector adds), then those 4 */
typedef float hv4 __attribute__((vector_size(4 * sizeof(float))));
typedef float hv8 __attribute__((vector_size(8 * sizeof(float))));
typedef float hv16 __attribute__((vector_size(16 * sizeof(float))));
LINTX_INLINE float hsum4(hv4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }
LINTX_INLINE float hsum8(hv8 v) {
    hv4 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    return hsum4(lo + hi);
}
LINTX_INLINE float hsum16(hv16 v) {
    hv8 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    return hsum8(lo + hi);
}

/* r[p] = hsum16(a[p]) for the 16 accumulators of a 4 x 4 tile, with the same additions in the same order (lane l
 * + lane l + 8, then + l + 4, then (0 + 2) + (1 + 3)): the same values (a NaN's payload may differ: the compiler
 * may swap an add's operands), but done on all 16 at once: each level adds two halves of a pair of vectors,
 * packing the pair's partial sums into one (8 + 4 + 2 + 1 vector adds and twice as many shuffles, against
 * 16 x 4 adds and their extracts). A 16 x 512 x 512 projection 2-14 % faster (bench/NOTES.md). a is taken in the
 * order IN, so that lane p of the last vector is a[p]'s sum. */
#if defined(__clang__)
#define LINTX_HALVES(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t hi16 __attribute__((vector_size(16 * sizeof(int32_t))));
#define LINTX_HALVES(a, b, ...) __builtin_shuffle(a, b, (hi16){__VA_ARGS__})
#endif
LINTX_INLINE void sums16(const hv16 *a, float *r) {
    static const int IN[16] = {0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15};
    hv16 s[8], t[4], u[2];
    for (int m = 0; m < 8; m++) /* [a 8 | b 8]: lanes l + l + 8 */
        s[m] = LINTX_HALVES(a[IN[2 * m]], a[IN[2 * m + 1]], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + LINTX_HALVES(a[IN[2 * m]], a[IN[2 * m + 1]], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                              30, 31);
    for (int n = 0; n < 4; n++) /* 4-lane blocks: + l + 4 */
        t[n] = LINTX_HALVES(s[2 * n], s[2 * n + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + LINTX_HALVES(s[2 * n], s[2 * n + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int q = 0; q < 2; q++) /* pairs: (0, 1) + (2, 3) */
        u[q] = LINTX_HALVES(t[2 * q], t[2 * q + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
               + LINTX_HALVES(t[2 * q], t[2 * q + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    const hv16 v = LINTX_HALVES(u[0], u[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
                   + LINTX_HALVES(u[0], u[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    memcpy(r, &v, sizeof v);
}

#define LINTX_LINEAR(W, MB, NB)                                                                                     \
    typedef float lv##W __attribute__((vector_size(W * sizeof(float))));                                           \
    /* y[i, j] for rows i < rows (<= MB) of x and j < cols (<= NB) of w; b NULL: no bias. Also prefetches the   \
     * lines [pf0, pf1) of pf (64 bytes each), a few at each step along K (none when pf0 == pf1) */           \
    LINTX_INLINE void tile##W(const float *restrict x, int64_t ldx, const float *restrict w, int64_t K,            \
                              const float *restrict b, float *restrict y, int64_t ldy, const int rows,             \
                              const int cols, const char *pf, int64_t pf0, const int64_t pf1) {                   \
        const int64_t steps = K / W, pf_step = steps ? (pf1 - pf0 + steps - 1) / steps : 0; /* lines a step */    \
        lv##W acc[MB][NB];                                                                                          \
        for (int i = 0; i < rows; i++)                                                                              \
            for (int j = 0; j < cols; j++)                                                                          \
                acc[i][j] = (lv##W){0.0f};                                                                          \
        const int64_t Kv = K - K % W;                                                                               \
        for (int64_t k = 0; k < Kv; k += W) {                                                                       \
            lv##W wv[NB], xv;                                                                                       \
            for (int j = 0; j < cols; j++)                                                                          \
                memcpy(&wv[j], w + j * K + k, sizeof wv[j]);                                                        \
            for (int64_t p = 0; p < pf_step && pf0 < pf1; p++, pf0++) /* pf NULL: pf0 == pf1 */                   \
                __builtin_prefetch(pf + 64 * pf0);                                                                  \
            for (int i = 0; i < rows; i++) {                                                                        \
                memcpy(&xv, x + i * ldx + k, sizeof xv);                                                            \
                for (int j = 0; j < cols; j++)                                                                      \
                    acc[i][j] = xv * wv[j] + acc[i][j];                                                             \
            }                                                                                                       \
        }                                                                                                           \
        float sums[MB][NB];                                                                                         \
        if (W == 16 && MB * NB == 16 && rows == MB && cols == NB) /* a full AVX-512 tile */                          \
            sums16((const hv16 *)acc, &sums[0][0]);                                                                 \
        else                                                                                                        \
            for (int i = 0; i < rows; i++)                                                                          \
                for (int j = 0; j < cols; j++)                                                                      \
                    sums[i][j] = hsum##W(acc[i][j]);                                                                \
        for (int i = 0; i < rows; i++)                                                                              \
            for (int j = 0; j < cols; j++) {                                                                        \
                float s = sums[i][j];                                                                               \
                for (int64_t k = Kv; k < K; k++)                                                                    \
                    s += x[i * ldx + k] * w[j * K + k];                                                             \
                y[i * ldy + j] = b ? s + b[j] : s;                                                                  \
            }                                                                                                       \
    }                                                                                                               \
    LINTX_INLINE int linear_run##W(const int64_t *a) {                                                              \
        const int64_t M = a[L_M], N = a[L_N], K = a[L_K], ldx = a[L_LDX], ldy = a[L_LDY];                           \
        const float *x = (const float *)(intptr_t)a[L_X], *w = (const float *)(intptr_t)a[L_W];                    \
        const float *b = (const float *)(intptr_t)a[L_B];                                                          \
        float *y = (float *)(intptr_t)a[L_Y];                                                                       \
        const int64_t tiles = (M + MB - 1) / MB;                                                                    \
        for (int64_t n0 = 0; n0 < N; n0 += NB) {                                                                    \
            const float *wn = w + n0 * K, *bn = b ? b + n0 : NULL;                                                  \
            /* the next block's rows of w (contiguous), its lines shared out among this block's tiles */           \
            const int64_t next = N - n0 - NB < NB ? N - n0 - NB : NB;                                               \
            const char *pf = next > 0 ? (const char *)(wn + NB * K) : NULL;                                         \
            const int64_t lines = next > 0 ? (next * K * (int64_t)sizeof(float) + 63) / 64 : 0;                     \
            int64_t m0 = 0, t = 0;                                                                                  \
            if (n0 + NB <= N) { /* full blocks: the tile's sizes constants (its accumulators stay in registers) */     \
                for (; m0 + MB <= M; m0 += MB, t++)                                                                 \
                    tile##W(x + m0 * ldx, ldx, wn, K, bn, y + m0 * ldy + n0, ldy, MB, NB, pf, lines * t / tiles,    \
                            lines * (t + 1) / tiles);                                                               \
                if (m0 < M)                                                                                         \
                    tile##W(x + m0 * ldx, ldx, wn, K, bn, y + m0 * ldy + n0, ldy, (int)(M - m0), NB, pf,            \
                            lines * t / tiles, lines);                                                              \
            } else {                                                                                                \
                for (; m0 < M; m0 += MB)                                                                            \
                    tile##W(x + m0 * ldx, ldx, wn, K, bn, y + m0 * ldy + n0, ldy, M - m0 < MB ? (int)(M - m0) : MB, \
                            (int)(N - n0), NULL, 0, 0);                                                             \
            }                                                                                                       \
        }                                                                                                           \
        return 0;                                                                                                   \
    }

/* MB x NB accumulators + NB rows of w + one of x in vector registers: 21 of AVX-512's 32, 11 of AVX2's and SSE's
 * 16 */
#ifdef LINTX_X86
LINTX_LINEAR(16, 4, 4)
LINTX_LINEAR(8, 4, 2)
#endif
LINTX_LINEAR(4, 4, 2)

#define LINTX_LINEAR_VARIANT(NAME, W) \
    static int NAME(const int64_t *a) { return linear_run##W(a); }
#ifdef LINTX_X86
__attribute__((target("avx512f"))) LINTX_LINEAR_VARIANT(linear_avx512, 16)
__attribute__((target("avx2,fma"))) LINTX_LINEAR_VARIANT(linear_avx2, 8)
#endif
LINTX_LINEAR_VARIANT(linear_base, 4)

typedef int (*linear_fn)(const int64_t *);

LINTX_CHOOSER(choose_linear, linear_fn, linear_, lintx_isa_fma)

/* a: L_LEN entries in the order of the enum above: M, N, K, x's address and row stride (in floats; its rows
 * contiguous), w's address (contiguous [N, K]), b's (0: none), y's address and row stride (in floats; its rows
 * contiguous). Returns 0; a == NULL: -L_LEN (the caller checks it agrees). */
int lintx_linear_f32(const int64_t *a) {
    if (a == NULL)
        return -L_LEN;
    return choose_linear()(a);
}

/* The columns of y split in `parts` parts (whole tiles of 4) on the team of torch's OpenMP runtime, as causal.c's
 * lintx_causal_f32_team does (gomp_parallel: that runtime's GOMP_parallel): with two threads torch's matmul runs on
 * both, and one of ours alone was slower than it from 8 rows of 512 x 512 on (bench/NOTES.md). */
/* part i: columns [n0, n1) of y (a: lintx_linear_f32's) */
static void linear_part(void *a_, int64_t i, int64_t parts) {
    const int64_t *a = (const int64_t *)a_;
    const int64_t N = a[L_N], K = a[L_K];
    const int64_t n0 = N * i / parts / 4 * 4, n1 = i + 1 == parts ? N : N * (i + 1) / parts / 4 * 4;
    if (n1 <= n0)
        return;
    int64_t arr[L_LEN];
    memcpy(arr, a, sizeof arr);
    arr[L_N] = n1 - n0;
    arr[L_W] += n0 * K * (int64_t)sizeof(float);
    arr[L_B] += arr[L_B] ? n0 * (int64_t)sizeof(float) : 0;
    arr[L_Y] += n0 * (int64_t)sizeof(float);
    lintx_linear_f32(arr);
}

/* a as lintx_linear_f32; returns 0 */
int lintx_linear_f32_team(const int64_t *a, int64_t gomp_parallel, int64_t parts) {
    lintx_on_team(gomp_parallel, parts, linear_part, (void *)a);
    return 0;
}
