"""The ``lintx`` torch.library custom ops: forward, backward, their fake kernels and autograd.

``custom_op`` rather than ``triton_op``: under the CPU interpreter
``triton_op``/``wrap_triton`` cannot trace (FakeTensor data pointer error),
while an opaque ``custom_op`` with a fake kernel works everywhere and keeps
``torch.compile(fullgraph=True)`` free of graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import feature_maps
from ..config import config_for, interpreting
from ..spec import KernelSpec, dtype_of
from .launch import chunk_bwd, chunk_fwd, decode_step, state_bwd, state_fwd

__all__ = ["make_spec", "linear_attention_fwd", "linear_attention_bwd", "linear_attention_state",
           "linear_attention_state_bwd", "linear_attention_step",
           "linear_attention_step_"]

F32 = torch.float32


def make_spec(feature_map: str, q: Tensor, v: Tensor, causal: bool, normalize: bool, has_initial_state: bool) -> KernelSpec:
    dtype = dtype_of(q.dtype).name
    # The interpreter's bf16 arithmetic is wrong (Triton's open bug): keep its products in fp32.
    dot_fp32 = dtype == "float32" or (dtype == "bfloat16" and interpreting())
    return KernelSpec(
        feature_map=feature_map,
        causal=causal,
        normalize=normalize,
        dtype=dtype,
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        has_initial_state=has_initial_state,
        dot_fp32=dot_fp32,
    )


def _state_shapes(q: Tensor, v: Tensor, feature_map: str, cu_seqlens: Optional[Tensor] = None):
    """States are per sequence (B, or len(cu_seqlens) - 1 packed) and per kv head (v's heads)."""
    D = q.shape[-1]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    HKV = v.shape[-2]
    M = feature_maps.get(feature_map).feature_dim(D)
    return (N, HKV, M, v.shape[-1]), (N, HKV, M)


@torch.library.custom_op("lintx::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_S: Optional[Tensor],
    initial_z: Optional[Tensor],
    fm_params: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    causal: bool,
    normalize: bool,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> o [B, T, H, DV], den [B, H, T] fp32 (shape [0] unnormalized), S_T [N, HKV, M, DV], z_T [N, HKV, M]."""
    spec = make_spec(feature_map, q, v, causal, normalize, initial_S is not None)
    B, T, H, _ = q.shape
    cfg = config_for(spec, B * H, T, q.device)
    h0 = initial_S.contiguous() if initial_S is not None else None
    z0 = initial_z.contiguous() if initial_z is not None else None
    return chunk_fwd(spec, cfg, q.contiguous(), k.contiguous(), v.contiguous(), h0, z0, fm_params, scale, eps,
                     cu=cu_seqlens)


@linear_attention_fwd.register_fake
def _(q, k, v, initial_S, initial_z, fm_params, cu_seqlens, feature_map, causal, normalize, scale, eps):
    B, T, H, _ = q.shape
    s_shape, z_shape = _state_shapes(q, v, feature_map, cu_seqlens)
    o = q.new_empty(B, T, H, v.shape[-1])
    den = q.new_empty((B, H, T) if normalize else (0,), dtype=F32)
    return o, den, q.new_empty(s_shape, dtype=F32), q.new_empty(z_shape, dtype=F32)


@torch.library.custom_op("lintx::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    do: Tensor,
    dS: Optional[Tensor],
    dz: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    den: Tensor,
    initial_S: Optional[Tensor],
    initial_z: Optional[Tensor],
    fm_params: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    causal: bool,
    normalize: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (input dtype), dS_0 [B, H, M, DV], dz_0 [B, H, M] (fp32)."""
    spec = make_spec(feature_map, q, v, causal, normalize, initial_S is not None)
    B, T, H, _ = q.shape
    cfg = config_for(spec, B * H, T, q.device)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return chunk_bwd(spec, cfg, c(do), c(dS), c(dz), c(q), c(k), c(v), c(o), c(den), c(initial_S), c(initial_z),
                     fm_params, scale, cu=cu_seqlens)


@linear_attention_bwd.register_fake
def _(do, dS, dz, q, k, v, o, den, initial_S, initial_z, fm_params, cu_seqlens, feature_map, causal, normalize,
      scale):
    s_shape, z_shape = _state_shapes(q, v, feature_map, cu_seqlens)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty(s_shape, dtype=F32),
        q.new_empty(z_shape, dtype=F32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, initial_S, initial_z, fm_params, cu_seqlens, feature_map, causal, normalize, scale, eps = inputs
    o, den, _, _ = output
    ctx.save_for_backward(q, k, v, o, den, initial_S, initial_z, fm_params, cu_seqlens)
    ctx.args = (feature_map, causal, normalize, scale)


def _backward(ctx, do, dden, dS, dz):
    q, k, v, o, den, initial_S, initial_z, fm_params, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dS0, dz0 = torch.ops.lintx.linear_attention_bwd(
        do, dS, dz, q, k, v, o, den, initial_S, initial_z, fm_params, cu_seqlens, *ctx.args
    )
    if initial_S is None:
        dS0 = dz0 = None
    # the feature map's parameters are fixed (random features are redrawn, not trained)
    return dq, dk, dv, dS0, dz0, None, None, None, None, None, None, None


linear_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- the state alone: (S_T, z_T) of a segment without its outputs (a prompt's state, context parallelism) ----

def _state_launch(feature_map: str, k: Tensor, v: Tensor):
    """The spec and config of the state-alone ops: the non-causal, unnormalized variant (its scan keeps only the
    total and its (dk, dv) kernel reads no q / do), with B * HKV programs per chunk."""
    spec = make_spec(feature_map, k, v, False, False, False)
    B, T, HKV, _ = k.shape
    return spec, config_for(spec, B * HKV, T, k.device)


@torch.library.custom_op("lintx::linear_attention_state", mutates_args=())
def linear_attention_state(
    k: Tensor,
    v: Tensor,
    initial_S: Optional[Tensor],
    initial_z: Optional[Tensor],
    fm_params: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
) -> tuple[Tensor, Tensor]:
    """k [B, T, HKV, D], v [B, T, HKV, DV] -> S_T [N, HKV, M, DV], z_T [N, HKV, M] (fp32)."""
    spec, cfg = _state_launch(feature_map, k, v)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return state_fwd(spec, cfg, k.contiguous(), v.contiguous(), c(initial_S), c(initial_z), fm_params, cu=cu_seqlens)


@linear_attention_state.register_fake
def _(k, v, initial_S, initial_z, fm_params, cu_seqlens, feature_map):
    s_shape, z_shape = _state_shapes(k, v, feature_map, cu_seqlens)
    return k.new_empty(s_shape, dtype=F32), k.new_empty(z_shape, dtype=F32)


@torch.library.custom_op("lintx::linear_attention_state_bwd", mutates_args=())
def linear_attention_state_bwd(
    dS: Tensor,
    dz: Tensor,
    k: Tensor,
    v: Tensor,
    fm_params: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
) -> tuple[Tensor, Tensor]:
    """-> dk, dv (inputs' dtype) from the gradients of the final state."""
    spec, cfg = _state_launch(feature_map, k, v)
    return state_bwd(spec, cfg, dS.contiguous(), dz.contiguous(), k.contiguous(), v.contiguous(), fm_params,
                     cu=cu_seqlens)


@linear_attention_state_bwd.register_fake
def _(dS, dz, k, v, fm_params, cu_seqlens, feature_map):
    return (torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _state_setup(ctx, inputs, output):
    k, v, initial_S, initial_z, fm_params, cu_seqlens, feature_map = inputs
    ctx.save_for_backward(k, v, fm_params, cu_seqlens)
    ctx.feature_map = feature_map
    ctx.has_init = initial_S is not None


def _state_backward(ctx, dS, dz):
    k, v, fm_params, cu_seqlens = ctx.saved_tensors
    s_shape, z_shape = _state_shapes(k, v, ctx.feature_map, cu_seqlens)
    dS = dS if dS is not None else torch.zeros(s_shape, dtype=F32, device=k.device)  # S or z unused
    dz = dz if dz is not None else torch.zeros(z_shape, dtype=F32, device=k.device)
    dk, dv = torch.ops.lintx.linear_attention_state_bwd(dS, dz, k, v, fm_params, cu_seqlens, ctx.feature_map)
    init = (dS, dz) if ctx.has_init else (None, None)
    return dk, dv, *init, None, None, None


linear_attention_state.register_autograd(_state_backward, setup_context=_state_setup)


# ---- decode (the RNN form): inference only, no autograd ----

def _step_state_shapes(q: Tensor, v: Tensor, feature_map: str):
    B, _, D = q.shape
    HKV = v.shape[1]
    M = feature_maps.get(feature_map).feature_dim(D)
    return (B, HKV, M, v.shape[-1]), (B, HKV, M)


def _step_config(spec, q):
    B, H, _ = q.shape
    return config_for(spec, B * H, 1, q.device)


@torch.library.custom_op("lintx::linear_attention_step", mutates_args=())
def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    S: Optional[Tensor],
    z: Optional[Tensor],
    fm_params: Optional[Tensor],
    feature_map: str,
    normalize: bool,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token: -> o [B, H, DV], the new S [B, H, M, DV] and z [B, H, M] (fp32)."""
    spec = make_spec(feature_map, q, v, True, normalize, False)
    s_shape, z_shape = _step_state_shapes(q, v, feature_map)
    S_out = torch.empty(s_shape, dtype=F32, device=q.device)
    z_out = torch.empty(z_shape, dtype=F32, device=q.device)
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    o = decode_step(spec, _step_config(spec, q), c(q), c(k), c(v), c(S), c(z), S_out, z_out, fm_params, scale, eps)
    return o, S_out, z_out


@linear_attention_step.register_fake
def _(q, k, v, S, z, fm_params, feature_map, normalize, scale, eps):
    s_shape, z_shape = _step_state_shapes(q, v, feature_map)
    B, H, _ = q.shape
    return q.new_empty(B, H, v.shape[-1]), q.new_empty(s_shape, dtype=F32), q.new_empty(z_shape, dtype=F32)


@torch.library.custom_op("lintx::linear_attention_step_", mutates_args=("S", "z"))
def linear_attention_step_(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    S: Tensor,
    z: Tensor,
    fm_params: Optional[Tensor],
    feature_map: str,
    normalize: bool,
    scale: float,
    eps: float,
) -> Tensor:
    """One token, updating the contiguous fp32 state (S, z) in place: -> o [B, H, DV].

    Nothing is allocated but o, so a decode loop can be captured in a CUDA graph."""
    spec = make_spec(feature_map, q, v, True, normalize, False)
    return decode_step(spec, _step_config(spec, q), q.contiguous(), k.contiguous(), v.contiguous(), S, z, S, z,
                       fm_params, scale, eps)


@linear_attention_step_.register_fake
def _(q, k, v, S, z, fm_params, feature_map, normalize, scale, eps):
    B, H, _ = q.shape
    return q.new_empty(B, H, v.shape[-1])
