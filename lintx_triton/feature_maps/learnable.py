"""Learnable projected feature maps: phi(x) = f(x' W_h + b_h, |x'|^2 / 2) with W, b trained, per head.

A :class:`LearnableFeatureMap` is a projected map (the same two Triton functions ``phi_proj`` and
``phi_proj_vjp``, see :mod:`lintx_triton.feature_maps.projected`) whose W ``[HW, D, M]`` and bias ``[HW, M]``
are built from ``torch.nn.Parameter``s of the map, an ``nn.Module``: an optimizer, ``state_dict``, ``.to()``
and FSDP see them. HW is 1 (one W shared by every head) or the number of heads the map is applied to (H for
queries, HKV for keys). Query and key maps are one (``tied=True``, the default) or two parameter sets of the
same form (``tied=False``).

The kernels read W per head and return dL/dW and dL/db from the backward: dW_h = sum over tokens of
x'^T dL/du, db_h = sum of dL/du, reduced on chip per chunk and added over chunks with fp32 atomics (see
:mod:`lintx_triton.ops.launch`). phi(q), phi(k) are never stored, in the forward or the backward.

The contract a learnable map adds to the projected one: ``phi_proj(u, n, b, ...)`` depends on u and b only
through u + b (the bias shifts the projection), so that dL/db is the sum of dL/du. A subclass builds its
parameters in :meth:`LearnableFeatureMap.make_params` and maps them to the kernels' W and b in
:meth:`LearnableFeatureMap.project` (Hedgehog's [W, -W], for example), by differentiable PyTorch operations.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
from torch import nn

from .base import FeatureMap
from .projected import SIDES, ProjectedMap

__all__ = ["LearnableFeatureMap", "Projection", "HeadParams"]


class Projection(nn.Module):
    """W ``[heads, D, M]`` and b ``[heads, M]``: one side's parameters (nn.Linear's uniform init by default)."""

    def __init__(self, heads: int, D: int, M: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(D)
        self.weight = nn.Parameter(torch.empty(heads, D, M).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(heads, M)) if bias else None

    def forward(self):
        b = self.bias if self.bias is not None else self.weight.new_zeros(self.weight.shape[0], self.weight.shape[2])
        return self.weight, b


def _positive_int(what: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{what} must be a positive int, got {val!r}")
    return val


class HeadParams:
    """What a learnable map of any family shares: a parameter set ``query`` (and ``key`` when untied, else None),
    each for 1 head (shared) or as many as the heads it serves; a subclass says how many (:meth:`heads_of`)."""

    query: nn.Module
    key: Optional[nn.Module]

    @property
    def tied(self) -> bool:
        return self.key is None

    def side_params(self, side: str) -> nn.Module:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return self.query if side == "query" or self.key is None else self.key

    def heads_of(self, side: str) -> int:
        """HW of ``side``'s parameters (1: shared by every head)."""
        raise NotImplementedError

    def untied_with(self, key_map):
        """This map for queries and ``key_map``'s query parameters for keys: one map of two parameter sets
        (``key_map`` must be the same kind of map: same name, hence the same kernels)."""
        if not isinstance(key_map, HeadParams) or key_map.source_hash() != self.source_hash():
            raise ValueError(f"the key map must be a learnable map of the same kind as {self.name!r} (same D, M and "
                             f"formula), got {key_map!r}")
        pair = copy.copy(self)
        pair._modules = dict(self._modules)
        pair.key = key_map.query
        return pair

    def check_heads(self, heads: int, kv_heads: int) -> None:
        for side, n in (("query", heads), ("key", kv_heads)):
            if n is None:
                continue
            HW = self.heads_of(side)
            if HW not in (1, n):
                hint = (" (a tied map serves queries and keys: with grouped heads build it untied, tied=False, "
                        "key_heads=HKV)" if self.tied and heads not in (None, kv_heads) else "")
                raise ValueError(f"feature map {self.name!r} has {HW} {side} heads: it must have 1 (shared) or the "
                                 f"{n} {side} heads of the call{hint}")

    def _to_kernels(self, p: torch.Tensor, device) -> torch.Tensor:
        """One side's kernel parameters (built from the nn.Parameters, differentiably) as the kernels read them:
        fp32, contiguous, on ``device`` (a clear error when the map's parameters are elsewhere)."""
        if p.device != torch.device(device) and torch.device(device).type != "meta":
            raise ValueError(f"feature map {self.name!r} has its parameters on {p.device}, the inputs are on "
                             f"{torch.device(device)}: move the map with .to()")
        p = p.to(torch.float32)
        return p.to(device) if torch.device(device).type == "meta" else p.contiguous()


