/* Causal linear attention on the CPU, fp32, in its recurrent form: the forward and the backward of
 * lintx_triton.reference's CPU path (issue #17), a token at a time through a state held in registers.
 *
 * For each batch row b and head h (key/value head h / G), tokens t = 0 .. T - 1, a = phi(q), b = phi(k):
 *   S_t = S_0 + sum_{s<=t} b_s v_s^T    [M, DV]       z_t = z_0 + sum_{s<=t} b_s    [M]
 *   u_t = a_t^T S_t,  w_t = a_t . z_t
 *   o_t = scale u_t / (scale w_t + eps) (normalize; r_t = scale / (scale w_t + eps) is written for the backward)
 *   o_t = scale u_t                       (not)
 * The chunked algorithm (lintx_triton.reference._ChunkedCausal) does 4 M (DV + C) flops a token and head in
 * batched matrix products; this does the recurrence's 4 M DV, each state element updated and read once a token
 * with the state in registers: RB rows of one W-wide column block (16 x 16 with AVX-512) swept over a tile of L
 * tokens, then the next block. phi of a tile's tokens is written once into a padded tile and read by every
 * block; the normalizer's z and w, a vector of M, are summed beside.
 *
 * The backward, with du_t = r_t do_t, dw_t = -(do_t . o_t) r_t (normalize; else du_t = scale do_t, dw_t = 0)
 * and R_t = dS_T + sum_{s>=t} a_s du_s^T, rho_t = dz_T + sum_{s>=t} a_s dw_s (with a map, dq = da phi'(q) and
 * dk = db phi'(k)):
 *   da_t = S_t du_t + dw_t z_t      (a forward sweep, S transposed in registers)
 *   dv_t = R_t^T b_t                 (a backward sweep, R in registers)
 *   db_t = R_t v_t + rho_t           (the same backward sweep, R transposed)
 *   dS_0 = R_0, dz_0 = rho_0
 * Each of the four products is one sweep of the same kernel (sweep##W below):
 *   O_t = A_t^T X_t,  X_t = X_{t-1} + Bc_t Cv_t^T   (t ascending, or descending from the end)
 *
 * Layouts: q, k, v, do, o and the gradients [B, T, heads, W] with strides (B, T, head) in elements and a unit
 * inner stride, r [B, T, H] likewise; the states S0, S_T, dS_T, dS0 [B, H, M, DV + 1] contiguous, z as the last
 * column (as _ChunkedCausal holds them). Only items p0 <= b H + h < p1: the caller splits [0, B H) between its
 * threads (ctypes lets go of the GIL), each call writing its own heads.
 *
 * The variants (AVX-512, AVX2, the baseline) round differently: AVX-512 and AVX2 fuse each product into its sum
 * (one rounding, an FMA), the x86-64 baseline has none; each is checked against the float64 reference
 * (tests/test_native_causal.py). The recurrence adds T terms one at a time where the chunked products add C and
 * T / C: its rounding error grows with T; bench/NOTES.md has it measured against the tests' bound at T = 8192.
 */

#include "maps.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors by value: only between always-inlined functions, no ABI crossed */
#endif

/* tokens a tile: phi of L tokens' q and k, their v, and the tile's outputs: 4 x 16 KB at M = DV = 64 */
#define L 64
/* M and DV are padded with zeros to a multiple of PAD (the widest W and RB below) */
#define PAD 16

enum { MODE_FORWARD = 0, MODE_BACKWARD = 1 };

