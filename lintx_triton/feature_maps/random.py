"""Random feature maps: FAVOR+ (positive random features for softmax) and random Fourier features.

FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", 2021):
phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(M), x' = x D^-1/4, so that
E[phi(q)^T phi(k)] = exp(q^T k / sqrt(D)), softmax attention's kernel. The rows w are
drawn in blocks of D orthogonal Gaussian directions, each rescaled by an independent
chi(D) norm (lower variance than i.i.d. rows). ``hyperbolic=True`` uses
[exp(w^T x'), exp(-w^T x')] exp(-|x'|^2 / 2) / sqrt(M) (M / 2 directions).

Stabilization (exponentials overflow fp32 past e^88):

* Keys: w^T x' - |x'|^2 / 2 <= |w|^2 / 2 for every x, so a constant c = max(0, max_r |w_r|^2 / 2
  - ``headroom``) computed from W bounds every key feature by e^headroom / sqrt(M). Keys are
  multiplied by e^-c and queries by e^+c: every product phi(q)^T phi(k), normalized or not, is
  unchanged; only the state (S, z) is held in units of e^-c (consistent across prefill, steps and
  :meth:`RandomFeatureMap.redraw`, since c is part of the map). c is 0 unless |w_r|^2 > 2 headroom
  (D around 100 and up with the default headroom 60).
* Queries, when normalizing: each query's features are divided by their largest one (a per-query
  shift of the exponent), so the largest query feature is 1 / sqrt(M). The shift cancels in
  num / den exactly up to ``eps``: the map's definition under ``normalize=True`` includes it, and
  the reference applies it too. A key shift that depended on the data would have to be shared by
  every key a query meets, across calls and decode steps; the constant c is.
* Not covered: keys of large norm, whose features underflow (exp(-|k'|^2 / 2) < e^-87 for
  |k'|^2 > 174): they drop out of the sums. Keep q and k normalized (LayerNorm), as Performers do.

Random Fourier features (Rahimi and Recht, 2007): phi(x) = sqrt(2 / M) [cos w^T x', sin w^T x'],
with E[phi(q)^T phi(k)] = exp(-|q' - k'|^2 / 2), a Gaussian kernel. They are signed: the
normalizer phi(q)^T z can be near 0 or negative, so ``normalize=True`` can divide by ~0 (``eps`` does
not help a negative sum); use them with ``normalize=False`` or a downstream normalization.
"""

from __future__ import annotations

import math

import torch

from .base import register
from .projected import ProjectedFeatureMap

__all__ = ["RandomFeatureMap", "favor", "random_fourier", "gaussian_rows"]

F64 = torch.float64

_FAVOR = """
@triton.jit
def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
    # exp(w.x' - |x'|^2 / 2 -+ c) / sqrt(M); b holds c: keys shifted down, queries up (products unchanged)
    if IS_Q:
        e = u - n + b
        if STAB:
            # per-query shift, cancels in num / den: the largest feature of each query is 1 / sqrt(M)
            e = e - tl.max(tl.where(m_f, e, float("-inf")), 1)[:, None]
    else:
        e = u - n - b
    return tl.exp(e) * $RSQRT_M


@triton.jit
def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
    # d exp(e) = exp(e) de, de/du = 1, de/dn = -1 (the shifts are constants: they cancel)
    gf = g * f
    return gf, -tl.sum(gf, 1)[:, None]
"""

_FOURIER = """
@triton.jit
def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
    # sqrt(2 / M) cos(w.x' + b): b = 0 on the first M/2 features, -pi/2 (sin) on the others
    return tl.cos(u + b) * $SQRT_2_M


@triton.jit
def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
    return -g * tl.sin(u + b) * $SQRT_2_M, tl.zeros_like(n)
"""


def _favor_torch(M):
    def phi(u, n, b, side, stabilize):
        e = u - n + (b if side == "query" else -b)
        if side == "query" and stabilize:
            e = e - e.amax(-1, keepdim=True).detach()
        return torch.exp(e) / math.sqrt(M)

    return phi


def _fourier_torch(M):
    def phi(u, n, b, side, stabilize):
        return torch.cos(u + b) * math.sqrt(2.0 / M)

    return phi


def gaussian_rows(D: int, R: int, orthogonal: bool, generator: torch.Generator) -> torch.Tensor:
    """R Gaussian directions in float64 ``[R, D]``: i.i.d. N(0, I), or blocks of D orthogonal rows
    rescaled by independent chi(D) norms (each row is then still marginally N(0, I))."""
    if not orthogonal:
        return torch.randn(R, D, generator=generator, dtype=F64)
    blocks = []
    for _ in range(-(-R // D)):
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=F64))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:R]
    norms = torch.randn(R, D, generator=generator, dtype=F64).norm(dim=1)
    return rows * norms[:, None]


