/* runner.c's reads of a tensor from its c10::TensorImpl: the accessors torch's own C++ calls, inline from c10's
 * headers (only c10/core/TensorImpl.h: 2 s to build; torch's Python headers take 16), in place of a Python
 * attribute read each (shape, dtype, is_cpu, is_contiguous, is_neg, stride, requires_grad, data_ptr: 40-120 ns
 * apiece, ~30 of them in a decode step; bench/NOTES.md, issue #17). Built against the torch that runs (its
 * version is part of the build's name), linked to its libc10; native._ext checks what it reads against the
 * Python attributes once before using it. */

#include <c10/core/TensorImpl.h>

#include "meta.h"

extern "C" int lintx_tensor_meta(const void *impl, int want, lintx_meta *m) {
    try {
        auto *t = const_cast<c10::TensorImpl *>(static_cast<const c10::TensorImpl *>(impl));
        m->plain = t->layout() == c10::kStrided && t->device_type() == c10::DeviceType::CPU &&
                   t->dtype() == caffe2::TypeMeta::Make<float>() && !t->is_neg() && t->has_storage() &&
                   !t->key_set().has(c10::DispatchKey::ZeroTensor);  // a ZeroTensor's storage has no memory
        m->ndim = t->dim();
        if (m->plain) {  // sizes and strides of a dense strided tensor (others may have none)
            const auto sizes = t->sizes(), strides = t->strides();
            int64_t end = t->storage_offset() + 1;  // the last element's offset + 1, 0 for none
            for (int64_t i = 0; i < m->ndim; i++) {
                if (i < LINTX_META_DIMS) {
                    m->sizes[i] = sizes[i];
                    m->strides[i] = strides[i];
                }
                end = sizes[i] == 0 || end == 0 ? 0 : end + (sizes[i] - 1) * strides[i];
            }
            // its storage shrunk under it (resize_, as FSDP frees a parameter's), or elements but no memory (a
            // functional tensor's wrapper): not plain
            m->plain = end * (int64_t)sizeof(float) <= (int64_t)t->unsafe_storage().nbytes() &&
                       (end == 0 || t->unsafe_storage().data() != nullptr);
        }
        m->contiguous = m->plain && t->is_contiguous();
        m->requires_grad = m->plain && (want & LINTX_META_GRAD) ? t->requires_grad() : 0;
        m->data = m->plain && (want & LINTX_META_DATA) ? (int64_t)(intptr_t)t->mutable_data() : 0;
        return 0;
    } catch (...) {
        return -1;
    }
}
