"""Feature maps phi for linear attention, and the registry the kernels are generated from.

Built in: ``"elu"`` (elu(x) + 1), ``"relu"`` and ``"identity"``. A user map is an
:class:`ElementwiseFeatureMap` (two Triton expressions plus a PyTorch reference)
passed to :func:`register`, or passed directly as ``feature_map=``.
"""

from .base import ElementwiseFeatureMap, FeatureMap, available, get, register, resolve
from .builtin import elu, identity, relu

__all__ = [
    "FeatureMap",
    "ElementwiseFeatureMap",
    "register",
    "get",
    "available",
    "resolve",
    "elu",
    "relu",
    "identity",
]