class RandomFeatureMap(ProjectedFeatureMap):
    """A FAVOR+ or random Fourier map; :meth:`redraw` resamples its directions."""

    def __init__(self, kind: str, D: int, M: int, orthogonal: bool, seed: int, hyperbolic: bool = False,
                 headroom: float = 60.0):
        if kind not in ("favor", "fourier"):
            raise ValueError(f"kind must be 'favor' or 'fourier', got {kind!r}")
        for what, val in (("D", D), ("num_features", M)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{what} must be a positive int, got {val!r}")
        paired = kind == "fourier" or hyperbolic
        if paired and M % 2:
            raise ValueError(f"num_features must be even for {'hyperbolic FAVOR+' if hyperbolic else kind} "
                             f"(pairs of features per direction), got {M}")
        self.kind, self.orthogonal, self.hyperbolic, self.headroom = kind, bool(orthogonal), bool(hyperbolic), headroom
        if kind == "favor":
            name = f"favor{'_hyp' if hyperbolic else ''}_d{D}_m{M}"
            src = _FAVOR.replace("$RSQRT_M", repr(1.0 / math.sqrt(M)))
            torch_phi, doc = _favor_torch(M), "FAVOR+ positive random features (softmax kernel)"
        else:
            name = f"fourier_d{D}_m{M}"
            src = _FOURIER.replace("$SQRT_2_M", repr(math.sqrt(2.0 / M)))
            torch_phi, doc = _fourier_torch(M), "random Fourier features (Gaussian kernel), signed"
        W, b = self._draw(D, M, seed)
        super().__init__(name, W, b, src, torch_phi, input_scale=D ** -0.25, positive=kind == "favor",
                         unbounded=kind == "favor", doc=doc)
        self.seed = seed

    def _draw(self, D, M, seed):
        g = torch.Generator().manual_seed(int(seed))
        paired = self.kind == "fourier" or self.hyperbolic
        R = M // 2 if paired else M
        w = gaussian_rows(D, R, self.orthogonal, g)  # [R, D]
        if self.kind == "fourier":
            W = torch.cat([w, w]).T
            b = torch.cat([torch.zeros(R, dtype=F64), torch.full((R,), -math.pi / 2, dtype=F64)])
        else:
            W = (torch.cat([w, -w]) if self.hyperbolic else w).T
            c = max(0.0, float((w * w).sum(1).max()) / 2 - self.headroom)
            b = torch.full((M,), c, dtype=F64)
        return W.contiguous(), b

    @property
    def key_shift(self) -> float:
        """c: keys' features carry e^-c, queries' e^+c (FAVOR+; 0 for Fourier features)."""
        return float(self.bias[0]) if self.kind == "favor" else 0.0

    def redraw(self, seed: int) -> "RandomFeatureMap":
        """Resample the directions from ``seed`` (same D and M: no recompilation). Returns self."""
        self.set_weight(*self._draw(self.head_dim, self.num_features, seed))
        self.seed = seed
        return self


def favor(D: int, num_features: int = None, orthogonal: bool = True, seed: int = 0, hyperbolic: bool = False,
          headroom: float = 60.0) -> RandomFeatureMap:
    """FAVOR+ positive random features approximating softmax attention with scale 1/sqrt(D).

    Args:
        D (int): head width of q and k.
        num_features (int): M, default ``2 * D``; up to 256 for the Triton kernels, any M >= 1
            (even when ``hyperbolic``).
        orthogonal (bool): orthogonal blocks of directions (default) or i.i.d. Gaussian ones.
        seed (int): the draw; :meth:`RandomFeatureMap.redraw` draws again.
        hyperbolic (bool): [exp(+w x'), exp(-w x')] pairs (M / 2 directions). Default ``False``.
        headroom (float): no key feature exceeds exp(headroom) / sqrt(M) (see the module doc).

    Use with ``scale=1.0``: phi already carries D^-1/4 per side.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> fm = lx.feature_maps.favor(32, num_features=64, seed=0)
        >>> q, k, v = torch.randn(1, 50, 2, 32), torch.randn(1, 50, 2, 32), torch.randn(1, 50, 2, 32)
        >>> lx.linear_attention(q, k, v, feature_map=fm).shape   # ~ softmax(q k^T / sqrt(32)) v, causal
        torch.Size([1, 50, 2, 32])
    """
    return register(RandomFeatureMap("favor", D, 2 * D if num_features is None else num_features, orthogonal,
                                     seed, hyperbolic, headroom))


def random_fourier(D: int, num_features: int = None, orthogonal: bool = True, seed: int = 0) -> RandomFeatureMap:
    """Random Fourier features sqrt(2/M) [cos w^T x', sin w^T x'], x' = x D^-1/4: a Gaussian kernel.

    Args:
        D (int): head width. num_features (int): M (even), default ``2 * D``.
        orthogonal (bool), seed (int): as in :func:`favor`.

    Signed features: with ``normalize=True`` the normalizer can vanish or go negative; prefer
    ``normalize=False``.
    """
    return register(RandomFeatureMap("fourier", D, 2 * D if num_features is None else num_features, orthogonal,
                                     seed))


# The random-feature families by name, each built as ``RANDOM_FAMILIES[name](D, M, seed)`` (registered):
# what ``lintx emit --map favor:M``, ``lintx fuzz`` and lintx_triton.testing's cases draw.
RANDOM_FAMILIES = {
    "favor": lambda D, M, seed: favor(D, num_features=M, seed=seed),
    "favor_hyp": lambda D, M, seed: favor(D, num_features=M, seed=seed, hyperbolic=True),
    "fourier": lambda D, M, seed: random_fourier(D, num_features=M, seed=seed),
}
