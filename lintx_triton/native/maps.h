/* What lintx_triton's native C files share (step.c, causal.c): the feature maps, a vectorizable exp, and the
 * switches for one variant per x86-64 ISA. Included, not compiled on its own. */

#ifndef LINTX_MAPS_H
#define LINTX_MAPS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One variant of each entry point per x86-64 ISA in the same binary (AVX-512, AVX2, the baseline), picked at its
 * first call from the running CPU, so the cached library is safe on any x86-64 CPU. The helpers are always
 * inlined, so each variant gets them compiled for its ISA. Elsewhere (e.g. aarch64) the baseline alone. */
#if defined(__x86_64__) && defined(__GNUC__)
#define LINTX_X86 1
#endif
#define LINTX_INLINE static inline __attribute__((always_inline))

/* An entry point's variants, by the index lintx_isa() returns: LINTX_VARIANTS(step_) is {step_base, step_avx2,
 * step_avx512} on x86-64, {step_base} elsewhere. */
enum { LINTX_ISA_BASE = 0, LINTX_ISA_AVX2 = 1, LINTX_ISA_AVX512 = 2 };
#ifdef LINTX_X86
#define LINTX_VARIANTS(prefix) {prefix##base, prefix##avx2, prefix##avx512}
#else
#define LINTX_VARIANTS(prefix) {prefix##base}
#endif

/* The running CPU's variant. -DLINTX_FORCE_ISA=LINTX_ISA_AVX2 (say) pins every entry point to one:
 * tests/test_native_step.py builds each the CPU runs and checks that they give the same bits. */
static inline int lintx_isa(void) {
#if !defined(LINTX_X86)
    return LINTX_ISA_BASE;
#elif defined(LINTX_FORCE_ISA)
    return LINTX_FORCE_ISA;
#else
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return LINTX_ISA_AVX512;
    return __builtin_cpu_supports("avx2") ? LINTX_ISA_AVX2 : LINTX_ISA_BASE;
#endif
}

/* NAME(): the variant of an entry point (PREFIX##base, PREFIX##avx2, PREFIX##avx512, of type TYPE) for the running
 * CPU, by ISA() (lintx_isa or lintx_isa_fma), chosen at the first call (two threads racing there store the same
 * pointer) */
#define LINTX_CHOOSER(NAME, TYPE, PREFIX, ISA)                 \
    static TYPE NAME(void) {                                   \
        static TYPE chosen = NULL;                             \
        TYPE fn = chosen;                                      \
        if (fn == NULL) {                                      \
            static const TYPE variants[] = LINTX_VARIANTS(PREFIX); \
            chosen = fn = variants[ISA()];                     \
        }                                                      \
        return fn;                                             \
    }

/* lintx_isa() for the entry points whose AVX2 variant also uses FMA (target "avx2,fma": causal.c, linear.c): the
 * baseline on an AVX2 CPU without it. */
static inline int lintx_isa_fma(void) {
    int isa = lintx_isa();
#if defined(LINTX_X86) && !defined(LINTX_FORCE_ISA)
    if (isa == LINTX_ISA_AVX2 && !__builtin_cpu_supports("fma"))
        isa = LINTX_ISA_BASE;
#endif
    return isa;
}

/* GOMP_parallel's type: the entry of the OpenMP runtime torch runs its parallel ops on, whose address the caller
 * finds (lintx_triton/native/__init__.py's _openmp_parallel); causal.c, linear.c and step.c split their work on
 * its team. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);

/* Work split in `parts` parts on that team: each member takes the next part not yet taken until none is left
 * (part(ctx, i, parts) for every i < parts, each once; causal.c, linear.c and step.c say what a part is). */
typedef void (*lintx_part_fn)(void *ctx, int64_t part, int64_t parts);
typedef struct {
    lintx_part_fn part;
    void *ctx;
    int64_t parts, next;
} lintx_team;

static inline void lintx_team_member(void *p) {
    lintx_team *t = (lintx_team *)p;
    for (int64_t i; (i = __atomic_fetch_add(&t->next, 1, __ATOMIC_RELAXED)) < t->parts;)
        t->part(t->ctx, i, t->parts);
}

/* gomp_parallel: the address of GOMP_parallel; returns when every part is done */
static inline void lintx_on_team(int64_t gomp_parallel, int64_t parts, lintx_part_fn part, void *ctx) {
    lintx_team t = {part, ctx, parts, 0};
    ((gomp_parallel_fn)(intptr_t)gomp_parallel)(lintx_team_member, &t, (unsigned)parts, 0);
}

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

#endif
