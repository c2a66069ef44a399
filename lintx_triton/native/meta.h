/* What runner.c reads of a tensor: one struct, filled either from the TensorImpl's own inline accessors (meta.cpp,
 * built with torch's c10 headers) or by runner.c from the tensor's Python attributes (where those headers or a
 * C++ compiler are missing). Included by both. */

#ifndef LINTX_META_H
#define LINTX_META_H

#include <stdint.h>

#define LINTX_META_DIMS 4 /* sizes and strides kept up to this many dimensions (the state S has 4) */

typedef struct {
    int64_t ndim;
    int64_t sizes[LINTX_META_DIMS], strides[LINTX_META_DIMS]; /* the first min(ndim, LINTX_META_DIMS) */
    int64_t data;        /* data_ptr() (mutable_data, as Python's), read only when asked and plain; else 0 */
    int32_t plain;       /* strided, CPU, float32, not a negated view or a ZeroTensor, within its storage */
    int32_t contiguous;  /* is_contiguous() */
    int32_t requires_grad; /* read only when asked and plain; else 0 */
} lintx_meta;

enum { LINTX_META_GRAD = 1, LINTX_META_DATA = 2 };

#ifdef __cplusplus
extern "C" {
#endif
/* impl: a c10::TensorImpl * (a tensor's _cdata); want: LINTX_META_* bits. 0, or -1 when c10 threw (m undefined) */
int lintx_tensor_meta(const void *impl, int want, lintx_meta *m);
#ifdef __cplusplus
}
#endif

#endif
