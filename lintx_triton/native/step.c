/* One decode step of causal linear attention on the CPU, fp32: the arithmetic of
 * lintx_triton.reference.linear_attention_step_torch_ in one pass over the state (issue #17).
 *
 * For each batch row b and kv head h (its G = H / HKV query heads share its state):
 *   S[b, h] = S0[b, h] + phi(k[b, h]) v[b, h]^T        [M, DV]
 *   z[b, h] = z0[b, h] + phi(k[b, h])                   [M]
 *   num = phi(q)^T S, den = phi(q)^T z                   (the updated state, as the torch step)
 *   o = scale num / (scale den + eps)   (normalize), o = scale num (not)
 * The state is swept a chunk of columns at a time, row by row: each row's chunk is read once, updated, written,
 * and folded into the G outputs' sums, held in registers: one read and one write of the state, its memory floor.
 * S0 == S (and z0 == z) updates in place, else S0, z0 are read and S, z written.
 *
 * Layouts (contiguous, checked by the caller): q [B, H, D], k [B, HKV, D], v [B, HKV, DV], S [B, HKV, M, DV],
 * z [B, HKV, M], o [B, H, DV]; M = D (elementwise maps only). Query head i uses kv head i / G.
 *
 * dims: B, H, HKV, D, DV, map (LINTX_MAP_*), as the entry point lintx_step_f32 (at the end) receives them.
 * Built with the system C compiler at the first eligible call (lintx_triton/native/__init__.py) with -O3
 * -std=c99: no -march (the variants below pick the ISA at the first call, so the cached binary runs on any CPU
 * of its machine type), no -ffast-math (comparisons keep IEEE semantics: NaN propagates as in torch), and ISO
 * C's no-contraction of a * b + c into an FMA: every variant rounds alike (the sums run in the same order at
 * every vector width), so the results do not depend on the CPU.
 */

#include "maps.h"

/* Where a row of the new state starts from: the state itself (in place), or another state. */
enum { SRC_INPLACE = 0, SRC_STATE = 1 };

/* Columns are taken W at a time (one register of the ISA: 16 with AVX-512, 8 with AVX2, 4 otherwise), the rows
 * inside: each S row's W columns are read, updated and written once, and the outputs' partial sums stay in
 * registers across the M rows. Rows outside and the outputs in memory (read, added and written back at every
 * row, each add waiting on the last row's store) took 6.4 us at B = 1 against 2.3 for a memcpy of the state
 * (H = 8, D = DV = 64, elu, one EPYC core, a C loop timing the function alone); now 3.3. The sums run in the same
 * order (o = sum over m of a_m row_m, m ascending), so every variant gives the same bits. The vectors are GCC's
 * and clang's vector extension: left to the auto-vectorizer, these loops came out scalar (15.9 us); a width the
 * ISA does not have is lowered badly (16 wide under AVX2: 24.7 us, 8 wide: 6.3). */
/* the outputs of at most GB query heads are summed in one sweep over the rows (GB vectors of registers) */
#define GB 4

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors by value: only between always-inlined functions, no ABI crossed */
#endif

/* columns##W: columns [j, j + W) of one head: the rows of S updated by the first sweep (g0 = 0), and the outputs
 * of query heads g0 .. g0 + gn - 1 (gn <= GB, a constant at each call) summed in registers (a = fq + g0 M: phi of
 * a query head's row is a[g * M + m]). memcpy: unaligned vector loads and stores. */