/* The argument array, in this order. A tensor is its address then its strides (B, T, head) in elements. */
enum {
    A_MODE, A_B, A_T, A_H, A_G, A_M, A_DV, A_MAP, A_NORMALIZE, A_P0, A_P1,
    A_Q, A_QB, A_QT, A_QH,      /* q [B, T, H, M] (a = phi(q) when map is set, else a itself) */
    A_K, A_KB, A_KT, A_KH,      /* k [B, T, H / G, M] (b, likewise) */
    A_V, A_VB, A_VT, A_VH,      /* v [B, T, H / G, DV] */
    A_O, A_OB, A_OT, A_OH,      /* o [B, T, H, DV]: written (forward), read (backward) */
    A_R, A_RB, A_RT, A_RH,      /* r [B, T, H]: written (forward, normalize), read (backward, normalize) */
    A_DO, A_DOB, A_DOT, A_DOH,  /* backward: do [B, T, H, DV] */
    A_DQ, A_DQB, A_DQT, A_DQH,  /* backward: da [B, T, H, M] */
    A_DK, A_DKB, A_DKT, A_DKH,  /* backward: db [B, T, H, M] (G = 1) */
    A_DV_, A_DVB, A_DVT, A_DVH, /* backward: dv [B, T, H, DV] (G = 1) */
    A_S0,                       /* [B, H, M, DV + 1], or 0: zeros */
    A_ST,                       /* forward: S_T [B, H, M, DV + 1] */
    A_DST,                      /* backward: dS_T [B, H, M, DV + 1], or 0: zeros */
    A_DS0,                      /* backward: dS0 [B, H, M, DV + 1] */
    A_LEN
};

typedef struct {
    const float *p;
    int64_t sb, st, sh;
} view;

LINTX_INLINE view view_at(const int64_t *a, int i) {
    view x = {(const float *)(intptr_t)a[i], a[i + 1], a[i + 2], a[i + 3]};
    return x;
}

LINTX_INLINE const float *row(view x, int64_t b, int64_t t, int64_t h) {
    return x.p + b * x.sb + t * x.st + h * x.sh;
}

LINTX_INLINE int64_t padded(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

/* Asks for the n floats at x ahead of their use: the rows of the (head, tile) read next, 2 KB apart at H = 8,
 * D = 64 (one head's tokens), which the hardware prefetcher does not follow: without it, 28 % of a forward waited
 * on the loads of q and k (perf, [8, 1024, 8, 64], one core). */
LINTX_INLINE void prefetch(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        __builtin_prefetch(x + i);
}

/* phi'(x) from y = phi(x) (the maps' derivatives as torch's autograd takes them, also at 0): elu + 1 is x + 1 > 1
 * for x > 0 (slope 1) and exp(x) <= 1 otherwise (slope exp(x) = y); relu's slope is 1 where y > 0, else 0 */
LINTX_INLINE float dphi(int map, float y) {
    switch (map) {
    case LINTX_MAP_ELU: return y > 1.0f ? 1.0f : y;
    case LINTX_MAP_RELU: return y > 0.0f ? 1.0f : 0.0f;
    default: return 1.0f;
    }
}

/* y[0 .. n) = phi(x) (map > 0) or x, y[n .. np) = 0 */
LINTX_INLINE void fill(int map, float *restrict y, const float *restrict x, int64_t n, int64_t np) {
    if (map)
        phi(map, y, x, n);
    else
        memcpy(y, x, (size_t)n * sizeof(float));
    memset(y + n, 0, (size_t)(np - n) * sizeof(float));
}

/* sweep##W: X [R, Cn] (row-major, R and Cn multiples of W; rows past Rr padding) through tokens 0 .. n - 1 of a
 * tile (descending when rev), inclusive: X += Bc_t Cv_t^T, then O_t = A_t^T X. A and Bc are [L, R], Cv and O [L, Cn]. Each column
 * block of X is held RB rows at a time in registers through the tile (RB + 5 vector registers: 21 of AVX-512's 32
 * at RB = 16); O_t sums the row blocks in order, each block's rows over four interleaved partial sums. This file
 * is compiled with -ffp-contract=fast: where the ISA has an FMA, b * c + x is one instruction and one rounding. */
#define LINTX_SWEEP(W, RB)                                                                                          \
    typedef float vf##W __attribute__((vector_size(W * sizeof(float))));                                           \
    /* rows r0 .. r0 + rows - 1 (rows <= RB; RB at every block but a ragged last one) of column block j */          \
    LINTX_INLINE void block##W(float *restrict X, int64_t R, int64_t Cn, int64_t n, const float *restrict A,        \
                               const float *restrict Bc, const float *restrict Cv, float *restrict O, int rev,     \
                               int64_t j, int64_t r0, const int rows) {                                            \
        vf##W x[RB];                                                                                                \
        for (int i = 0; i < rows; i++)                                                                              \
            memcpy(&x[i], X + (r0 + i) * Cn + j, sizeof x[i]);                                                      \
        for (int64_t s = 0; s < n; s++) {                                                                           \
            const int64_t t = rev ? n - 1 - s : s;                                                                  \
            const float *restrict at = A + t * R + r0, *restrict bt = Bc + t * R + r0;                              \
            float *restrict ot = O + t * Cn + j;                                                                    \
            vf##W c, acc[4] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};                                                     \
            memcpy(&c, Cv + t * Cn + j, sizeof c);                                                                  \
            for (int i = 0; i < rows; i++)                                                                          \
                x[i] = bt[i] * c + x[i];                                                                            \
            for (int i = 0; i < rows; i++)                                                                          \
                acc[i % 4] = at[i] * x[i] + acc[i % 4];                                                             \
            vf##W sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);                                                      \
            if (r0) {                                                                                               \
                vf##W prev;                                                                                         \
                memcpy(&prev, ot, sizeof prev);                                                                     \
                sum = prev + sum;                                                                                   \
            }                                                                                                       \
            memcpy(ot, &sum, sizeof sum);                                                                           \
        }                                                                                                           \
        for (int i = 0; i < rows; i++)                                                                              \
            memcpy(X + (r0 + i) * Cn + j, &x[i], sizeof x[i]);                                                      \
    }                                                                                                               \
    /* Rr <= R rows are real: the padded ones are left alone (0 * inf in them would be NaN, and a NaN times a      \
     * padded 0 in the outputs) */                                                                                  \
    LINTX_INLINE void sweep##W(float *restrict X, int64_t R, int64_t Rr, int64_t Cn, int64_t n,                     \
                               const float *restrict A, const float *restrict Bc, const float *restrict Cv,        \
                               float *restrict O, int rev) {                                                        \
        for (int64_t j = 0; j < Cn; j += W) {                                                                       \
            int64_t r0 = 0;                                                                                         \
            for (; r0 + RB <= Rr; r0 += RB)                                                                         \
                block##W(X, R, Cn, n, A, Bc, Cv, O, rev, j, r0, RB);                                                \
            if (r0 < Rr)                                                                                            \
                block##W(X, R, Cn, n, A, Bc, Cv, O, rev, j, r0, (int)(Rr - r0));                                    \
        }                                                                                                           \
    }
