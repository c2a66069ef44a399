"""The names the generated header defines, with example values: for readers, editors and linters.

Every generated module starts with these constants, set from its spec by
:mod:`lintx_triton.codegen.render` (whose header documents each one), then the feature map's Triton
functions. Nothing imports this module at run time: the values below (a bfloat16, D = DV = 64
elementwise variant) only let the kernel files be read, linted and navigated as Python.
"""
import triton
import triton.language as tl

D = tl.constexpr(64)
DV = tl.constexpr(64)
M = tl.constexpr(64)
BD = tl.constexpr(64)
BM = tl.constexpr(64)
BDV = tl.constexpr(64)
IS_CAUSAL = tl.constexpr(True)
NORMALIZE = tl.constexpr(True)
HAS_S0 = tl.constexpr(False)
DOT_FP32 = tl.constexpr(False)
WIDE_TF32 = tl.constexpr(False)
FEAT_TF32 = tl.constexpr(False)
ELEM = tl.constexpr(tl.bfloat16)
IN_SCALE = tl.constexpr(1.0)
BKP = tl.constexpr(16)
NMB = tl.constexpr(1)
FMS = tl.constexpr(65 * 64)
BDA = tl.constexpr(128)


# Stand-ins for the feature map's functions (elu(x) + 1 here); each map's own are spliced in.
@triton.jit
def phi(x):
    return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def phi_vjp(x, g):
    return tl.where(x > 0, g, g * tl.exp(x))


@triton.jit
def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
    return tl.exp(u + b - n)


@triton.jit
def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
    return g * f, -tl.sum(g * f, 1)[:, None]


@triton.jit
def poly_pre_sel(xs, I, x, m_d, p):
    return xs


@triton.jit
def poly_pre_vjp(x, m_d, p, g):
    return g


@triton.jit
def poly_pre_dparams(x, m_d, p, g, dfm):
    pass


@triton.jit
def poly_index(f):
    return f * 0 + D, f * 0 + D, tl.where(f == 0, 1.0, 0.0)
