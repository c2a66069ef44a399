"""The feature maps of the paper and its usual baselines: elu(x) + 1, ReLU, identity."""

from __future__ import annotations

import torch

from .base import ElementwiseFeatureMap, register

__all__ = ["elu", "relu", "identity"]


def _elu1(x: torch.Tensor) -> torch.Tensor:
    # exp(x) for x <= 0, as the kernels and the native C compute it: F.elu(x) + 1 is expm1(x) + 1, which rounds to 0
    # in fp32 below x = -17.3 (and loses relative accuracy well before), so a forward's output depended on whether
    # autograd ran it (torch's map) or not (the native map). exp(min(x, 0)) + max(x, 0): x + 1 above 0 (exp(0) = 1
    # exactly), exp(x) below, gradient 1 at 0 as elu's; four torch calls, one fewer than torch.where's form (a
    # B = 1 decode step on the torch path is dispatch-bound: 2-3 us a call)
    return torch.exp(torch.clamp(x, max=0.0)) + torch.relu(x)


# elu(x) + 1 = x + 1 for x > 0, exp(x) otherwise; exp(min(x, 0)) keeps the untaken branch finite.
ELU = register(
    ElementwiseFeatureMap(
        name="elu",
        phi="tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))",
        vjp="tl.where(x > 0, g, g * tl.exp(tl.minimum(x, 0.0)))",
        reference=_elu1,
        doc="elu(x) + 1, the map of Katharopoulos et al. (2020); always positive",
        positive=True,
    )
)

RELU = register(
    ElementwiseFeatureMap(
        name="relu",
        phi="tl.maximum(x, 0.0)",
        vjp="tl.where(x > 0, g, 0.0)",
        reference=torch.relu,
        doc="max(x, 0); non-negative, so a query orthogonal to every key gives a zero normalizer (eps guards it)",
        positive=False,
    )
)

IDENTITY = register(
    ElementwiseFeatureMap(
        name="identity",
        phi="x",
        vjp="g",
        reference=lambda x: x,
        doc="phi(x) = x: plain (un-kernelized) linear attention; signed, so normalize=True can divide by ~0",
        positive=False,
    )
)


def elu() -> ElementwiseFeatureMap:
    """elu(x) + 1 (the paper's map)."""
    return ELU


def relu() -> ElementwiseFeatureMap:
    """max(x, 0)."""
    return RELU


def identity() -> ElementwiseFeatureMap:
    """phi(x) = x."""
    return IDENTITY