#ifdef LINTX_X86
LINTX_SWEEP(16, 16)
LINTX_SWEEP(8, 8)
#endif
LINTX_SWEEP(4, 8)

/* x . y over n (a multiple of PAD) entries, in 16 interleaved partial sums (a fixed order at every ISA) */
LINTX_INLINE float dot(const float *restrict x, const float *restrict y, int64_t n) {
    float part[16] = {0.0f};
    for (int64_t i = 0; i < n; i += 16)
        for (int j = 0; j < 16; j++)
            part[j] += x[i + j] * y[i + j];
    for (int j = 8; j; j /= 2)
        for (int i = 0; i < j; i++)
            part[i] += part[i + j];
    return part[0];
}

/* The scratch of one call: the tiles, and the states of up to NH heads (x, x2 [NH, Mp DVp], z, z2 [NH, Mp]),
 * 64-byte aligned. */
typedef struct {
    float *ta, *tb, *tv, *tu, *to, *to2, *x, *x2, *z, *z2, *w;
} scratch;

/* Returns the block to free, or NULL (no memory). */
static void *scratch_new(scratch *s, int64_t Mp, int64_t DVp, int64_t NH) {
    const int64_t K = Mp > DVp ? Mp : DVp;
    const int64_t sizes[11] = {L * K, L * K, L * K, L * K, L * K, L * K, NH * Mp * DVp, NH * Mp * DVp, NH * Mp,
                               NH * Mp, L};
    int64_t total = 0;
    for (int i = 0; i < 11; i++)
        total += (sizes[i] + 15) / 16 * 16;
    void *base = malloc((size_t)total * sizeof(float) + 64);  /* (C99 has no aligned_alloc) */
    if (base == NULL)
        return NULL;
    float **slots[11] = {&s->ta, &s->tb, &s->tv, &s->tu, &s->to, &s->to2, &s->x, &s->x2, &s->z, &s->z2, &s->w};
    float *p = (float *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
    for (int i = 0; i < 11; i++) {
        *slots[i] = p;
        p += (sizes[i] + 15) / 16 * 16;
    }
    return base;
}

/* the state [M, DV + 1] as X [Mp, DVp] (transposed: [DVp, Mp]) and z [Mp], zero-padded; src NULL: zeros */
LINTX_INLINE void state_in(const float *restrict src, float *restrict X, float *restrict z, int64_t M, int64_t DV,
                           int64_t Mp, int64_t DVp, int transposed) {
    memset(X, 0, (size_t)(Mp * DVp) * sizeof(float));
    memset(z, 0, (size_t)Mp * sizeof(float));
    if (src == NULL)
        return;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < DV; j++)
            X[transposed ? j * Mp + m : m * DVp + j] = src[m * (DV + 1) + j];
        z[m] = src[m * (DV + 1) + DV];
    }
}

