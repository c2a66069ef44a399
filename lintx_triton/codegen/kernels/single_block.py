"""The blocked interface of the feature helpers for maps whose features fit one block (elementwise and projected
maps: NMB = 1): joined after elementwise.py or projected.py. The kernels call these only when NMB > 1, which
such a map never has; the polynomial maps' own are in polynomial.py."""
import triton
import triton.language as tl

from .elementwise import _phi  # or projected.py's

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _phi_blk(ptr, row0, o_t, m_t, HS: tl.constexpr, fm_params, IS_Q: tl.constexpr, i_mb):
    # feature block i_mb: one block holds every feature of the map (NMB = 1)
    return _phi(ptr, row0, o_t, m_t, HS, fm_params, IS_Q)


@triton.jit
def _phi_vjp_acc(acc, ptr, row0, HS: tl.constexpr, o_t, m_t, g, fm_params, IS_Q: tl.constexpr, i_mb):
    tl.static_assert(False, "this map has one feature block (NMB = 1): the kernels use _store_phi_vjp")
    return acc


@triton.jit
def _phi_vjp_store(acc, dptr, drow0, DHS: tl.constexpr, ptr, row0, HS: tl.constexpr, o_t, m_t, fm_params,
                   IS_Q: tl.constexpr, dfm, HAS_DFM: tl.constexpr):
    tl.static_assert(False, "this map has one feature block (NMB = 1): the kernels use _store_phi_vjp")
