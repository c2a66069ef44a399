"""Projected feature maps: phi(x) = f(x' W + ..., |x'|^2 / 2), with W a parameter of the map.

The kernels load W (and a bias row b) from one ``[D + 1, M]`` fp32 tensor, form
``u = x' W`` on chip with x' = x * input_scale, and call two Triton functions the
map supplies, elementwise on ``[BT, M]`` tiles:

``phi_proj(u, n, b, m_f, IS_Q, STAB)``
    the features; ``u`` [BT, BM], ``n = |x'|^2 / 2`` [BT, 1], ``b`` the bias row [1, BM],
    ``m_f`` [1, BM] the mask of real features, ``IS_Q`` whether x is a query, ``STAB``
    whether a per-query shift may be applied (set when the output is normalized, where it
    cancels in num / den).
``phi_proj_vjp(u, n, b, f, g, IS_Q)``
    given ``f`` (the features) and ``g = dL/dphi``, returns ``(dL/du [BT, BM], dL/dn [BT, 1])``.

The kernels turn these into dL/dx = input_scale * (dL/du W^T + dL/dn x'), so a user
map is two short Triton functions and the same map in PyTorch (:attr:`torch_phi`).
phi(q), phi(k) never leave the chip: no ``[T, M]`` buffer exists in the forward or
the backward.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch

from .base import FeatureMap

__all__ = ["ProjectedFeatureMap", "ProjectedMap", "head_matmul", "projected_magnitude"]

SIDES = ("query", "key")


class ProjectedMap:
    """What every projected map shares, fixed or learnable: phi = torch_phi(x' W, |x'|^2 / 2, b) from the
    subclass's ``_projection(x, side)`` (x' = x * input_scale, W and b in x's dtype), the Triton source and its
    hash. A subclass defines ``name``, ``head_dim``, ``num_features``, ``input_scale``, ``unbounded``, ``triton``,
    ``torch_phi``, ``doc`` and ``_projection``."""

    def feature_dim(self, head_dim: int) -> int:
        return self.num_features

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim != self.head_dim:
            raise ValueError(f"feature map {self.name!r} projects head vectors of width D = {self.head_dim}, "
                             f"got D = {head_dim}; build the map for this D")

    def features(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """phi of ``x`` [..., D] (or [..., H, D] for per-head parameters) with ``side``'s parameters."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.check_head_dim(x.shape[-1])
        xs, W, b = self._projection(x, side)
        return self.torch_phi(head_matmul(xs, W), 0.5 * (xs * xs).sum(-1, keepdim=True), b, side, stabilize)

    def magnitude(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """|phi| widened by the rounding of its arguments, with a gradient free of cancellation
        (:func:`projected_magnitude`). It assumes each feature depends on its own u: a map whose features share
        a row sum (a softmax) must override it, or its gradient bounds come out 0 (Hedgehog does)."""
        xs, W, b = self._projection(x, side)
        return projected_magnitude(self.torch_phi, xs, W, b, side, stabilize)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, "key")

    def triton_source(self) -> str:
        doc = f"# {self.doc}\n" if self.doc else ""
        return (f"# feature map {self.name!r}: projected, D = {self.head_dim}, M = {self.num_features}, "
                f"x' = x * {self.input_scale!r}\n{doc}{self.triton}\n")

    def source_hash(self) -> str:
        # one prefix for every projected map: a fixed and a learnable map of the same source share kernels
        text = f"ProjectedFeatureMap:{self.name}:{self.head_dim}:{self.num_features}:{self.input_scale!r}:" \
               f"{self.unbounded}:{self.triton}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class ProjectedFeatureMap(ProjectedMap, FeatureMap):
    """A feature map of a projection ``x' W`` of the head vector (random features and the like).

    Args:
        name: registry name, a valid Python identifier. Two maps sharing a name must share
            D, M, ``input_scale`` and the Triton source (they then share kernels; W and b
            are runtime arguments, so redrawing W never recompiles).
        weight: W ``[D, M]``; kept in float64, passed to the kernels in fp32.
        bias: b ``[M]`` (default zeros), handed to ``phi_proj`` as it likes (a phase, a shift).
        triton: Triton source defining ``phi_proj`` and ``phi_proj_vjp`` (see the module doc).
        torch_phi: ``f(u, n, b, side, stabilize)`` in PyTorch, the same map: the reference and
            the ``torch`` backend. ``side`` is ``"query"`` or ``"key"``.
        input_scale: x' = x * input_scale. Default: ``1.0``.
        positive: phi(x) > 0 for every x.
        unbounded: phi can leave fp16's range (exponentials): fp16 inputs then multiply
            features with TF32 operands (fp32's range) instead of fp16 ones.
        doc: one line saying what the map is.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> src = '''
        ... @triton.jit
        ... def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
        ...     return tl.maximum(u + b, 0.0)
        ...
        ... @triton.jit
        ... def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
        ...     return tl.where(u + b > 0, g, 0.0), tl.zeros_like(n)
        ... '''
        >>> fm = lx.feature_maps.ProjectedFeatureMap(
        ...     "relu_proj_d16_m32", torch.randn(16, 32), None, src,
        ...     torch_phi=lambda u, n, b, side, stabilize: torch.relu(u + b))
        >>> lx.linear_attention(torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16),
        ...                     torch.randn(1, 8, 2, 4), feature_map=fm).shape
        torch.Size([1, 8, 2, 4])
    """

    projected = True

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        triton: str,
        torch_phi: Callable,
        input_scale: float = 1.0,
        positive: bool = False,
        unbounded: bool = False,
        doc: str = "",
    ):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"feature map name must be a Python identifier, got {name!r}")
        if not isinstance(triton, str) or "def phi_proj(" not in triton or "def phi_proj_vjp(" not in triton:
            raise ValueError(f"feature map {name!r}: triton must define phi_proj and phi_proj_vjp")
        if not callable(torch_phi):
            raise TypeError(f"feature map {name!r}: torch_phi must be callable, got {type(torch_phi).__name__}")
        self.name = name
        self.triton = triton.strip("\n")
        self.torch_phi = torch_phi
        self.input_scale = float(input_scale)
        self.positive = bool(positive)
        self.unbounded = bool(unbounded)
        self.doc = doc
        self._set_parameters(weight, bias)

    def _set_parameters(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or min(weight.shape) < 1:
            raise ValueError(f"feature map {self.name!r}: weight must be a [D, M] tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        D, M = weight.shape
        if hasattr(self, "weight") and tuple(self.weight.shape) != (D, M):
            raise ValueError(f"feature map {self.name!r}: new weight {tuple(weight.shape)} must keep the shape "
                             f"{tuple(self.weight.shape)} (D and M are compiled into its kernels)")
        bias = torch.zeros(M, dtype=torch.float64) if bias is None else bias
        if tuple(bias.shape) != (M,):
            raise ValueError(f"feature map {self.name!r}: bias must have shape [{M}], got {tuple(bias.shape)}")
        self.weight = weight.detach().to("cpu", torch.float64)
        self.bias = bias.detach().to("cpu", torch.float64)
        self._params: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @property
    def head_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def num_features(self) -> int:
        return self.weight.shape[1]

    def kernel_params(self, side: str, device) -> torch.Tensor:
        """``[1, D + 1, M]`` fp32 on ``device``: W, then the bias row (one head: shared by all). Cached per device
        until :meth:`set_weight`; the same for both sides."""
        return self._params_as(device, torch.float32)[None]

    def _params_as(self, device, dtype: torch.dtype) -> torch.Tensor:
        # W and the bias row as one [D + 1, M] tensor, converted once per (device, dtype)
        key = (str(torch.device(device)), dtype)
        p = self._params.get(key)
        if p is None:
            p = torch.cat([self.weight, self.bias[None]]).to(device=device, dtype=dtype).contiguous()
            self._params[key] = p
        return p

    def _projection(self, x: torch.Tensor, side: str = "key"):
        """x' = x * input_scale, W [D, M] and b [M] in x's dtype and device (the same for both sides)."""
        p = self._params_as(x.device, x.dtype)
        return x * self.input_scale, p[:-1], p[-1]

    def set_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "ProjectedFeatureMap":
        """Replace W (and b) in place; the kernels are reused (same D and M)."""
        self._set_parameters(weight, bias)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, D={self.head_dim}, M={self.num_features})"


def head_matmul(xs: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """u = x' W: ``xs`` [..., D] with W [D, M] (one W for every head), or ``xs`` [..., H, D] with W [HW, D, M]
    (HW = 1: shared; HW = H: per head) -> [..., M] / [..., H, M]."""
    if W.dim() == 2:
        return xs @ W
    if W.shape[0] == 1:
        return xs @ W[0]
    return torch.einsum("...hd,hdm->...hm", xs, W)


def projected_magnitude(torch_phi: Callable, xs: torch.Tensor, W: torch.Tensor, b: torch.Tensor, side: str,
                        stabilize: bool) -> torch.Tensor:
    """|phi| widened by the rounding of its arguments, with a gradient free of cancellation.

    Value: |f| + |df/du| (sum_d |x'_d W_dr| + |b_r|) + |df/dn| n, the scale of the error an fp32 rounding
    of u, of the bias added to it and of n leaves in f (cos(u) is 0 where its error is not; a random
    Fourier sin feature is cos(u - pi/2), whose fp32 bias alone is off by 4e-8 where the feature is ~u).
    Gradient: sum over the chain rule's terms in absolute value, s (|df/du_r| |W_dr| + |df/dn_r| |x'_d|) for
    d/dx_d, so that a bound built on it covers dL/dx = s (dL/du W^T + dL/dn x') however its terms cancel.
    W is [D, M] or per head [HW, D, M] (:func:`head_matmul`); when W and b are trained, the gradient w.r.t. them
    is the same absolute sum: |df/du_r| |x'_d| for W_dr, |df/du_r| for b_r.
    """
    u = head_matmul(xs, W).detach().requires_grad_()
    n = (0.5 * (xs * xs).sum(-1, keepdim=True)).expand(u.shape).detach().requires_grad_()
    with torch.enable_grad():
        f = torch_phi(u, n, b.detach(), side, stabilize)
        du, dn = torch.autograd.grad(f.sum(), (u, n), allow_unused=True)
    du = du.abs() if du is not None else torch.zeros_like(u)
    dn = dn.abs() if dn is not None else torch.zeros_like(n)
    xa, Wa, ba = (t * torch.where(t >= 0, 1.0, -1.0).to(t.dtype) for t in (xs, W, b))  # |.| with derivative +-1
    value = f.detach().abs() + du * (head_matmul(xa.detach(), Wa.detach()) + ba.detach()) + dn * n.detach()
    # d surrogate_r / dx_d = s sign(x_d) (|df/du_r| |W_dr| + |df/dn_r| |x'_d|); the value is 0
    surrogate = du * (head_matmul(xa, Wa) + ba) + dn * (xa.detach() * xa).sum(-1, keepdim=True)
    return value + surrogate - surrogate.detach()