LINTX_INLINE void state_out(float *restrict dst, const float *restrict X, const float *restrict z, int64_t M,
                            int64_t DV, int64_t DVp) {
    for (int64_t m = 0; m < M; m++) {
        memcpy(dst + m * (DV + 1), X + m * DVp, (size_t)DV * sizeof(float));
        dst[m * (DV + 1) + DV] = z[m];
    }
}

/* the states of heads h0 .. h1 - 1 of batch row b ([B, H, M, DV + 1] at src, or NULL: zeros) into X + j Mp DVp,
 * z + j Mp for head h0 + j; and back out to dst */
LINTX_INLINE void run_states_in(const float *src, int64_t b, int64_t H, int64_t h0, int64_t h1, float *X, float *z,
                                int64_t M, int64_t DV, int64_t Mp, int64_t DVp, int transposed) {
    for (int64_t h = h0; h < h1; h++)
        state_in(src ? src + (b * H + h) * M * (DV + 1) : NULL, X + (h - h0) * Mp * DVp, z + (h - h0) * Mp, M, DV,
                 Mp, DVp, transposed);
}

LINTX_INLINE void run_states_out(float *dst, int64_t b, int64_t H, int64_t h0, int64_t h1, const float *X,
                                 const float *z, int64_t M, int64_t DV, int64_t Mp, int64_t DVp) {
    for (int64_t h = h0; h < h1; h++)
        state_out(dst + (b * H + h) * M * (DV + 1), X + (h - h0) * Mp * DVp, z + (h - h0) * Mp, M, DV, DVp);
}

/* the sweep of width W (a constant at each call) */
#ifdef LINTX_X86
#define SWEEP(W, ...) ((W) == 16 ? sweep16(__VA_ARGS__) : (W) == 8 ? sweep8(__VA_ARGS__) : sweep4(__VA_ARGS__))
#else
#define SWEEP(W, ...) sweep4(__VA_ARGS__)
#endif

/* Heads h0 .. h1 - 1 of batch row b, tile by tile, every head's tile before the next tile: the heads of a
 * token are adjacent in q, k, v and o (a tile of all of them 128 KB at H = 8, D = 64). One head at a time over
 * the whole sequence walked 2 KB strides through all of it (4096 pages of q at T = 8192) for each head again:
 * forward 35-39 ms at T = 8192 against 26-28 at T = 1024 for the same B T, backward 103-109 against 66-77 (H = 8,
 * D = 64, B T = 8192, one core); now 24-29 and 68-75 at every T. Head j's state is x + j Mp DVp, z + j Mp. */
