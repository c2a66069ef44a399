/* A feature map written straight into the chunked layout of the CPU forward (issue #17): what
 * lintx_triton.reference's _ChunkedCausal.forward did without autograd in several passes over memory (the map's
 * torch calls, each into a new tensor, then a copy into [N, B, H, C, M] chunks) in one.
 *
 *   out[n, b, h, c, :] = phi(x[b, n C + c, h / G, :])   for n C + c < T
 *   out[n, b, h, c, :] = 0                               for the rows past T in the last chunk
 *
 * x [B, T, HX, W] (HX = H / G heads, each read by G heads of out: the keys of grouped queries), strides xB, xT, xH
 * in elements, unit inner stride; out [N, B, H, C', W] (C' >= C rows a chunk: the keys' chunks carry one more),
 * strides oN, oB, oH, oC, unit inner stride. Only chunks n0 <= n < n1: the caller splits [0, N) between its
 * threads (ctypes lets go of the GIL), each call writing its own chunks.
 *
 * The map's arithmetic is step.c's (maps.h): elu(x) + 1 within 2 ulp of float64 exp, NaN kept, every variant the
 * same bits.
 */

#include "maps.h"

enum { F_B, F_T, F_H, F_G, F_W, F_C, F_MAP, F_N0, F_N1, F_X, F_XB, F_XT, F_XH, F_OUT, F_ON, F_OB, F_OH, F_OC, F_LEN };

LINTX_INLINE void features(const int64_t *a) {
    const int64_t B = a[F_B], T = a[F_T], H = a[F_H], G = a[F_G], W = a[F_W], C = a[F_C];
    const int map = (int)a[F_MAP];
    const float *x = (const float *)(intptr_t)a[F_X];
    float *out = (float *)(intptr_t)a[F_OUT];
    /* tokens outside, heads inside: x is read in its order (a token's H rows are adjacent) and out is written as
     * H sequential streams. Heads outside (a head's 64 tokens 2 KB apart in x, a new 4 KB page every other row,
     * where the stride prefetcher stops) stalled on every load: 4.8 ms a call for [8, 1024, 8, 64] on one core. */
    for (int64_t n = a[F_N0]; n < a[F_N1]; n++)
        for (int64_t b = 0; b < B; b++) {
            float *ob = out + n * a[F_ON] + b * a[F_OB];
            const float *xb = x + b * a[F_XB];
            for (int64_t c = 0; c < C; c++) {
                const int64_t t = n * C + c;
                for (int64_t h = 0; h < H; h++) {
                    float *o = ob + h * a[F_OH] + c * a[F_OC];
                    if (t < T)
                        phi(map, o, xb + t * a[F_XT] + (h / G) * a[F_XH], W);
                    else
                        memset(o, 0, (size_t)W * sizeof(float));
                }
            }
        }
}

#define LINTX_FEATURES_VARIANT(NAME) \
    static void NAME(const int64_t *a) { features(a); }
#ifdef LINTX_X86
__attribute__((target("avx512f"))) LINTX_FEATURES_VARIANT(features_avx512)
__attribute__((target("avx2"))) LINTX_FEATURES_VARIANT(features_avx2)
#endif
LINTX_FEATURES_VARIANT(features_base)

typedef void (*features_fn)(const int64_t *);

/* the variant for the running CPU, chosen at the first call (two threads racing there store the same pointer) */
static features_fn chosen_features = NULL;

/* a: F_LEN int64 entries, in the order of the enum above (addresses as integers). Returns the entries it takes, so
 * that the caller can check it agrees (lintx_triton/native/__init__.py). a == NULL: nothing is done. */
int lintx_features_f32(const int64_t *a) {
    if (a == NULL)
        return F_LEN;
    features_fn fn = chosen_features;
    if (fn == NULL) {
        static const features_fn variants[] = LINTX_VARIANTS(features_);
        chosen_features = fn = variants[lintx_isa()];
    }
    fn(a);
    return F_LEN;
}
