"""What a generated kernel module is specialized on.

A :class:`KernelSpec` is everything that is baked into the generated Triton
source as a compile-time constant. Block sizes, warps and the choice between the
fused and the chunk-parallel path are *not* in the spec: they are launch-time
choices (:mod:`lintx_triton.config`), so one generated module serves every
config an autotuner may try.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from . import feature_maps

__all__ = ["KernelSpec", "GENERATOR_VERSION", "DType", "DTYPES", "dtype_of", "FAMILIES", "MAX_TRITON_DIM",
           "FEATURE_BLOCK", "MAX_BLOCKED_D", "MAX_BLOCKED_M", "triton_limits",
           "products_in_fp32"]

# Bump when the kernel files or the renderer change their meaning (the tuned files record it); the cache
# key also hashes the kernel files themselves (codegen.render.module_key).
GENERATOR_VERSION = 8

# The widest D, DV and M the generated kernels take: they keep a [BT, M] and an [M, BV] tile on chip, and
# beyond this would spill (every entry point checks it before a launch).
MAX_TRITON_DIM = 256

# Blocked maps (polynomial features) walk phi in blocks of at most this many features, however large M is
# (Based's Taylor map at D = 16 has M = 273: nine blocks), and take D up to MAX_BLOCKED_D and M up to
# MAX_BLOCKED_M. sm_90 bf16 cubins at D = 16, DV = 64 under the default configs (bench/NOTES.md): blocks of 64
# spilled in the forward output (56-488 B of stack) and the (dk, dv) kernel (64 B); of 32, every kernel of the
# Taylor map (full and compressed) and ReBased is spill-free.
FEATURE_BLOCK = 32
MAX_BLOCKED_D = 32
MAX_BLOCKED_M = 1024



def triton_limits(fm: "feature_maps.FeatureMap", D: int, DV: int) -> "str | None":
    """Why the Triton kernels cannot take ``fm`` at head width D and value width DV (a sentence), or None. The
    one place these limits are decided (the API, the command line)."""
    M = fm.feature_dim(D)
    if fm.blocked:
        if D > MAX_BLOCKED_D or DV > MAX_TRITON_DIM or M > MAX_BLOCKED_M:
            return (f"the Triton kernels take a blocked map ({fm.name!r}) with D up to {MAX_BLOCKED_D}, DV up to "
                    f"{MAX_TRITON_DIM} and M up to {MAX_BLOCKED_M}, got D = {D}, DV = {DV}, M = {M}")
        return None
    if max(D, DV, M) > MAX_TRITON_DIM:
        return f"the Triton kernels take D, DV and M up to {MAX_TRITON_DIM}, got D = {D}, DV = {DV}, M = {M}"
    return None


# The kernel families: what is tuned (one config file each), fuzzed and timed as a unit. The Triton
# functions that make them up are lintx_triton.codegen.KERNELS.
FAMILIES = ("forward", "backward", "decode")


@dataclass(frozen=True)
class DType:
    """One input dtype the kernels take, by every name the layers use for it."""

    name: str  # KernelSpec.dtype, the tuned files and the test cases: "bfloat16"
    short: str  # the command lines, and Triton's signatures ("*bf16"): "bf16"
    torch: torch.dtype


# The one dtype table; every other layer looks names up here.
DTYPES = {d.name: d for d in (DType("float32", "fp32", torch.float32), DType("float16", "fp16", torch.float16),
                              DType("bfloat16", "bf16", torch.bfloat16))}
_ALIASES = {key: d for d in DTYPES.values() for key in (d.name, d.short, d.torch)}


def dtype_of(x) -> DType:
    """The :class:`DType` of a torch dtype, a name (``"bfloat16"``) or a short name (``"bf16"``).

    Raises TypeError naming the three dtypes the kernels take."""
    d = _ALIASES.get(x) if isinstance(x, (str, torch.dtype)) else None
    if d is None:
        raise TypeError(f"the kernels take float32, float16 or bfloat16 (fp32, fp16, bf16), got {x!r}")
    return d


def products_in_fp32(dtype: str, interpreted: bool) -> bool:
    """:attr:`KernelSpec.dot_fp32` of a call on ``dtype`` inputs: always for float32 (IEEE products), and for
    bfloat16 in Triton's CPU interpreter, whose bf16 arithmetic is wrong (Triton's open bug). The one place
    this is decided (the ops, ``lx.emit``, the command line)."""
    return dtype == "float32" or (dtype == "bfloat16" and interpreted)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class KernelSpec:
    """A kernel variant.

    Args:
        feature_map: registered name of the feature map.
        causal: causal (prefix-sum) or full attention.
        normalize: divide by the fused normalizer ``scale * phi(q)^T z + eps``.
        dtype: the inputs' dtype, ``"float32" | "float16" | "bfloat16"``.
        head_dim: D, the width of q and k.
        value_dim: DV, the width of v and o.
        has_initial_state: whether (S_0, z_0) are read.
        dot_fp32: do every matrix product on fp32 operands (IEEE, not TF32). True
            for float32 inputs, and for bfloat16 under the Triton interpreter whose
            bf16 arithmetic is wrong; otherwise products take operands in the
            input dtype with fp32 accumulation.
    """

    feature_map: str
    causal: bool
    normalize: bool
    dtype: str
    head_dim: int
    value_dim: int
    has_initial_state: bool
    dot_fp32: bool

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("head_dim", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.has_initial_state and not self.causal:
            raise ValueError("an initial state is only defined for causal attention")

    @property
    def fmap(self) -> feature_maps.FeatureMap:
        return feature_maps.get(self.feature_map)

    @property
    def feature_dim(self) -> int:
        """M."""
        return self.fmap.feature_dim(self.head_dim)

    @property
    def block_d(self) -> int:
        """BD: D padded to a power of two, at least 16 (the smallest tl.dot side)."""
        return max(16, _next_pow2(self.head_dim))

    @property
    def block_m(self) -> int:
        """BM: M padded to a power of two >= 16; for a blocked map (polynomial features), the width of the
        blocks the kernels walk phi in (at most :data:`FEATURE_BLOCK`)."""
        bm = max(16, _next_pow2(self.feature_dim))
        return min(bm, FEATURE_BLOCK) if self.fmap.blocked else bm

    @property
    def feature_blocks(self) -> int:
        """NMB: the blocks of BM features the kernels walk (1 unless the map is blocked)."""
        return -(-self.feature_dim // self.block_m)

    @property
    def block_dv(self) -> int:
        return max(16, _next_pow2(self.value_dim))

    def key(self) -> str:
        """Stable hash of the spec, the feature map's source and the generator version."""
        text = repr(sorted(asdict(self).items())) + self.fmap.source_hash() + f"v{GENERATOR_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def tag(self) -> str:
        """A readable name, e.g. ``elu-causal-norm-bfloat16-D64-DV64``."""
        return "-".join(
            [
                self.feature_map,
                "causal" if self.causal else "full",
                "norm" if self.normalize else "raw",
                self.dtype,
                f"D{self.head_dim}",
                f"DV{self.value_dim}",
            ]
            + (["h0"] if self.has_initial_state else [])
            + (["fp32dot"] if self.dot_fp32 and self.dtype != "float32" else [])
        )