LINTX_INLINE void forward_run(const int64_t *a, int64_t b, int64_t h0, int64_t h1, scratch s, float scale,
                              float eps, const int W) {
    const int64_t T = a[A_T], G = a[A_G], M = a[A_M], DV = a[A_DV], Mp = padded(M), DVp = padded(DV);
    const int64_t H = a[A_H], XS = Mp * DVp;
    const int map = (int)a[A_MAP], normalize = (int)a[A_NORMALIZE];
    const view q = view_at(a, A_Q), k = view_at(a, A_K), v = view_at(a, A_V), o = view_at(a, A_O),
               r = view_at(a, A_R);
    const float *S0 = (const float *)(intptr_t)a[A_S0];
    float *ST = (float *)(intptr_t)a[A_ST];
    run_states_in(S0, b, H, h0, h1, s.x, s.z, M, DV, Mp, DVp, 0);
    for (int64_t t0 = 0; t0 < T; t0 += L) {
        const int64_t n = T - t0 < L ? T - t0 : L;
        for (int64_t h = h0; h < h1; h++) {
            const int64_t hk = h / G;
            /* the rows read next: the next head's in this tile, after the last head the first's in the next */
            const int64_t hn = h + 1 < h1 ? h + 1 : h0, tn = h + 1 < h1 ? t0 : t0 + L;
            float *restrict z = s.z + (h - h0) * Mp;
            for (int64_t i = 0; i < n; i++) {
                fill(map, s.ta + i * Mp, row(q, b, t0 + i, h), M, Mp);
                fill(map, s.tb + i * Mp, row(k, b, t0 + i, hk), M, Mp);
                fill(0, s.tv + i * DVp, row(v, b, t0 + i, hk), DV, DVp);
                if (tn + i < T) {
                    prefetch(row(q, b, tn + i, hn), M);
                    prefetch(row(k, b, tn + i, hn / G), M);
                    prefetch(row(v, b, tn + i, hn / G), DV);
                }
                for (int64_t m = 0; m < Mp; m++)
                    z[m] += s.tb[i * Mp + m];
                s.w[i] = dot(s.ta + i * Mp, z, Mp);
            }
            SWEEP(W, s.x + (h - h0) * XS, Mp, M, DVp, n, s.ta, s.tb, s.tv, s.to, 0);
            for (int64_t i = 0; i < n; i++) {
                /* as the chunked path: r = scale / (scale w + eps), o = u r */
                const float f = normalize ? scale / (s.w[i] * scale + eps) : scale;
                float *restrict ot = (float *)row(o, b, t0 + i, h);
                for (int64_t j = 0; j < DV; j++)
                    ot[j] = s.to[i * DVp + j] * f;
                if (normalize && r.p)
                    *(float *)row(r, b, t0 + i, h) = f;
            }
        }
    }
    run_states_out(ST, b, H, h0, h1, s.x, s.z, M, DV, Mp, DVp);
}

/* The backward's tile: a, b, v, du ([n, *p] zero-padded) and dw [n] of tokens t0 .. t0 + n - 1 of head h; the
 * rows of tokens tn .. tn + n - 1 of head hn (read next) asked for ahead. */
LINTX_INLINE void backward_tile(const int64_t *a, int64_t b, int64_t h, int64_t t0, int64_t n, int64_t hn,
                                int64_t tn, scratch s, float scale) {
    const int64_t M = a[A_M], DV = a[A_DV], Mp = padded(M), DVp = padded(DV);
    const int normalize = (int)a[A_NORMALIZE], map = (int)a[A_MAP];
    const view q = view_at(a, A_Q), k = view_at(a, A_K), v = view_at(a, A_V), o = view_at(a, A_O),
               r = view_at(a, A_R), d = view_at(a, A_DO);
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = t0 + i;
        fill(map, s.ta + i * Mp, row(q, b, t, h), M, Mp);
        fill(map, s.tb + i * Mp, row(k, b, t, h), M, Mp);
        fill(0, s.tv + i * DVp, row(v, b, t, h), DV, DVp);
        const float *restrict dot_ = row(d, b, t, h);
        float *restrict du = s.tu + i * DVp;
        if (normalize) {
            const float rt = *row(r, b, t, h), *restrict ot = row(o, b, t, h);
            float g = 0.0f;
            for (int64_t j = 0; j < DV; j++) {
                du[j] = dot_[j] * rt;
                g += dot_[j] * ot[j];
            }
            s.w[i] = -g * rt;
        } else {
            for (int64_t j = 0; j < DV; j++)
                du[j] = dot_[j] * scale;
            s.w[i] = 0.0f;
        }
        memset(du + DV, 0, (size_t)(DVp - DV) * sizeof(float));
        if (tn + i >= 0 && tn + i < a[A_T]) {
            prefetch(row(q, b, tn + i, hn), M);
            prefetch(row(k, b, tn + i, hn), M);
            prefetch(row(v, b, tn + i, hn), DV);
            prefetch(row(o, b, tn + i, hn), DV);
            prefetch(row(d, b, tn + i, hn), DV);
        }
    }
}

