"""Polynomial feature maps: features that are products of the input's entries (Based's Taylor map, ReBased).

phi(x) = [c0, c1 y, c2 vec(y y^T)] of y = pre(x) (each part optional but the quadratic one), or with the
quadratic part kept as its upper triangle (``compressed``: the diagonal times c2, each pair i < j once
times sqrt(2) c2, the same inner products phi(q)^T phi(k) with M = D(D + 1) / 2 quadratic features instead of
D^2). Every feature is ``c_f y'_I(f) y'_J(f)`` of the augmented y' = [y, 1], so the kernels build any block
of features on chip from y' and two one-hot selections, and M may exceed what one tile holds: the kernels
walk the features in blocks of ``block_m`` (``FeatureMap.blocked``), so phi(q), phi(k) are never in device
memory, also at M = 273 (Based's D = 16).

The generated kernels take four Triton functions from the map:

``poly_pre_sel(xs, I, x, m_d, p)``
    y = pre(x) on selected columns: ``xs`` [BT, BM] holds the entries I [BM] of each row (selected exactly
    from x' = [x, 1] by one-hot products), ``x`` [BT, BDA] the whole rows x' (columns ``m_d`` real), for maps
    whose pre reads a row statistic (ReBased's LayerNorm); ``p`` points at the map's parameters (none for the
    Taylor map).
``poly_pre_vjp(x, m_d, p, gy)``
    dL/dx from gy = dL/dy on an fp32 ``[BT, BDA]`` tile of head vectors (the rest 0).
``poly_pre_dparams(x, m_d, p, gy, dfm)``
    a learnable map: the tile's share of its parameters' gradient, added into ``dfm`` with atomics.
``poly_index(f)``
    feature indices f ``[BM]`` -> (I, J, c): phi_f = c * y'_I * y'_J (I = J = D: the constant; I = D: a linear
    feature).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch

from torch import nn

from .base import FeatureMap, register
from .learnable import HeadParams

__all__ = ["PolynomialFeatureMap", "ReBasedFeatureMap", "taylor", "rebased"]

_SQRT2 = math.sqrt(2.0)


class PolynomialFeatureMap(FeatureMap):
    """A map whose features are products of (a transform of) the input's entries, up to degree 2.

    phi(x) = [constant, linear * y, quadratic * vec(y y^T)] with y = pre(x) applied to head vectors of width
    ``head_dim``; parts whose coefficient is ``None`` are left out (the quadratic part is always there).

    Args:
        name: registry name, a valid Python identifier.
        head_dim: D, the width of the head vectors the map is built for.
        constant: c0, the constant feature (``None``: none).
        linear: c1, the factor of the D linear features (``None``: none).
        quadratic: c2, the factor of the quadratic features.
        compressed: keep the upper triangle of y y^T (D(D + 1) / 2 features: the diagonal times c2, each pair
            i < j once times sqrt(2) c2), which gives the same phi(q)^T phi(k) as the full D^2. Default False.
        pre: a Triton expression in ``x`` (an fp32 block) for y = pre(x), elementwise. Default ``"x"``.
        pre_vjp: a Triton expression in ``x`` and ``g`` for g * pre'(x). Default ``"g"``.
        reference_pre: pre in PyTorch (the float64 reference and the ``torch`` backend). Default identity.
        positive: every phi(q)^T phi(k) is > 0, so the normalizer never vanishes (the Taylor map: 1 + s +
            s^2 / 2 >= 1 / 2). Default False.
        doc: one line saying what the map is.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> quad = lx.feature_maps.PolynomialFeatureMap("quad_d8", 8, quadratic=0.25, compressed=True)
        >>> quad.feature_dim(8)
        36
        >>> lx.linear_attention(torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 4),
        ...                     feature_map=quad).shape
        torch.Size([1, 8, 2, 4])
    """

    blocked = True

    def __init__(
        self,
        name: str,
        head_dim: int,
        *,
        constant: Optional[float] = None,
        linear: Optional[float] = None,
        quadratic: float = 1.0,
        compressed: bool = False,
        pre: str = "x",
        pre_vjp: str = "g",
        reference_pre: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
        positive: bool = False,
        doc: str = "",
    ):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"feature map name must be a Python identifier, got {name!r}")
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"feature map {name!r}: head_dim must be a positive int, got {head_dim!r}")
        for what, src in (("pre", pre), ("pre_vjp", pre_vjp)):
            if not isinstance(src, str) or not src.strip() or "\n" in src.strip():
                raise ValueError(f"feature map {name!r}: {what} must be a one-line Triton expression, got {src!r}")
        if not callable(reference_pre):
            raise TypeError(f"feature map {name!r}: reference_pre must be callable, got {type(reference_pre).__name__}")
        self.name = name
        self.head_dim = head_dim
        self.constant = None if constant is None else float(constant)
        self.linear = None if linear is None else float(linear)
        self.quadratic = float(quadratic)
        self.compressed = bool(compressed)
        self.pre, self.pre_vjp = pre.strip(), pre_vjp.strip()
        self.reference_pre = reference_pre
        self.positive = bool(positive)
        self.doc = doc

    # ---- the parts: [constant (n0 = 0 or 1), linear (n1 = 0 or D), quadratic (D^2 or D(D + 1) / 2)]
    def _counts(self, D: int) -> tuple[int, int, int]:
        return (int(self.constant is not None), D if self.linear is not None else 0,
                D * (D + 1) // 2 if self.compressed else D * D)

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim != self.head_dim:
            raise ValueError(f"feature map {self.name!r} is built for head vectors of width {self.head_dim}, got "
                             f"D = {head_dim}; build one for D = {head_dim}")

    def feature_dim(self, head_dim: int) -> int:
        return sum(self._counts(head_dim))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self._expand(self.reference_pre(x))

    def _expand(self, y: torch.Tensor) -> torch.Tensor:
        """[c0, c1 y, c2 vec(y y^T)] (or the upper triangle) of y [..., D]."""
        D = y.shape[-1]
        parts = []
        if self.constant is not None:
            parts.append(torch.full_like(y[..., :1], self.constant))
        if self.linear is not None:
            parts.append(self.linear * y)
        quad = y[..., :, None] * y[..., None, :]  # [..., D, D]
        if self.compressed:
            i, j = torch.triu_indices(D, D, device=y.device)
            # (built in y's dtype: a where of Python floats would round the factors to float32)
            c = torch.tensor([_SQRT2 * self.quadratic, self.quadratic], dtype=y.dtype, device=y.device)
            coef = c[(i == j).long()]
            parts.append(quad[..., i, j] * coef)
        else:
            parts.append(self.quadratic * quad.flatten(-2))
        return torch.cat(parts, -1)

    def triton_source(self) -> str:
        D = self.head_dim
        n0, n1, _ = self._counts(D)
        c0 = repr(self.constant if self.constant is not None else 0.0)
        c1 = repr(self.linear if self.linear is not None else 0.0)
        c2, c2o = repr(self.quadratic), repr((_SQRT2 if self.compressed else 1.0) * self.quadratic)
        if self.compressed:
            # row i of the upper triangle starts at s(i) = i D - i (i - 1) / 2: I = the last row with s(i) <= fq,
            # i = floor(((2D + 1) - sqrt((2D + 1)^2 - 8 fq)) / 2)
            # (closed form, corrected by one either way for fp32's rounding: a [BDA, BM] count of the rows kept
            # 8-16 bytes of stack in the fused forward at D = 16 on sm_90)
            w = 2 * D + 1
            quad = (
                f"    r = tl.sqrt(tl.maximum({w * w}.0 - 8.0 * fq.to(tl.float32), 0.0))\n"
                f"    i = tl.minimum(tl.maximum((({w}.0 - r) * 0.5).to(tl.int32), 0), {D - 1})\n"
                f"    i = tl.where(i * {D} - (i * (i - 1)) // 2 > fq, tl.maximum(i - 1, 0), i)\n"
                f"    i = tl.where((i + 1) * {D} - ((i + 1) * i) // 2 <= fq, tl.minimum(i + 1, {D - 1}), i)\n"
                f"    j = tl.minimum(fq - (i * {D} - (i * (i - 1)) // 2) + i, {D - 1})\n"
            )
        else:
            quad = f"    i = fq // {D}\n    j = fq % {D}\n"
        return (
            self._pre_source()
            + "\n\n"
            "@triton.jit\n"
            "def poly_index(f):\n"
            f"    # feature f -> (I, J, c): phi_f = c y'_I y'_J, y' = [y, 1]; {n0} constant, {n1} linear features\n"
            f"    fq = tl.maximum(f - {n0 + n1}, 0)\n"
            + quad
            + f"    I = tl.where(f < {n0 + n1}, {D}, i)\n"
            f"    J = tl.where(f < {n0}, {D}, tl.where(f < {n0 + n1}, f - {n0}, j))\n"
            f"    c = tl.where(f < {n0}, {c0}, tl.where(f < {n0 + n1}, {c1}, tl.where(i == j, {c2}, {c2o})))\n"
            "    return I, J, c\n"
        )

    def _pre_source(self) -> str:
        """The Triton functions of y = pre(x): ``poly_pre``, ``poly_pre_vjp`` and ``poly_pre_dparams`` (which adds a
        tile's share of the parameters' gradient into ``dfm`` with atomics: nothing here, a fixed map has none)."""
        return (
            "@triton.jit\n"
            "def poly_pre_x(x):\n"
            f"    # polynomial feature map {self.name!r}: y = pre(x), elementwise\n"
            + (f"    # {self.doc}\n" if self.doc else "")
            + f"    return {self.pre}\n"
            "\n\n"
            "@triton.jit\n"
            "def poly_pre_sel(xs, I, x, m_d, p):\n"
            "    # y on the selected columns xs [BT, BM] (their indices I; x [BT, BDA] the whole rows)\n"
            "    return poly_pre_x(xs)\n"
            "\n\n"
            "@triton.jit\n"
            "def poly_pre_vjp(x, m_d, p, g):\n"
            f"    return {self.pre_vjp}\n"
            "\n\n"
            "@triton.jit\n"
            "def poly_pre_dparams(x, m_d, p, g, dfm):\n"
            "    pass  # no parameters\n"
        )

    def params_per_head(self, head_dim: int) -> int:
        return 0

    def source_hash(self) -> str:
        text = f"{type(self).__name__}:{self.name}:{self.head_dim}:{self.triton_source()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, D={self.head_dim})"


def taylor(D: int, compressed: bool = False) -> PolynomialFeatureMap:
    """Based's second-order Taylor map (Arora et al., 2024), registered as ``taylor_d{D}`` (``taylor_c_d{D}``).

    phi(x) = [1, x / D^(1/4), vec(x x^T) / (sqrt(2) sqrt(D))], so phi(q)^T phi(k) = 1 + s + s^2 / 2 with
    s = q.k / sqrt(D): exactly ``TaylorExp`` of HazyResearch/based (32c1bd4,
    ``based/models/mixers/linear_attention.py:62-72``: the full D x D outer product, row-major, M = 1 + D + D^2,
    273 at Based's D = 16). ``compressed=True`` keeps the upper triangle (M = 1 + D + D(D + 1) / 2, 153 at
    D = 16), as FLA's ``TaylorFeatureMap`` does (a different order of the same inner products).

    Args:
        D: the head width the map is built for (Based uses its feature dimension, 16).
        compressed: the upper-triangle form. Default False.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> fm = lx.feature_maps.taylor(16)
        >>> fm.feature_dim(16)
        273
        >>> q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        >>> s = q @ k / 4
        >>> bool(torch.isclose(fm.reference(q) @ fm.reference(k), 1 + s + s * s / 2))
        True
    """
    if not isinstance(D, int) or D < 1:
        raise ValueError(f"taylor(D): D must be a positive int, got {D!r}")
    s = D ** -0.25  # y = x / D^(1/4): the linear part then needs no factor, the quadratic one 1 / sqrt(2)
    name = f"taylor_{'c_' if compressed else ''}d{D}"
    fm = PolynomialFeatureMap(
        name, D, constant=1.0, linear=1.0, quadratic=1.0 / _SQRT2, compressed=compressed,
        pre=f"x * {s!r}", pre_vjp=f"g * {s!r}", reference_pre=lambda x: x * s, positive=True,
        doc=f"Based's Taylor map at D = {D}{' (upper triangle)' if compressed else ''}: phi(q).phi(k) = 1 + s + s^2/2",
    )
    return register(fm)


class _NormEnvelope(torch.autograd.Function):
    """y_env = |gamma| (|xhat| + |mu| r) + |beta| of xhat = (x - mu) r, r = 1 / sqrt(var + eps): at least |y|
    and the rounding y carries (x - mu loses |mu| ulps), for the bounds of :mod:`lintx_triton.testing`. Its
    backward, for weights w >= 0 (a bound's), returns sums of w times upper bounds of |dy/dx|, |dy/dgamma|,
    |dy/dbeta|: |dxhat_i/dx_l| <= r (delta_il + 1/D + |xhat_i| |xhat_l| / D), which autograd of y itself would
    cancel in places."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
        xhat = xc * r
        a = xhat.abs() + mu.abs() * r
        ctx.save_for_backward(a, xhat, r, gamma)
        ctx.shapes = (gamma.shape, beta.shape)
        return gamma.abs() * a + beta.abs()

    @staticmethod
    def backward(ctx, w):
        a, xhat, r, gamma = ctx.saved_tensors
        w = w.abs()
        D = xhat.shape[-1]
        wg = w * gamma.abs()
        dx = r * (wg + wg.sum(-1, keepdim=True) / D + xhat.abs() * (wg * xhat.abs()).sum(-1, keepdim=True) / D)
        return dx, (w * a).sum_to_size(ctx.shapes[0]), w.sum_to_size(ctx.shapes[1]), None


class _Affine(nn.Module):
    """ReBased's gamma (``weight``, ones) and beta (``bias``, zeros), ``[heads, D]`` each."""

    def __init__(self, heads: int, D: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, D))
        self.bias = nn.Parameter(torch.zeros(heads, D))


