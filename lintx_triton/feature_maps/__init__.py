"""Feature maps phi for linear attention, and the registry the kernels are generated from.

Built in: ``"elu"`` (elu(x) + 1), ``"relu"`` and ``"identity"``; random features
:func:`favor` (FAVOR+, softmax kernel) and :func:`random_fourier` (Gaussian kernel), by family
name in :data:`RANDOM_FAMILIES`; learnable maps :func:`hedgehog` (LoLCATs' and FLA's) and :func:`t2r`, by
family name in :data:`LEARNABLE_FAMILIES`.
A user map is an :class:`ElementwiseFeatureMap` (two Triton expressions plus a PyTorch
reference) or a :class:`ProjectedFeatureMap` (two Triton functions of x W plus a PyTorch
twin), passed to :func:`register` or directly as ``feature_map=``; a :class:`LearnableFeatureMap` is a
projected map whose W and b are ``nn.Parameter``s, per head or shared, trained through the kernels.
"""

from .base import ElementwiseFeatureMap, FeatureMap, available, get, register, resolve
from .builtin import elu, identity, relu
from .hedgehog import HedgehogFeatureMap, T2RFeatureMap, hedgehog, t2r
from .learnable import LearnableFeatureMap, Projection
from .polynomial import PolynomialFeatureMap, ReBasedFeatureMap, rebased, taylor
from .projected import ProjectedFeatureMap
from .random import RANDOM_FAMILIES, RandomFeatureMap, favor, random_fourier

__all__ = [
    "FeatureMap",
    "ElementwiseFeatureMap",
    "ProjectedFeatureMap",
    "LearnableFeatureMap",
    "Projection",
    "PolynomialFeatureMap",
    "ReBasedFeatureMap",
    "taylor",
    "rebased",
    "BLOCKED_FAMILIES",
    "POLYNOMIAL_FAMILIES",
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
    "HedgehogFeatureMap",
    "T2RFeatureMap",
    "hedgehog",
    "t2r",
    "LEARNABLE_FAMILIES",
    "MAP_FAMILIES",
    "family_map",
]

# The learnable families by name, each built as ``LEARNABLE_FAMILIES[name](D, M, heads, key_heads)`` (registered;
# ``key_heads=None``: tied): what ``lintx emit --map hedgehog:M``, ``lintx fuzz`` and lintx_triton.testing's cases
# draw. Each has a bias, so that its gradient is exercised.
LEARNABLE_FAMILIES = {
    "hedgehog": lambda D, M, heads, key_heads: hedgehog(D, M, heads=heads, tied=key_heads is None,
                                                        key_heads=key_heads, bias=True),
    "hedgehog_fla": lambda D, M, heads, key_heads: hedgehog(D, M, heads=heads, variant="fla",
                                                            tied=key_heads is None, key_heads=key_heads),
    "t2r": lambda D, M, heads, key_heads: t2r(D, M, heads=heads, tied=key_heads is None, key_heads=key_heads),
    # ReBased: M follows from D (D^2), the M asked for is not read
    "rebased": lambda D, M, heads, key_heads: rebased(D, heads=heads, tied=key_heads is None, key_heads=key_heads),
}

# The polynomial families by name, each built as ``POLYNOMIAL_FAMILIES[name](D)`` (registered; M follows from D)
POLYNOMIAL_FAMILIES = {
    "taylor": lambda D: taylor(D),
    "taylor_c": lambda D: taylor(D, compressed=True),
}

#: the families whose maps are blocked (polynomial features: M grows as D^2)
BLOCKED_FAMILIES = tuple(POLYNOMIAL_FAMILIES) + ("rebased",)

#: every family a command line or a test draws by name (random features, learnable maps, polynomial maps)
MAP_FAMILIES = tuple(RANDOM_FAMILIES) + tuple(LEARNABLE_FAMILIES) + tuple(POLYNOMIAL_FAMILIES)


def family_map(family: str, D: int, M: int, seed: int = 0) -> FeatureMap:
    """A registered map of ``family`` (one of :data:`MAP_FAMILIES`) for head width D and M features: a random
    family's draw ``seed``; a learnable family with one W shared by the heads, tied, at its own init (its
    kernels are those of any heads or tying: those change runtime strides); a polynomial family's map for D
    (its M follows from D: ``M`` is not read)."""
    if family in RANDOM_FAMILIES:
        return RANDOM_FAMILIES[family](D, M, seed)
    if family in LEARNABLE_FAMILIES:
        return LEARNABLE_FAMILIES[family](D, M, 1, None)
    if family in POLYNOMIAL_FAMILIES:
        return POLYNOMIAL_FAMILIES[family](D)
    raise ValueError(f"unknown map family {family!r}; families: {MAP_FAMILIES}")