/* The backward of heads h0 .. h1 - 1 of batch row b, tile by tile as forward_run (G = 1: the caller repeats the
 * key heads under autograd). With a map, q and k are the raw inputs and dq, dk their gradients (through phi'),
 * else the features' and theirs. */
LINTX_INLINE void backward_run(const int64_t *a, int64_t b, int64_t h0, int64_t h1, scratch s, float scale,
                               const int W) {
    const int64_t T = a[A_T], M = a[A_M], DV = a[A_DV], Mp = padded(M), DVp = padded(DV);
    const int64_t H = a[A_H], XS = Mp * DVp;
    const int map = (int)a[A_MAP];
    const view dq = view_at(a, A_DQ), dk = view_at(a, A_DK), dv = view_at(a, A_DV_);
    const float *S0 = (const float *)(intptr_t)a[A_S0], *dST = (const float *)(intptr_t)a[A_DST];
    float *dS0 = (float *)(intptr_t)a[A_DS0];
    /* da_t = S_t du_t + dw_t z_t: forward, S^T [DVp, Mp] in x; O_t = (du_t)^T S^T_t, S^T += v_t b_t^T */
    run_states_in(S0, b, H, h0, h1, s.x, s.z, M, DV, Mp, DVp, 1);
    for (int64_t t0 = 0; t0 < T; t0 += L) {
        const int64_t n = T - t0 < L ? T - t0 : L;
        for (int64_t h = h0; h < h1; h++) {
            float *restrict z = s.z + (h - h0) * Mp;
            backward_tile(a, b, h, t0, n, h + 1 < h1 ? h + 1 : h0, h + 1 < h1 ? t0 : t0 + L, s, scale);
            SWEEP(W, s.x + (h - h0) * XS, DVp, DV, Mp, n, s.tu, s.tv, s.tb, s.to, 0);
            for (int64_t i = 0; i < n; i++) {
                float *restrict out = (float *)row(dq, b, t0 + i, h);
                for (int64_t m = 0; m < M; m++) {
                    z[m] += s.tb[i * Mp + m];
                    out[m] = s.to[i * Mp + m] + s.w[i] * z[m];
                }
                if (map)
                    for (int64_t m = 0; m < M; m++)
                        out[m] *= dphi(map, s.ta[i * Mp + m]);
            }
        }
    }
    /* dv_t = R_t^T b_t (R [Mp, DVp] in x) and db_t = R_t v_t + rho_t (R^T [DVp, Mp] in x2, rho in z2), from the
     * end */
    run_states_in(dST, b, H, h0, h1, s.x, s.z2, M, DV, Mp, DVp, 0);
    run_states_in(dST, b, H, h0, h1, s.x2, s.z2, M, DV, Mp, DVp, 1);
    for (int64_t t0 = (T - 1) / L * L; t0 >= 0; t0 -= L) {
        const int64_t n = T - t0 < L ? T - t0 : L;
        for (int64_t h = h0; h < h1; h++) {
            float *restrict rho = s.z2 + (h - h0) * Mp;
            backward_tile(a, b, h, t0, n, h + 1 < h1 ? h + 1 : h0, h + 1 < h1 ? t0 : t0 - L, s, scale);
            SWEEP(W, s.x + (h - h0) * XS, Mp, M, DVp, n, s.tb, s.ta, s.tu, s.to, 1);
            SWEEP(W, s.x2 + (h - h0) * XS, DVp, DV, Mp, n, s.tv, s.tu, s.ta, s.to2, 1);
            for (int64_t i = n - 1; i >= 0; i--) {
                float *restrict outk = (float *)row(dk, b, t0 + i, h), *restrict outv = (float *)row(dv, b, t0 + i, h);
                for (int64_t m = 0; m < M; m++) {
                    rho[m] += s.ta[i * Mp + m] * s.w[i];
                    outk[m] = s.to2[i * Mp + m] + rho[m];
                }
                if (map)
                    for (int64_t m = 0; m < M; m++)
                        outk[m] *= dphi(map, s.tb[i * Mp + m]);
                memcpy(outv, s.to + i * DVp, (size_t)DV * sizeof(float));
            }
        }
    }
    run_states_out(dS0, b, H, h0, h1, s.x, s.z2, M, DV, Mp, DVp);
}