#define LINTX_COLUMNS(W)                                                                                            \
    typedef float vf##W __attribute__((vector_size(W * sizeof(float))));                                           \
    LINTX_INLINE void columns##W(int src, float *restrict S, const float *restrict S0, const float *restrict fk,   \
                                 const float *restrict v, const float *restrict a, float *restrict o, int64_t M,   \
                                 int64_t DV, int64_t j, int64_t g0, const int64_t gn) {                            \
        vf##W acc[GB], vj, r;                                                                                       \
        for (int64_t g = 0; g < GB; g++)                                                                            \
            acc[g] = (vf##W){0.0f};                                                                                 \
        memcpy(&vj, v + j, sizeof vj);                                                                              \
        for (int64_t m = 0; m < M; m++) {                                                                           \
            float *restrict row = S + m * DV + j;                                                                   \
            if (g0 == 0) {                                                                                          \
                memcpy(&r, src == SRC_INPLACE ? row : S0 + m * DV + j, sizeof r);                                   \
                r = r + fk[m] * vj;                                                                                 \
                memcpy(row, &r, sizeof r);                                                                          \
            } else {                                                                                                \
                memcpy(&r, row, sizeof r);                                                                          \
            }                                                                                                       \
            for (int64_t g = 0; g < gn; g++)                                                                        \
                acc[g] += a[g * M + m] * r;                                                                         \
        }                                                                                                           \
        for (int64_t g = 0; g < gn; g++)                                                                            \
            memcpy(o + (g0 + g) * DV + j, &acc[g], sizeof acc[g]);                                                  \
    }
LINTX_COLUMNS(16)
LINTX_COLUMNS(8)
LINTX_COLUMNS(4)

/* Column j alone (DV's last DV % W columns), as columns##W */
LINTX_INLINE void column(int src, float *restrict S, const float *restrict S0, const float *restrict fk,
                         const float *restrict v, const float *restrict a, float *restrict o, int64_t M,
                         int64_t DV, int64_t j, int64_t g0, const int64_t gn) {
    float acc[GB] = {0.0f};
    for (int64_t m = 0; m < M; m++) {
        float *restrict row = S + m * DV + j;
        float r;
        if (g0 == 0) {
            r = (src == SRC_INPLACE ? row[0] : S0[m * DV + j]) + fk[m] * v[j];
            row[0] = r;
        } else {
            r = row[0];
        }
        for (int64_t g = 0; g < gn; g++)
            acc[g] += a[g * M + m] * r;
    }
    for (int64_t g = 0; g < gn; g++)
        o[(g0 + g) * DV + j] = acc[g];
}

/* every W-column chunk of one head (W a constant at each call), then DV's last columns one at a time */
LINTX_INLINE void sweep(int src, float *restrict S, const float *restrict S0, const float *restrict fk,
                        const float *restrict v, const float *restrict a, float *restrict o, int64_t M, int64_t DV,
                        int64_t g0, const int64_t gn, const int64_t W) {
    int64_t j = 0;
    for (; j + W <= DV; j += W) {
        if (W == 16)
            columns16(src, S, S0, fk, v, a, o, M, DV, j, g0, gn);
        else if (W == 8)
            columns8(src, S, S0, fk, v, a, o, M, DV, j, g0, gn);
        else
            columns4(src, S, S0, fk, v, a, o, M, DV, j, g0, gn);
    }
    for (; j < DV; j++)
        column(src, S, S0, fk, v, a, o, M, DV, j, g0, gn);
}

/* One (b, kv head): z, the normalizers, then S a column chunk at a time into the G outputs, then their scale. */
LINTX_INLINE void head(int src, const float *restrict S0, float *restrict S, const float *restrict z0,
                       float *restrict z, const float *restrict v, const float *restrict fk,
                       const float *restrict fq, double *restrict den, float *restrict o, int64_t M, int64_t DV,
                       int64_t G, int normalize, float scale, float eps, const int64_t W) {
    /* z = z0 + phi(k), then den = phi(q)^T z in double, over 8 interleaved partial sums (one dependent add per
     * 8 terms, in a fixed order: the same bits at every vector width) */
    for (int64_t m = 0; m < M; m++)
        z[m] = (src == SRC_INPLACE ? z[m] : z0[m]) + fk[m];
    for (int64_t g = 0; g < G; g++) {
        double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, d = 0.0;
        int64_t m = 0;
        for (; m + 8 <= M; m += 8)
            for (int64_t i = 0; i < 8; i++)
                part[i] += (double)fq[g * M + m + i] * z[m + i];
        for (; m < M; m++)
            d += (double)fq[g * M + m] * z[m];
        for (int64_t i = 0; i < 8; i++)
            d += part[i];
        den[g] = d;
    }
    for (int64_t g0 = 0; g0 < G; g0 += GB) {
        const int64_t gn = G - g0 < GB ? G - g0 : GB;
        switch (gn) {  /* gn and the width constants at each call: the sums' loops unroll into registers */
        case 1: sweep(src, S, S0, fk, v, fq + g0 * M, o, M, DV, g0, 1, W); break;
        case 2: sweep(src, S, S0, fk, v, fq + g0 * M, o, M, DV, g0, 2, W); break;
        case 3: sweep(src, S, S0, fk, v, fq + g0 * M, o, M, DV, g0, 3, W); break;
        default: sweep(src, S, S0, fk, v, fq + g0 * M, o, M, DV, g0, GB, W); break;
        }
    }
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

/* The scratch of a step whose kv heads have G query heads each, M features: den [G + 1] (double), then phi(k) [M]
 * and phi(q) [G, M] (float); a multiple of 64 bytes, so that scratches laid end to end stay aligned. */
LINTX_INLINE size_t scratch_bytes(int64_t G, int64_t M) {
    const size_t n = (size_t)(G + 1) * sizeof(double) + (size_t)((G + 1) * M + 1) * sizeof(float);
    return (n + 63) / 64 * 64;
}

/* scratch: scratch_bytes(G, M) bytes (8-byte aligned). */
LINTX_INLINE void step(const int64_t *dims, const float *q, const float *k, const float *v, const float *S0,
                       const float *z0, float *S, float *z, float *o, int normalize, float scale, float eps,
                       void *scratch, const int64_t W) {
    const int64_t B = dims[0], H = dims[1], HKV = dims[2], D = dims[3], DV = dims[4];
    const int map = (int)dims[5];
    const int64_t G = H / HKV, M = D;
    double *den = (double *)scratch;
    float *fk = (float *)(den + G + 1), *fq = fk + M; /* [M] phi(k), then [G, M] phi(q) */
    for (int64_t bh = 0; bh < B * HKV; bh++) {
        /* the group's G query heads are adjacent in q and o */
        const int64_t st = bh * M * DV;
        float *Sp = S + st, *zp = z + bh * M, *op = o + bh * G * DV;
        const float *vp = v + bh * DV;
        phi(map, fk, k + bh * D, M);
        phi(map, fq, q + bh * G * D, G * M);
        /* one call per source, each inlined with its constant: the compiler sees no aliasing in any */
        if (S0 == S)
            head(SRC_INPLACE, NULL, Sp, NULL, zp, vp, fk, fq, den, op, M, DV, G, normalize, scale, eps, W);
        else
            head(SRC_STATE, S0 + st, Sp, z0 + bh * M, zp, vp, fk, fq, den, op, M, DV, G, normalize, scale, eps, W);
    }
}

typedef void (*step_fn)(const int64_t *, const float *, const float *, const float *, const float *, const float *,
                        float *, float *, float *, int, float, float, void *);

#define LINTX_VARIANT(NAME, W)                                                                                      \
    static void NAME(const int64_t *dims, const float *q, const float *k, const float *v, const float *S0,         \
                     const float *z0, float *S, float *z, float *o, int normalize, float scale, float eps,         \
                     void *scratch) {                                                                              \
        step(dims, q, k, v, S0, z0, S, z, o, normalize, scale, eps, scratch, W);                                    \
    }
#ifdef LINTX_X86
__attribute__((target("avx512f"))) LINTX_VARIANT(step_avx512, 16)
__attribute__((target("avx2"))) LINTX_VARIANT(step_avx2, 8)
#endif
LINTX_VARIANT(step_base, 4)

LINTX_CHOOSER(choose_step, step_fn, step_, lintx_isa)

/* fn on the arguments of the entry point below */
LINTX_INLINE void run(step_fn fn, const int64_t *a, const float *se, int normalize, void *scratch) {
    const float *q = (const float *)(intptr_t)a[6], *k = (const float *)(intptr_t)a[7],
                *v = (const float *)(intptr_t)a[8], *S0 = (const float *)(intptr_t)a[9],
                *z0 = (const float *)(intptr_t)a[10];
    float *S = (float *)(intptr_t)a[11], *z = (float *)(intptr_t)a[12], *o = (float *)(intptr_t)a[13];
    fn(a, q, k, v, S0, z0, S, z, o, normalize, se[0], se[1], scratch);
}

/* The entry point: a = [B, H, HKV, D, DV, map, then the addresses of q, k, v, S0, z0, S, z, o], se = [scale, eps].
 * Two arrays rather than twelve arguments: ctypes converts each argument it is given (about 0.1 us apiece), and
 * the caller refills the same per-thread arrays at each step (lintx_triton/native/__init__.py). Returns 0, or 1
 * when the scratch (phi of a head group's queries and of its key) cannot be allocated: nothing is written then. */
int lintx_step_f32(const int64_t *a, const float *se, int normalize) {
    void *scratch = malloc(scratch_bytes(a[1] / a[2], a[3]));
    if (scratch == NULL)
        return 1;
    run(choose_step(), a, se, normalize, scratch);
    free(scratch);
    return 0;
}

/* The kv heads of all batch rows (B x HKV of them, each with its G query heads) split in `parts` contiguous
 * ranges on the team of torch's OpenMP runtime, as causal.c's lintx_causal_f32_team splits its heads
 * (gomp_parallel: that runtime's GOMP_parallel): each range is a step of its own over B' = its length, H' = G,
 * HKV' = 1, whose tensors start at the range's first head (every layout is [B, HKV, ...] or [B, HKV, G, ...]).
 * At two threads, H = 8, D = DV = 64, best of 150 interleaved rounds: B = 16 59 -> 48 us (a two-thread copy of its
 * 2 MB state: 34 us), B = 8 41 -> 25 us (18); at B = 4 the team's start-up ate the gain (bench/NOTES.md, session
 * 11; lintx_triton/native/__init__.py's _STEP_SPLIT_MIN). */
typedef struct {
    const int64_t *a;
    const float *se;
    int normalize;
    step_fn fn;     /* chosen before the team starts: its members do not race on the choice */
    char *scratch;  /* each part's, `bytes` apart, allocated before the team starts */
    size_t bytes;
} step_team;

/* part i: kv heads [r0, r1) */
static void step_part(void *p, int64_t i, int64_t parts) {
    step_team *t = (step_team *)p;
    const int64_t *a = t->a;
    const int64_t items = a[0] * a[2], G = a[1] / a[2], D = a[3], DV = a[4];
    const int64_t r0 = items * i / parts, r1 = items * (i + 1) / parts;
    if (r1 <= r0)
        return;
    /* each tensor's elements per kv head: q, k, v, S0, z0, S, z, o (a[6] .. a[13]) */
    const int64_t per[8] = {G * D, D, DV, D * DV, D, D * DV, D, G * DV};
    int64_t arr[14] = {r1 - r0, G, 1, D, DV, a[5]};
    for (int j = 0; j < 8; j++)
        arr[6 + j] = a[6 + j] + r0 * per[j] * (int64_t)sizeof(float);
    run(t->fn, arr, t->se, t->normalize, t->scratch + (size_t)i * t->bytes);
}

/* a, se, normalize as lintx_step_f32; gomp_parallel the address of GOMP_parallel. Returns 0, or 1 when the parts'
 * scratch cannot be allocated: nothing is written then. */
int lintx_step_f32_team(const int64_t *a, const float *se, int normalize, int64_t gomp_parallel, int64_t parts) {
    const size_t bytes = scratch_bytes(a[1] / a[2], a[3]);
    step_team t = {a, se, normalize, choose_step(), malloc((size_t)parts * bytes), bytes};
    if (t.scratch == NULL)
        return 1;
    lintx_on_team(gomp_parallel, parts, step_part, &t);
    free(t.scratch);
    return 0;
}
