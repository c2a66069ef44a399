"""Feature maps phi for linear attention, and the registry the kernels are generated from.

Built in: ``"elu"`` (elu(x) + 1), ``"relu"`` and ``"identity"``; random features
:func:`favor` (FAVOR+, softmax kernel) and :func:`random_fourier` (Gaussian kernel), by family
name in :data:`RANDOM_FAMILIES`.
A user map is an :class:`ElementwiseFeatureMap` (two Triton expressions plus a PyTorch
reference) or a :class:`ProjectedFeatureMap` (two Triton functions of x W plus a PyTorch
twin), passed to :func:`register` or directly as ``feature_map=``; a :class:`LearnableFeatureMap` is a
projected map whose W and b are ``nn.Parameter``s, per head or shared, trained through the kernels.
"""

from .base import ElementwiseFeatureMap, FeatureMap, available, get, register, resolve
from .builtin import elu, identity, relu
from .learnable import LearnableFeatureMap, Projection
from .projected import ProjectedFeatureMap
from .random import RANDOM_FAMILIES, RandomFeatureMap, favor, random_fourier

__all__ = [
    "FeatureMap",
    "ElementwiseFeatureMap",
    "ProjectedFeatureMap",
    "LearnableFeatureMap",
    "Projection",
    "RandomFeatureMap",
    "register",
    "get",
    "available",
    "resolve",
    "elu",
    "relu",
    "identity",
    "favor",
    "random_fourier",
    "RANDOM_FAMILIES",
]
