"""Spec -> Triton source. The whole code generator is a substitution into one template."""

from __future__ import annotations

from string import Template

from ..spec import GENERATOR_VERSION, KernelSpec
from .template import ELEMENTWISE_HELPERS, PROJECTED_HELPERS, TEMPLATE

__all__ = ["render"]


def render(spec: KernelSpec) -> str:
    """The Triton source of every kernel of ``spec``, as one Python module."""
    fm = spec.fmap
    return Template(TEMPLATE).substitute(
        GENERATOR_VERSION=GENERATOR_VERSION,
        SPEC=repr(spec),
        KEY=spec.key(),
        D=spec.head_dim,
        DV=spec.value_dim,
        M=spec.feature_dim,
        BD=spec.block_d,
        BM=spec.block_m,
        BDV=spec.block_dv,
        IS_CAUSAL=spec.causal,
        NORMALIZE=spec.normalize,
        HAS_H0=spec.has_initial_state,
        DOT_FP32=spec.dot_fp32,
        WIDE_TF32=spec.dtype == "float16" and not spec.dot_fp32,
        FEAT_TF32=spec.dtype == "float16" and not spec.dot_fp32 and fm.unbounded,
        IN_SCALE=repr(float(getattr(fm, "input_scale", 1.0))),
        # 16 columns of x per projection step: at D = 64, M = 128 (bf16, sm_90) the forward output kernel went
        # from a 288-byte stack at 32 to none, dq from 312 to none (bench/NOTES.md)
        BKP=16,
        ELEM=f"tl.{spec.dtype}",
        FEATURE_MAP=fm.triton_source(),
        # a table, not a branch in the kernels: an elementwise map has no W to load
        FEATURE_HELPERS=PROJECTED_HELPERS if fm.projected else ELEMENTWISE_HELPERS,
    )
