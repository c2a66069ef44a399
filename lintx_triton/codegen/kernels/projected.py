"""phi of a projected map (u = x' W, computed on chip BKP columns at a time) on row tiles, and the store of
its vector-Jacobian product dL/dx = IN_SCALE (dL/du W^T + dL/dn x')."""
import triton
import triton.language as tl

from .constants import BD, BKP, BM, D, DOT_FP32, IN_SCALE, M, NORMALIZE, phi_proj, phi_proj_vjp
from .helpers import _load_rows, _mm_wide, _store_rows

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _mm_proj(a, b):
    # the projection x' W and its transpose: fp32 operands, as exact as the products allow (exp(u)
    # magnifies an error in u: 3xTF32 keeps u to ~fp32 accuracy on tensor cores)
    if DOT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _mm_dw(a, b):
    # x'^T dL/du, a parameter gradient (sm_90 bf16 cubins, bench/NOTES.md): as exact as the projection up to
    # BM = 128 (tf32x3; at D = 64, M = 128 the (dk, dv) kernel's stack is 48 bytes, 160 with one TF32 pass);
    # wider, tf32x3 stages du [BT, BM] twice more in shared memory (288 KB for the dq kernel at D = 128,
    # M = 256, over sm_90's 227 KB), so there it is a gradient product like the kernels' others (_mm_wide:
    # bf16 operands in bf16 variants, 192 KB; TF32 in fp16; IEEE in fp32)
    if BM <= 128:
        return _mm_proj(a, b)
    else:
        return _mm_wide(a, b)


@triton.jit
def _w_block(fm_params, o_k, m_k):
    # rows o_k of W -> [BKP, BM] fp32 (0 outside)
    o_m = tl.arange(0, BM)
    return tl.load(fm_params + o_k[:, None] * M + o_m[None, :], mask=m_k[:, None] & (o_m < M)[None, :], other=0.0)


@triton.jit
def _project(ptr, row0, o_t, m_t, HS: tl.constexpr, fm_params):
    # u = x' W [BT, BM] and n = |x'|^2 / 2 [BT, 1], x' = x * IN_SCALE, summed over BKP columns of x at a
    # time: W is never on chip whole ([D, M] fp32 at D = 128, M = 256 would take 256 registers a thread)
    u = tl.zeros([o_t.shape[0], BM], dtype=tl.float32)
    n = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    for kk in range(0, BD, BKP):
        o_k = kk + tl.arange(0, BKP)
        m_k = o_k < D
        xs = _load_rows(ptr, row0, o_t, m_t, o_k, m_k, HS, D) * IN_SCALE  # [BT, BKP]
        u += _mm_proj(xs, _w_block(fm_params, o_k, m_k))
        n += tl.sum(xs * xs, 1)
    o_m = tl.arange(0, BM)
    b_b = tl.load(fm_params + D * M + o_m, mask=o_m < M, other=0.0)[None, :]  # the bias row [1, BM]
    return u, 0.5 * n[:, None], b_b


@triton.jit
def _phi(ptr, row0, o_t, m_t, HS: tl.constexpr, fm_params, IS_Q: tl.constexpr):
    # phi of the rows o_t of one head of a [B, T, HS, D] tensor -> [BT, BM], zero on padded rows and
    # features. Queries may take a per-row shift (STAB) only when the output is normalized: there it
    # cancels in num / den.
    u, n, b_b = _project(ptr, row0, o_t, m_t, HS, fm_params)
    m_f = (tl.arange(0, BM) < M)[None, :]
    return tl.where(m_t[:, None] & m_f, phi_proj(u, n, b_b, m_f, IS_Q, NORMALIZE), 0.0)


@triton.jit
def _store_phi_vjp(dptr, drow0, DHS: tl.constexpr, ptr, row0, HS: tl.constexpr, o_t, m_t, g, fm_params,
                   IS_Q: tl.constexpr, dfm, HAS_DFM: tl.constexpr):
    # dL/dx = IN_SCALE (dL/du W^T + dL/dn x') from g = dL/dphi [BT, BM], phi recomputed from x; stored
    # BKP columns at a time to the rows drow0 + o_t DHS of dptr. HAS_DFM (a learnable map): the chunk's share
    # of dL/dW = x'^T dL/du and dL/db = sum_t dL/du is added (fp32 atomics) into dfm [D + 1, M], this head's
    # accumulator
    u, n, b_b = _project(ptr, row0, o_t, m_t, HS, fm_params)
    o_m = tl.arange(0, BM)
    m_f = (o_m < M)[None, :]
    f = tl.where(m_f, phi_proj(u, n, b_b, m_f, IS_Q, NORMALIZE), 0.0)
    du, dn = phi_proj_vjp(u, n, b_b, f, tl.where(m_f, g, 0.0), IS_Q)
    du = tl.where(m_t[:, None] & m_f, du, 0.0)
    for kk in range(0, BD, BKP):
        o_k = kk + tl.arange(0, BKP)
        m_k = o_k < D
        xs = _load_rows(ptr, row0, o_t, m_t, o_k, m_k, HS, D) * IN_SCALE  # [BT, BKP]
        # (tensor * constexpr: the interpreter turns constexpr * tensor into a constexpr)
        dx = (_mm_proj(du, tl.trans(_w_block(fm_params, o_k, m_k))) + dn * xs) * IN_SCALE
        _store_rows(dptr, dx, drow0, o_t, m_t, o_k, m_k, DHS, D)
        if HAS_DFM:  # [BKP, BM] rows o_k of dL/dW
            tl.atomic_add(dfm + o_k[:, None] * M + o_m[None, :], _mm_dw(tl.trans(xs), du), mask=m_k[:, None] & m_f)
    if HAS_DFM:
        tl.atomic_add(dfm + D * M + o_m, tl.sum(du, 0), mask=o_m < M)  # dL/db