class LearnableFeatureMap(HeadParams, ProjectedMap, nn.Module, FeatureMap):
    """A projected feature map with trained, optionally per-head, W and b.

    Args:
        name: registry name, a valid Python identifier; maps sharing a name share kernels (D, M,
            ``input_scale`` and the Triton source must agree; the parameters are runtime arguments).
        head_dim: D. num_features: M, the width of phi(x) (the kernels' projection width).
        triton: Triton source defining ``phi_proj`` and ``phi_proj_vjp`` (as for
            :class:`~lintx_triton.feature_maps.ProjectedFeatureMap`; phi must depend on u and b through u + b).
        torch_phi: ``f(u, n, b, side, stabilize)`` in PyTorch, the same map (u [..., H, M], b [HW, M]).
        heads: HW of the query map (of both when tied): 1 (shared) or H. Default: ``1``.
        tied: one parameter set for queries and keys (default), or two.
        key_heads: HW of the key map when untied (1 or HKV). Default: ``heads``.
        input_scale: x' = x * input_scale. Default: ``1.0``.
        bias: whether the default :class:`Projection` has a bias. Default: ``True``.
        positive, unbounded, doc: as for :class:`~lintx_triton.feature_maps.ProjectedFeatureMap`.

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
        >>> fm = lx.feature_maps.LearnableFeatureMap(
        ...     "my_relu_d16_m32", 16, 32, src, lambda u, n, b, side, stabilize: torch.relu(u + b), heads=2)
        >>> q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 4)
        >>> lx.linear_attention(q, k, v, feature_map=fm).sum().backward()
        >>> fm.query.weight.grad.shape
        torch.Size([2, 16, 32])
    """

    projected = True
    learnable = True

    def __init__(
        self,
        name: str,
        head_dim: int,
        num_features: int,
        triton: str,
        torch_phi: Callable,
        *,
        heads: int = 1,
        tied: bool = True,
        key_heads: Optional[int] = None,
        input_scale: float = 1.0,
        bias: bool = True,
        positive: bool = False,
        unbounded: bool = False,
        doc: str = "",
    ):
        nn.Module.__init__(self)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"feature map name must be a Python identifier, got {name!r}")
        if not isinstance(triton, str) or "def phi_proj(" not in triton or "def phi_proj_vjp(" not in triton:
            raise ValueError(f"feature map {name!r}: triton must define phi_proj and phi_proj_vjp")
        if not callable(torch_phi):
            raise TypeError(f"feature map {name!r}: torch_phi must be callable, got {type(torch_phi).__name__}")
        self.name = name
        self._D = _positive_int("head_dim", head_dim)
        self._M = _positive_int("num_features", num_features)
        self.triton = triton.strip("\n")
        self.torch_phi = torch_phi
        self.input_scale = float(input_scale)
        self.positive = bool(positive)
        self.unbounded = bool(unbounded)
        self.doc = doc
        self._bias = bool(bias)
        self.query = self.make_params(_positive_int("heads", heads))
        self.key = None if tied else self.make_params(_positive_int("key_heads", heads if key_heads is None
                                                                    else key_heads))

    # ---- what a subclass may change

    def make_params(self, heads: int) -> nn.Module:
        """One side's parameters for ``heads`` heads (default: a :class:`Projection` W [heads, D, M], b [heads, M])."""
        return Projection(heads, self._D, self._M, self._bias)

    def project(self, params: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """One side's parameters -> the kernels' W ``[HW, D, M]`` and b ``[HW, M]`` (differentiably)."""
        return params()

    # ---- the map

    @property
    def head_dim(self) -> int:
        return self._D

    @property
    def num_features(self) -> int:
        return self._M

    def heads_of(self, side: str) -> int:
        """HW of ``side``'s W (1: shared by every head)."""
        return self.projection(side)[0].shape[0]

    def projection(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """W ``[HW, D, M]`` and b ``[HW, M]`` of ``side``, checked."""
        W, b = self.project(self.side_params(side))
        HW = W.shape[0]
        if W.dim() != 3 or tuple(W.shape[1:]) != (self._D, self._M) or tuple(b.shape) != (HW, self._M):
            raise ValueError(f"feature map {self.name!r}: project() must give W [HW, {self._D}, {self._M}] and b "
                             f"[HW, {self._M}], got {tuple(W.shape)} and {tuple(b.shape)}")
        return W, b

    def kernel_params(self, side: str, device) -> torch.Tensor:
        """``[HW, D + 1, M]`` fp32: W then the bias row, built from the parameters (differentiably)."""
        W, b = self.projection(side)
        return self._to_kernels(torch.cat([W, b[:, None, :]], 1), device)

    def _projection(self, x: torch.Tensor, side: str):
        W, b = self.projection(side)
        return x * self.input_scale, W.to(x.dtype), b.to(x.dtype)

    def forward(self, x: torch.Tensor, side: str = "key") -> torch.Tensor:
        return self.features(x, side)

    def extra_repr(self) -> str:
        heads = self.heads_of("query") if self.tied else f"{self.heads_of('query')}/{self.heads_of('key')}"
        return f"{self.name!r}, D={self._D}, M={self._M}, heads={heads}, tied={self.tied}"

    __repr__ = nn.Module.__repr__
