"""phi of an elementwise map (M = D) on row tiles, and the store of its vector-Jacobian product."""
import triton
import triton.language as tl

from .constants import BD, BM, D, M, phi, phi_vjp
from .helpers import _load_rows, _store_rows

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _phi(ptr, row0, o_t, m_t, HS: tl.constexpr, fm_params, IS_Q: tl.constexpr):
    # phi of the rows o_t of one head of a [B, T, HS, D] tensor -> [BT, BM] fp32, zero on padded rows and
    # features (elementwise: M = D)
    o_d = tl.arange(0, BD)
    x = _load_rows(ptr, row0, o_t, m_t, o_d, o_d < D, HS, D)  # [BT, BD]
    m_f = tl.arange(0, BM) < M
    return tl.where(m_t[:, None] & m_f[None, :], phi(x), 0.0)


@triton.jit
def _store_phi_vjp(dptr, drow0, DHS: tl.constexpr, ptr, row0, HS: tl.constexpr, o_t, m_t, g, fm_params,
                   IS_Q: tl.constexpr, dfm, HAS_DFM: tl.constexpr):
    # dL/dx of those rows from g = dL/dphi [BT, BM], stored to the rows drow0 + o_t DHS of dptr [.., D]
    # (an elementwise map has no parameters: fm_params, dfm and HAS_DFM are not read)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    x = _load_rows(ptr, row0, o_t, m_t, o_d, m_d, HS, D)
    _store_rows(dptr, tl.where(m_d[None, :], phi_vjp(x, g), 0.0), drow0, o_t, m_t, o_d, m_d, DHS, D)