/* Returns 0, or 1 when the scratch cannot be allocated (nothing is written then). Items p0 .. p1 - 1 (b H + h)
 * in runs of one batch row's heads. */
LINTX_INLINE int causal(const int64_t *a, const float *se, const int W) {
    const int64_t H = a[A_H], Mp = padded(a[A_M]), DVp = padded(a[A_DV]), p0 = a[A_P0], p1 = a[A_P1];
    const int64_t NH = p1 - p0 < H ? p1 - p0 : H;
    if (NH <= 0)
        return 0;
    scratch s;
    void *base = scratch_new(&s, Mp, DVp, NH);
    if (base == NULL)
        return 1;
    for (int64_t p = p0; p < p1;) {
        const int64_t b = p / H, h0 = p % H, h1 = h0 + (p1 - p) < H ? h0 + (p1 - p) : H;
        if (a[A_MODE] == MODE_FORWARD)
            forward_run(a, b, h0, h1, s, se[0], se[1], W);
        else
            backward_run(a, b, h0, h1, s, se[0], W);
        p += h1 - h0;
    }
    free(base);
    return 0;
}

#define LINTX_CAUSAL_VARIANT(NAME, W) \
    static int NAME(const int64_t *a, const float *se) { return causal(a, se, W); }
#ifdef LINTX_X86
__attribute__((target("avx512f"))) LINTX_CAUSAL_VARIANT(causal_avx512, 16)
__attribute__((target("avx2,fma"))) LINTX_CAUSAL_VARIANT(causal_avx2, 8)
#endif
LINTX_CAUSAL_VARIANT(causal_base, 4)

typedef int (*causal_fn)(const int64_t *, const float *);

LINTX_CHOOSER(choose_causal, causal_fn, causal_, lintx_isa_fma)

/* a: A_LEN int64 entries in the order of the enum above (addresses as integers), se = [scale, eps]. Returns 0,
 * 1 when the scratch cannot be allocated; a == NULL: returns -A_LEN (the caller checks it agrees). */
int lintx_causal_f32(const int64_t *a, const float *se) {
    if (a == NULL)
        return -A_LEN;
    return choose_causal()(a, se);
}

/* The same split between threads as the caller's pool (lintx_triton/native/__init__.py's _run), on the team of
 * the OpenMP runtime torch runs its own parallel ops on: gomp_parallel is that runtime's GOMP_parallel (the entry
 * a compiled `#pragma omp parallel` calls), found by the caller. After each parallel torch op that team's threads
 * spin for a while waiting for more work; threads of another pool then share the cores with them: a
 * forward + backward at B = 16, T = 256, H = 4, D = 64 took 27 ms on two threads of a pool against 18 with the
 * spinning turned off (OMP_WAIT_POLICY=PASSIVE). Here the spinning threads are the ones that take the work. */
typedef struct {
    const int64_t *a;
    const float *se;
    int failed;
} causal_team;

/* part i: a contiguous range of the items */
static void causal_part(void *p, int64_t i, int64_t parts) {
    causal_team *t = (causal_team *)p;
    int64_t arr[A_LEN];
    memcpy(arr, t->a, sizeof arr);
    const int64_t first = t->a[A_P0], items = t->a[A_P1] - t->a[A_P0];
    arr[A_P0] = first + items * i / parts;
    arr[A_P1] = first + items * (i + 1) / parts;
    if (lintx_causal_f32(arr, t->se))
        __atomic_store_n(&t->failed, 1, __ATOMIC_RELAXED);
}

/* a, se as lintx_causal_f32 (items a[A_P0] .. a[A_P1] - 1 in `parts` parts), gomp_parallel the address of
 * GOMP_parallel. Returns 0, or 1 when a part's scratch could not be allocated. */
int lintx_causal_f32_team(const int64_t *a, const float *se, int64_t gomp_parallel, int64_t parts) {
    causal_team t = {a, se, 0};
    lintx_on_team(gomp_parallel, parts, causal_part, &t);
    return t.failed;
}
