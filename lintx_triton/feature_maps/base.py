"""The one definition of a feature map, used three ways.

A feature map phi is written once and feeds:

* the float64 PyTorch reference (:meth:`FeatureMap.reference`),
* the fake (meta) implementations, through :meth:`FeatureMap.feature_dim`,
* the generated Triton kernels, through :attr:`ElementwiseFeatureMap.phi` and
  :attr:`ElementwiseFeatureMap.vjp`, two Triton expressions the code generator
  splices into the kernel sources (``x`` is an fp32 block, ``g`` the gradient
  flowing into phi(x), same shape).

Adding a map never means writing a kernel: register it and every kernel
(forward, backward, both paths) is generated for it.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

__all__ = ["FeatureMap", "ElementwiseFeatureMap", "register", "get", "available", "resolve"]


class FeatureMap:
    """Base class of all feature maps.

    Subclasses define ``name``, :meth:`feature_dim`, :meth:`reference` and the
    Triton source the generator needs (:meth:`triton_source`). Two families exist:
    elementwise maps (:class:`ElementwiseFeatureMap`, M = D) and projected maps
    (:class:`~lintx_triton.feature_maps.ProjectedFeatureMap`: phi of x W, with W a
    parameter tensor passed to the kernels), told apart by :attr:`projected`.
    """

    name: str
    #: phi reads a parameter tensor (:meth:`kernel_params`) and is generated from ``phi_proj``.
    projected: bool = False
    #: phi(x) can leave fp16's range (exponential random features): fp16 products take TF32 operands.
    unbounded: bool = False
    #: the map's parameters are trained (:class:`~lintx_triton.feature_maps.LearnableFeatureMap`)
    learnable: bool = False
    #: the kernels walk phi in blocks of features, so M may exceed one tile
    #: (:class:`~lintx_triton.feature_maps.PolynomialFeatureMap`: products of the input's entries)
    blocked: bool = False

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` if the map is not defined for head vectors of width ``head_dim``."""

    def features(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """phi in PyTorch as the kernels define it for queries (``side="query"``) or keys.

        ``stabilize``: the per-query shift the kernels apply when normalizing (maps whose
        features are exponentials divide each query's features by their largest; it cancels
        in num / den). Elementwise maps ignore both arguments.
        """
        return self.reference(x)

    def magnitude(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """A differentiable bound on |phi(x)| for rounding-error bounds (the reference's ``absolute=True``).

        Default |phi(x)|, with derivative +-1 also where phi(x) = 0. Maps whose features cross zero
        as a smooth function of x (cos, sin) return an envelope that also covers the rounding of
        their argument, and whose gradient bounds |dphi/dx|.
        """
        f = self.features(x, side, stabilize)
        return f * torch.where(f >= 0, 1.0, -1.0).to(f.dtype)

    def kernel_params(self, side: str, device) -> "torch.Tensor | None":
        """The parameter tensor the kernels read for queries (``side="query"``) or keys: ``[HW, D + 1, M]`` fp32
        (W then the bias row, per head or HW = 1 shared), ``None`` for elementwise maps."""
        return None

    def params_per_head(self, head_dim: int) -> int:
        """The elements of one head's parameters in :meth:`kernel_params` (the kernels' head stride of their
        gradient): (D + 1) M for a projected map's W and bias row."""
        return (head_dim + 1) * self.feature_dim(head_dim)

    def check_heads(self, heads: "int | None", kv_heads: int) -> None:
        """Raise ``ValueError`` if the map cannot serve ``heads`` query (None: no queries) and ``kv_heads`` key
        heads."""

    def feature_dim(self, head_dim: int) -> int:
        """M, the width of phi(x) for head vectors of width ``head_dim``."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """phi applied to the last dimension of ``x`` in PyTorch (any dtype, differentiable)."""
        raise NotImplementedError

    def triton_source(self) -> str:
        """Triton source of ``phi(x)`` and ``phi_vjp(x, g)`` as ``@triton.jit`` functions."""
        raise NotImplementedError

    def source_hash(self) -> str:
        """Stable hash of everything the generated kernels depend on."""
        return hashlib.sha256(f"{type(self).__name__}:{self.name}:{self.triton_source()}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ElementwiseFeatureMap(FeatureMap):
    """A feature map applied elementwise, so M = D.

    Args:
        name: registry name, a valid Python identifier.
        phi: a Triton expression in ``x`` (an fp32 block) giving phi(x).
        vjp: a Triton expression in ``x`` and ``g`` giving g * phi'(x).
        reference: the same map in PyTorch, used for the float64 reference and
            the ``torch`` backend.
        doc: one line saying what the map is.
        positive: whether phi(x) > 0 for every x (then the normalizer never
            vanishes; see the README on ``normalize=True`` with signed maps).

    Examples::

        >>> import lintx_triton as lx
        >>> softplus = lx.feature_maps.ElementwiseFeatureMap(
        ...     name="softplus",
        ...     phi="tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))",
        ...     vjp="g * tl.sigmoid(x)",
        ...     reference=torch.nn.functional.softplus,
        ...     positive=True,
        ... )
        >>> lx.feature_maps.register(softplus)  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        phi: str,
        vjp: str,
        reference: Callable[[torch.Tensor], torch.Tensor],
        doc: str = "",
        positive: bool = False,
    ):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"feature map name must be a Python identifier, got {name!r}")
        for what, src in (("phi", phi), ("vjp", vjp)):
            if not isinstance(src, str) or not src.strip() or "\n" in src.strip():
                raise ValueError(f"feature map {name!r}: {what} must be a one-line Triton expression, got {src!r}")
        if not callable(reference):
            raise TypeError(f"feature map {name!r}: reference must be callable, got {type(reference).__name__}")
        self.name = name
        self.phi = phi.strip()
        self.vjp = vjp.strip()
        self.reference_fn = reference
        self.doc = doc
        self.positive = bool(positive)

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_fn(x)

    def triton_source(self) -> str:
        doc = f"    # {self.doc}\n" if self.doc else ""
        return (
            "@triton.jit\n"
            "def phi(x):\n"
            f"    # feature map {self.name!r}, applied elementwise to an fp32 block\n"
            f"{doc}"
            f"    return {self.phi}\n"
            "\n\n"
            "@triton.jit\n"
            "def phi_vjp(x, g):\n"
            "    # g * dphi/dx, elementwise\n"
            f"    return {self.vjp}\n"
        )