class ReBasedFeatureMap(HeadParams, nn.Module, PolynomialFeatureMap):
    """ReBased's map (Aksenov et al., 2024): phi(x) = vec(y y^T) / sqrt(D) of y = gamma * LayerNorm(x) + beta, with
    gamma and beta trained (``nn.Parameter``s ``[HW, D]``, per head or shared, tied or untied), so that
    phi(q)^T phi(k) = (y_q . y_k)^2 / D. Built by :func:`rebased`; see there for the choices made."""

    learnable = True

    def __init__(self, D: int, *, heads: int = 1, tied: bool = True, key_heads: Optional[int] = None,
                 compressed: bool = False, eps: float = 1e-5):
        nn.Module.__init__(self)
        name = f"rebased_{'c_' if compressed else ''}d{D}"
        PolynomialFeatureMap.__init__(
            self, name, D, quadratic=D ** -0.5, compressed=compressed, positive=True,
            doc=f"ReBased at D = {D}: (gamma LayerNorm(x) + beta) squared as an outer product, / sqrt(D)")
        self.eps = float(eps)
        for what, n in (("heads", heads), ("key_heads", key_heads)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"rebased(): {what} must be a positive int, got {n!r}")
        self.query = _Affine(heads, D)
        self.key = None if tied else _Affine(heads if key_heads is None else key_heads, D)

    def heads_of(self, side: str) -> int:
        return self.side_params(side).weight.shape[0]

    def params_per_head(self, head_dim: int) -> int:
        return 2 * head_dim

    def kernel_params(self, side: str, device) -> torch.Tensor:
        """``[HW, 2, D]`` fp32: gamma then beta (differentiably from the parameters)."""
        a = self.side_params(side)
        return self._to_kernels(torch.stack([a.weight, a.bias], 1), device)

    def _pre(self, x: torch.Tensor, side: str) -> torch.Tensor:
        a = self.side_params(side)
        xc = x - x.mean(-1, keepdim=True)
        xhat = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + self.eps)
        return xhat * a.weight.to(x.dtype) + a.bias.to(x.dtype)

    def features(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """phi of ``x`` [..., H, D] (or [..., D] when the parameters are shared) with ``side``'s gamma and beta."""
        self.check_head_dim(x.shape[-1])
        return self._expand(self._pre(x, side))

    def forward(self, x: torch.Tensor, side: str = "key") -> torch.Tensor:
        return self.features(x, side)

    def magnitude(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """phi of the envelope |gamma| (|xhat| + |mu| / sigma) + |beta| of |y| (non-negative, so are its factors),
        whose gradient bounds |dphi/dx| and |dphi/d(gamma, beta)| term by term (see ``_NormEnvelope``)."""
        self.check_head_dim(x.shape[-1])
        a = self.side_params(side)
        return self._expand(_NormEnvelope.apply(x, a.weight.to(x.dtype), a.bias.to(x.dtype), self.eps))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, "key")

    def _pre_source(self) -> str:
        D, eps = self.head_dim, self.eps
        stats = (
            "    o_d = tl.arange(0, BDA)\n"
            f"    xc = tl.where(m_d[None, :], x - tl.sum(x, 1)[:, None] / {D}, 0.0)\n"
            f"    r = 1.0 / tl.sqrt(tl.sum(xc * xc, 1)[:, None] / {D} + {eps!r})\n"
        )
        return (
            "@triton.jit\n"
            "def poly_pre_sel(xs, I, x, m_d, p):\n"
            f"    # {self.name!r}: y = gamma LayerNorm(x) + beta over the row's {D} entries (p = [gamma, beta]), on the\n"
            "    # selected columns xs [BT, BM] (indices I); the statistics from the whole rows x' = [x, 1] (masked)\n"
            "    x = tl.where(m_d[None, :], x, 0.0)\n"
            + stats
            + "    m_i = I < " + str(D) + "\n"
            "    gamma = tl.load(p + I, mask=m_i, other=0.0)[None, :]\n"
            f"    beta = tl.load(p + {D} + I, mask=m_i, other=0.0)[None, :]\n"
            f"    return (xs - tl.sum(x, 1)[:, None] / {D}) * r * gamma + beta\n"
            "\n\n"
            "@triton.jit\n"
            "def poly_pre_vjp(x, m_d, p, g):\n"
            "    # LayerNorm's vjp: r (dxh - mean(dxh) - xhat mean(dxh xhat)), dxh = g gamma\n"
            + stats
            + "    xhat = xc * r\n"
            "    dxh = tl.where(m_d[None, :], g * tl.load(p + o_d, mask=m_d, other=0.0)[None, :], 0.0)\n"
            f"    return r * (dxh - tl.sum(dxh, 1)[:, None] / {D} - xhat * (tl.sum(dxh * xhat, 1)[:, None] / {D}))\n"
            "\n\n"
            "@triton.jit\n"
            "def poly_pre_dparams(x, m_d, p, g, dfm):\n"
            "    # the tile's dL/dgamma = sum_t g xhat and dL/dbeta = sum_t g, added into this head's [2, D]\n"
            + stats
            + "    g = tl.where(m_d[None, :], g, 0.0)\n"
            "    tl.atomic_add(dfm + o_d, tl.sum(g * xc * r, 0), mask=m_d)\n"
            f"    tl.atomic_add(dfm + {D} + o_d, tl.sum(g, 0), mask=m_d)\n"
        )

    def extra_repr(self) -> str:
        heads = self.heads_of("query") if self.tied else f"{self.heads_of('query')}/{self.heads_of('key')}"
        return f"{self.name!r}, D={self.head_dim}, heads={heads}, tied={self.tied}, eps={self.eps}"

    __repr__ = nn.Module.__repr__


def rebased(D: int, heads: int = 1, tied: bool = True, key_heads: Optional[int] = None, compressed: bool = False,
            eps: float = 1e-5) -> ReBasedFeatureMap:
    """ReBased's learnable quadratic map (Aksenov et al., 2024), registered as ``rebased_d{D}`` (``rebased_c_d{D}``).

    phi(x) = vec(y y^T) / sqrt(D), y = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta over the head's D entries,
    so phi(q)^T phi(k) = (y_q . y_k / sqrt(D))^2: the kernel of corl-team/rebased's model (2dc269e,
    ``src/mixers/rebased.py:219-255``: LayerNorm, then ``parallel_rebased`` of ``fla.ops.triton.rebased_fast``,
    whose scores are (q.k / sqrt(d))^2; no constant or linear term). Choices, documented:

    * the normalization is per head, over D (as FLA's ``RebasedFeatureMap``, ``fla/modules/feature_map.py:221-260``);
      ReBased's own model takes one LayerNorm over all H * D projected entries before the head split, which is
      not a per-head feature map (it mixes heads): normalize per head, or apply that LayerNorm before the call
      with ``gamma=1, beta=0`` here;
    * gamma and beta are per feature, per head (``heads=H``) or shared (``heads=1``, FLA's choice), for queries
      and keys together (``tied=True``, FLA's) or apart (``tied=False``: ReBased's ``ln_q``, ``ln_k``);
      initialised to ones and zeros; eps 1e-5 (torch's LayerNorm default, both codes').

    Args:
        D: head width (ReBased uses a feature dimension of 16).
        heads: HW of the query parameters (of both when tied): 1 or H. Default ``1``.
        tied: one (gamma, beta) for queries and keys. Default ``True``.
        key_heads: HW of the key parameters when untied (1 or HKV). Default ``heads``.
        compressed: the upper triangle of y y^T (D(D + 1) / 2 features, the same inner products). Default False.
        eps: the normalization's eps. Default ``1e-5``.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> fm = lx.feature_maps.rebased(16, heads=2)
        >>> q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 4)
        >>> lx.linear_attention(q, k, v, feature_map=fm).sum().backward()
        >>> fm.query.weight.grad.shape
        torch.Size([2, 16])
    """
    if not isinstance(D, int) or isinstance(D, bool) or D < 1:
        raise ValueError(f"rebased(D): D must be a positive int, got {D!r}")
    return register(ReBasedFeatureMap(D, heads=heads, tied=tied, key_heads=key_heads, compressed=compressed,
                                      eps=eps), overwrite=False)
