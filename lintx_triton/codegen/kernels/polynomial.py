"""phi of a polynomial map (features c_f y'_I y'_J of y' = [pre(x), 1]) on row tiles, one block of BM features
at a time: the factors' entries of x' = [x, 1] selected exactly by one-hot products, pre applied column by column;
and its vector-Jacobian product accumulated over the blocks as dL/dy' [BT, BDA], turned into dL/dx once (pre's
vjp) and stored."""
import triton
import triton.language as tl

from .constants import BDA, BM, D, DOT_FP32, ELEM, M, poly_index, poly_pre_dparams, poly_pre_sel, poly_pre_vjp
from .helpers import _load_rows, _mm_wide, _store_rows

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _mm_sel(x, s):
    # x' [BT, BDA] @ a one-hot selection [BDA, BM]: each output is one entry of x', exactly (x' holds the inputs'
    # own values and 1, representable in their dtype: one product by 1 and fp32 sums of zeros). On tensor cores
    # in the inputs' dtype: 3xTF32 of fp32 values spilled every blocked kernel at D = 16 (bench/NOTES.md)
    if DOT_FP32:
        return tl.dot(x, s, input_precision="ieee")
    else:
        return tl.dot(x.to(ELEM), s.to(ELEM))


@triton.jit
def _poly_x(ptr, row0, o_t, m_t, HS: tl.constexpr):
    # x' = [x, 1, 0...] [BT, BDA] of the rows o_t (the constant column D of y' = [pre(x), 1]) and x's mask
    o_d = tl.arange(0, BDA)
    m_d = o_d < D
    x = _load_rows(ptr, row0, o_t, m_t, o_d, m_d, HS, D)
    return tl.where((o_d == D)[None, :], 1.0, x), m_d


@triton.jit
def _select(i_mb):
    # block i_mb's one-hot selections [BDA, BM] of each feature's two factors, their indices and the features'
    # factors [BM] (0 past M, so padded features are 0)
    o_f = i_mb * BM + tl.arange(0, BM)
    I, J, c = poly_index(o_f)
    o_d = tl.arange(0, BDA)[:, None]
    return (o_d == I[None, :]).to(tl.float32), (o_d == J[None, :]).to(tl.float32), I, J, tl.where(o_f < M, c, 0.0)


@triton.jit
def _factor(x, m_d, s, I, fm_params):
    # y'_I [BT, BM] of the features' factor I: x' selected, then pre column by column (x' itself past D: 1)
    xs = _mm_sel(x, s)
    return tl.where((I < D)[None, :], poly_pre_sel(xs, I, x, m_d, fm_params), xs)


@triton.jit
def _phi_blk(ptr, row0, o_t, m_t, HS: tl.constexpr, fm_params, IS_Q: tl.constexpr, i_mb):
    # features i_mb BM .. (i_mb + 1) BM of the rows o_t of one head of a [B, T, HS, D] tensor -> [BT, BM] fp32,
    # zero on padded rows and features
    x, m_d = _poly_x(ptr, row0, o_t, m_t, HS)
    s_i, s_j, I, J, c = _select(i_mb)
    f = _factor(x, m_d, s_i, I, fm_params) * _factor(x, m_d, s_j, J, fm_params) * c[None, :]
    return tl.where(m_t[:, None], f, 0.0)


@triton.jit
def _phi(ptr, row0, o_t, m_t, HS: tl.constexpr, fm_params, IS_Q: tl.constexpr):
    # every feature, when one block holds them (NMB = 1)
    return _phi_blk(ptr, row0, o_t, m_t, HS, fm_params, IS_Q, 0)


@triton.jit
def _phi_vjp_acc(acc, ptr, row0, HS: tl.constexpr, o_t, m_t, g, fm_params, IS_Q: tl.constexpr, i_mb):
    # acc [BT, BDA] + dL/dy' of feature block i_mb, from g = dL/dphi [BT, BM] of that block:
    # dphi_f = c_f (y'_J dy'_I + y'_I dy'_J), scattered back to the columns by the selections' transposes (a
    # gradient product like the kernels' others: _mm_wide)
    x, m_d = _poly_x(ptr, row0, o_t, m_t, HS)
    s_i, s_j, I, J, c = _select(i_mb)
    gc = tl.where(m_t[:, None], g, 0.0) * c[None, :]
    acc += _mm_wide(gc * _factor(x, m_d, s_j, J, fm_params), tl.trans(s_i))
    return acc + _mm_wide(gc * _factor(x, m_d, s_i, I, fm_params), tl.trans(s_j))


@triton.jit
def _phi_vjp_store(acc, dptr, drow0, DHS: tl.constexpr, ptr, row0, HS: tl.constexpr, o_t, m_t, fm_params,
                   IS_Q: tl.constexpr, dfm, HAS_DFM: tl.constexpr):
    # dL/dx = pre's vjp of acc = dL/dy' (its column D, the constant 1, has none), stored to the rows
    # drow0 + o_t DHS of dptr [.., D]; HAS_DFM (a learnable map): the tile's share of the parameters' gradient
    # is added (fp32 atomics) into dfm, this head's accumulator
    o_d = tl.arange(0, BDA)
    m_d = o_d < D
    x = _load_rows(ptr, row0, o_t, m_t, o_d, m_d, HS, D)
    _store_rows(dptr, tl.where(m_d[None, :], poly_pre_vjp(x, m_d, fm_params, acc), 0.0), drow0, o_t, m_t, o_d, m_d,
                DHS, D)
    if HAS_DFM:
        poly_pre_dparams(x, m_d, fm_params, acc, dfm)


@triton.jit
def _store_phi_vjp(dptr, drow0, DHS: tl.constexpr, ptr, row0, HS: tl.constexpr, o_t, m_t, g, fm_params,
                   IS_Q: tl.constexpr, dfm, HAS_DFM: tl.constexpr):
    # dL/dx from g = dL/dphi [BT, BM] of every feature (NMB = 1)
    acc = _phi_vjp_acc(tl.zeros([o_t.shape[0], BDA], dtype=tl.float32), ptr, row0, HS, o_t, m_t, g, fm_params, IS_Q,
                       0)
    _phi_vjp_store(acc, dptr, drow0, DHS, ptr, row0, HS, o_t, m_t, fm_params, IS_Q, dfm, HAS_DFM)