_REGISTRY: dict[str, FeatureMap] = {}


def register(fm: FeatureMap, *, overwrite: bool = False) -> FeatureMap:
    """Make ``fm`` usable by name in :func:`lintx_triton.linear_attention`.

    Registering a different map under a taken name raises unless ``overwrite``.
    """
    if not isinstance(fm, FeatureMap):
        raise TypeError(f"register() takes a FeatureMap, got {type(fm).__name__}")
    old = _REGISTRY.get(fm.name)
    if old is not None and old is not fm and not overwrite and old.source_hash() != fm.source_hash():
        raise ValueError(
            f"a different feature map is already registered as {fm.name!r}; "
            f"pick another name or pass overwrite=True"
        )
    _REGISTRY[fm.name] = fm
    return fm


def get(name: str) -> FeatureMap:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown feature_map {name!r}; registered maps: {sorted(_REGISTRY)}") from None


def available() -> list[str]:
    return sorted(_REGISTRY)


def resolve(feature_map) -> FeatureMap:
    """A name or a FeatureMap object -> the registered FeatureMap (registering objects on first use)."""
    if isinstance(feature_map, str):
        return get(feature_map)
    if isinstance(feature_map, FeatureMap):
        return register(feature_map)
    raise TypeError(
        f"feature_map must be a name ({available()}) or a lintx_triton.feature_maps.FeatureMap, "
        f"got {type(feature_map).__name__}"
    )
