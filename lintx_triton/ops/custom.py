"""The ``lintx`` torch.library custom ops: forward, backward, their fake kernels and autograd.

``custom_op`` rather than ``triton_op``: under the CPU interpreter
``triton_op``/``wrap_triton`` cannot trace (FakeTensor data pointer error),
while an opaque ``custom_op`` with a fake kernel works everywhere and keeps
``torch.compile(fullgraph=True)`` free of graph breaks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import feature_maps
from ..config import config_for, interpreting
from ..spec import KernelSpec, dtype_of, products_in_fp32
from .launch import chunk_bwd, chunk_fwd, decode_step, hybrid_bwd, hybrid_decode, hybrid_fwd, state_bwd, state_fwd

__all__ = ["make_spec", "linear_attention_fwd", "linear_attention_bwd", "linear_attention_state",
           "linear_attention_state_bwd", "linear_attention_step",
           "linear_attention_step_", "hybrid_attention_fwd", "hybrid_attention_bwd",
           "hybrid_attention_step_"]

F32 = torch.float32


class _FwdArgs(NamedTuple):
    """The forward op's arguments, in its schema's order (its autograd context reads them by name)."""

    q: Tensor
    k: Tensor
    v: Tensor
    S0: Optional[Tensor]
    z0: Optional[Tensor]
    fq: Optional[Tensor]
    fk: Optional[Tensor]
    cu_seqlens: Optional[Tensor]
    feature_map: str
    causal: bool
    normalize: bool
    scale: float
    eps: float


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` contiguous (the launchers index rows by their strides), or None."""
    return t.contiguous() if t is not None else None


def make_spec(feature_map: str, q: Tensor, v: Tensor, causal: bool, normalize: bool, has_initial_state: bool) -> KernelSpec:
    dtype = dtype_of(q.dtype).name
    return KernelSpec(
        feature_map=feature_map,
        causal=causal,
        normalize=normalize,
        dtype=dtype,
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        has_initial_state=has_initial_state,
        dot_fp32=products_in_fp32(dtype, interpreting()),
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
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    causal: bool,
    normalize: bool,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> o [B, T, H, DV], den [B, H, T] fp32 (shape [0] unnormalized), ST [N, HKV, M, DV], zT [N, HKV, M].

    ``fq``, ``fk``: the feature map's parameters for queries and keys, [HW, D + 1, M] fp32 (W then the bias
    row; HW = 1 shared, or per head), None for elementwise maps; one tensor twice when the map is tied."""
    spec = make_spec(feature_map, q, v, causal, normalize, S0 is not None)
    B, T, H, _ = q.shape
    cfg = config_for(spec, B * H, T, q.device)
    return chunk_fwd(spec, cfg, q.contiguous(), k.contiguous(), v.contiguous(), _c(S0), _c(z0), _c(fq), _c(fk),
                     scale, eps, cu=cu_seqlens)


@linear_attention_fwd.register_fake
def _(q, k, v, S0, z0, fq, fk, cu_seqlens, feature_map, causal, normalize, scale, eps):
    B, T, H, _ = q.shape
    s_shape, z_shape = _state_shapes(q, v, feature_map, cu_seqlens)
    o = q.new_empty(B, T, H, v.shape[-1])
    den = q.new_empty((B, H, T) if normalize else (0,), dtype=F32)
    return o, den, q.new_empty(s_shape, dtype=F32), q.new_empty(z_shape, dtype=F32)


@torch.library.custom_op("lintx::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    do: Tensor,
    dST: Optional[Tensor],
    dzT: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    den: Tensor,
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    causal: bool,
    normalize: bool,
    scale: float,
    map_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (input dtype), dS0 [N, HKV, M, DV], dz0 [N, HKV, M] (fp32), and with ``map_grads`` the
    gradients of ``fq``, ``fk`` (fp32, their shapes; [0] otherwise)."""
    spec = make_spec(feature_map, q, v, causal, normalize, S0 is not None)
    B, T, H, _ = q.shape
    cfg = config_for(spec, B * H, T, q.device)
    return chunk_bwd(spec, cfg, _c(do), _c(dST), _c(dzT), _c(q), _c(k), _c(v), _c(o), _c(den), _c(S0), _c(z0),
                     _c(fq), _c(fk), scale, cu=cu_seqlens, map_grads=map_grads)


def _map_grads_like(p: Optional[Tensor], map_grads: bool, like: Tensor) -> Tensor:
    return like.new_empty(p.shape if map_grads and p is not None else (0,), dtype=F32)


@linear_attention_bwd.register_fake
def _(do, dST, dzT, q, k, v, o, den, S0, z0, fq, fk, cu_seqlens, feature_map, causal, normalize, scale, map_grads):
    s_shape, z_shape = _state_shapes(q, v, feature_map, cu_seqlens)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty(s_shape, dtype=F32),
        q.new_empty(z_shape, dtype=F32),
        _map_grads_like(fq, map_grads, q),
        _map_grads_like(fk, map_grads, q),
    )


def _setup_context(ctx, inputs, output):
    a = _FwdArgs(*inputs)
    o, den, _, _ = output
    ctx.save_for_backward(a.q, a.k, a.v, o, den, a.S0, a.z0, a.fq, a.fk, a.cu_seqlens)
    ctx.flags = dict(feature_map=a.feature_map, causal=a.causal, normalize=a.normalize, scale=a.scale)


def _wants(ctx, name: str) -> bool:
    return ctx.needs_input_grad[_FwdArgs._fields.index(name)]


def _backward(ctx, do, dden, dST, dzT):
    q, k, v, o, den, S0, z0, fq, fk, cu_seqlens = ctx.saved_tensors
    map_grads = _wants(ctx, "fq") or _wants(ctx, "fk")  # a learnable map's parameters (fixed maps' need none)
    dq, dk, dv, dS0, dz0, dfq, dfk = torch.ops.lintx.linear_attention_bwd(
        do=do, dST=dST, dzT=dzT, q=q, k=k, v=v, o=o, den=den, S0=S0, z0=z0, fq=fq, fk=fk, cu_seqlens=cu_seqlens,
        **ctx.flags, map_grads=map_grads)
    grads = dict(q=dq, k=dk, v=dv, S0=dS0 if S0 is not None else None, z0=dz0 if S0 is not None else None,
                 fq=dfq if _wants(ctx, "fq") else None, fk=dfk if _wants(ctx, "fk") else None)
    return tuple(grads.get(name) for name in _FwdArgs._fields)


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
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    fk: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
) -> tuple[Tensor, Tensor]:
    """k [B, T, HKV, D], v [B, T, HKV, DV] -> ST [N, HKV, M, DV], zT [N, HKV, M] (fp32); ``fk`` the key map's
    parameters (or None)."""
    spec, cfg = _state_launch(feature_map, k, v)
    return state_fwd(spec, cfg, k.contiguous(), v.contiguous(), _c(S0), _c(z0), _c(fk), cu=cu_seqlens)


@linear_attention_state.register_fake
def _(k, v, S0, z0, fk, cu_seqlens, feature_map):
    s_shape, z_shape = _state_shapes(k, v, feature_map, cu_seqlens)
    return k.new_empty(s_shape, dtype=F32), k.new_empty(z_shape, dtype=F32)


@torch.library.custom_op("lintx::linear_attention_state_bwd", mutates_args=())
def linear_attention_state_bwd(
    dST: Tensor,
    dzT: Tensor,
    k: Tensor,
    v: Tensor,
    fk: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    map_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> dk, dv (inputs' dtype) from the gradients of the final state, and with ``map_grads`` the gradient of
    ``fk`` (fp32; [0] otherwise)."""
    spec, cfg = _state_launch(feature_map, k, v)
    return state_bwd(spec, cfg, dST.contiguous(), dzT.contiguous(), k.contiguous(), v.contiguous(), _c(fk),
                     cu=cu_seqlens, map_grads=map_grads)


@linear_attention_state_bwd.register_fake
def _(dST, dzT, k, v, fk, cu_seqlens, feature_map, map_grads):
    return (torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            _map_grads_like(fk, map_grads, k))


def _state_setup(ctx, inputs, output):
    k, v, S0, z0, fk, cu_seqlens, feature_map = inputs
    ctx.save_for_backward(k, v, fk, cu_seqlens)
    ctx.feature_map = feature_map
    ctx.has_init = S0 is not None


def _state_backward(ctx, dST, dzT):
    k, v, fk, cu_seqlens = ctx.saved_tensors
    s_shape, z_shape = _state_shapes(k, v, ctx.feature_map, cu_seqlens)
    dST = dST if dST is not None else torch.zeros(s_shape, dtype=F32, device=k.device)  # S or z unused
    dzT = dzT if dzT is not None else torch.zeros(z_shape, dtype=F32, device=k.device)
    map_grads = ctx.needs_input_grad[4]
    dk, dv, dfk = torch.ops.lintx.linear_attention_state_bwd(dST=dST, dzT=dzT, k=k, v=v, fk=fk,
                                                             cu_seqlens=cu_seqlens, feature_map=ctx.feature_map,
                                                             map_grads=map_grads)
    # S = S0 + sums: the initial state's gradient is the final state's
    init = (dST, dzT) if ctx.has_init else (None, None)
    return dk, dv, *init, dfk if map_grads else None, None, None


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
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    feature_map: str,
    normalize: bool,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token from the state (S0, z0) (None: zeros): -> o [B, H, DV], the new state ST [B, HKV, M, DV] and
    zT [B, HKV, M] (fp32)."""
    spec = make_spec(feature_map, q, v, True, normalize, False)
    s_shape, z_shape = _step_state_shapes(q, v, feature_map)
    ST = torch.empty(s_shape, dtype=F32, device=q.device)
    zT = torch.empty(z_shape, dtype=F32, device=q.device)
    o = decode_step(spec, _step_config(spec, q), _c(q), _c(k), _c(v), _c(S0), _c(z0), ST, zT, _c(fq), _c(fk), scale,
                    eps)
    return o, ST, zT


@linear_attention_step.register_fake
def _(q, k, v, S0, z0, fq, fk, feature_map, normalize, scale, eps):
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
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    feature_map: str,
    normalize: bool,
    scale: float,
    eps: float,
) -> Tensor:
    """One token, updating the contiguous fp32 state (S, z) in place: -> o [B, H, DV].

    Nothing is allocated but o, so a decode loop can be captured in a CUDA graph."""
    spec = make_spec(feature_map, q, v, True, normalize, False)
    return decode_step(spec, _step_config(spec, q), q.contiguous(), k.contiguous(), v.contiguous(), S, z, S, z,
                       _c(fq), _c(fk), scale, eps)


@linear_attention_step_.register_fake
def _(q, k, v, S, z, fq, fk, feature_map, normalize, scale, eps):
    B, H, _ = q.shape
    return q.new_empty(B, H, v.shape[-1])


# ---- LoLCATs' hybrid (window=): sliding-window softmax + linear attention under one normalizer ----

class _HybridArgs(NamedTuple):
    """The hybrid forward op's arguments, in its schema's order."""

    q: Tensor
    k: Tensor
    v: Tensor
    mix: Tensor
    S0: Optional[Tensor]
    z0: Optional[Tensor]
    fq: Optional[Tensor]
    fk: Optional[Tensor]
    cu_seqlens: Optional[Tensor]
    feature_map: str
    window: int
    sliding: bool
    affine: bool
    scale: float
    qk_scale: float


def _hybrid_launch(feature_map: str, q: Tensor, v: Tensor, has_init: bool):
    """The hybrid's spec (causal, unnormalized: a projected map's queries take no per-row shift, which would not
    cancel between its two parts) and config."""
    spec = make_spec(feature_map, q, v, True, False, has_init)
    B, T, H, _ = q.shape
    return spec, config_for(spec, B * H, T, q.device)


@torch.library.custom_op("lintx::hybrid_attention_fwd", mutates_args=())
def hybrid_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mix: Tensor,
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    window: int,
    sliding: bool,
    affine: bool,
    scale: float,
    qk_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> o [B, T, H, DV], L [B, H, T] (the denominator), m [B, H, T] (each row's window max of qk_scale q.k) fp32,
    and the position of the key that set m [B, H, T] int32. ``mix`` [H] fp32: alpha, f = sigmoid(alpha);
    (S0, z0) the linear state of a preceding segment; positions count from each sequence's first token."""
    spec, cfg = _hybrid_launch(feature_map, q, v, S0 is not None)
    return hybrid_fwd(spec, cfg, q.contiguous(), k.contiguous(), v.contiguous(), mix.contiguous(), _c(S0), _c(z0),
                      _c(fq), _c(fk), window=window, sliding=sliding, affine=affine, scale=scale, qk_scale=qk_scale,
                      cu=cu_seqlens)


@hybrid_attention_fwd.register_fake
def _(q, k, v, mix, S0, z0, fq, fk, cu_seqlens, feature_map, window, sliding, affine, scale, qk_scale):
    B, T, H, _ = q.shape
    return (q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=F32), q.new_empty(B, H, T, dtype=F32),
            q.new_empty(B, H, T, dtype=torch.int32))


@torch.library.custom_op("lintx::hybrid_attention_bwd", mutates_args=())
def hybrid_attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    L: Tensor,
    m: Tensor,
    idx: Tensor,
    mix: Tensor,
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    feature_map: str,
    window: int,
    sliding: bool,
    affine: bool,
    scale: float,
    qk_scale: float,
    map_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (inputs' dtype), dmix [H], dS0 [N, HKV, M, DV], dz0 [N, HKV, M] (fp32), and with
    ``map_grads`` the gradients of ``fq``, ``fk`` (fp32; [0] otherwise)."""
    spec, cfg = _hybrid_launch(feature_map, q, v, S0 is not None)
    return hybrid_bwd(spec, cfg, _c(do), _c(q), _c(k), _c(v), _c(o), _c(L), _c(m), _c(idx), _c(mix), _c(S0), _c(z0),
                      _c(fq), _c(fk), window=window, sliding=sliding, affine=affine, scale=scale, qk_scale=qk_scale,
                      cu=cu_seqlens, map_grads=map_grads)


@hybrid_attention_bwd.register_fake
def _(do, q, k, v, o, L, m, idx, mix, S0, z0, fq, fk, cu_seqlens, feature_map, window, sliding, affine, scale,
      qk_scale, map_grads):
    s_shape, z_shape = _state_shapes(q, v, feature_map, cu_seqlens)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        mix.new_empty(mix.shape, dtype=F32),
        q.new_empty(s_shape, dtype=F32),
        q.new_empty(z_shape, dtype=F32),
        _map_grads_like(fq, map_grads, q),
        _map_grads_like(fk, map_grads, q),
    )


def _hybrid_setup(ctx, inputs, output):
    a = _HybridArgs(*inputs)
    o, L, m, idx = output
    ctx.save_for_backward(a.q, a.k, a.v, o, L, m, idx, a.mix, a.S0, a.z0, a.fq, a.fk, a.cu_seqlens)
    ctx.flags = dict(feature_map=a.feature_map, window=a.window, sliding=a.sliding, affine=a.affine, scale=a.scale,
                     qk_scale=a.qk_scale)


def _hybrid_backward(ctx, do, dL, dm, didx):
    q, k, v, o, L, m, idx, mix, S0, z0, fq, fk, cu_seqlens = ctx.saved_tensors
    wants = lambda name: ctx.needs_input_grad[_HybridArgs._fields.index(name)]  # noqa: E731
    map_grads = wants("fq") or wants("fk")
    dq, dk, dv, dmix, dS0, dz0, dfq, dfk = torch.ops.lintx.hybrid_attention_bwd(
        do=do, q=q, k=k, v=v, o=o, L=L, m=m, idx=idx, mix=mix, S0=S0, z0=z0, fq=fq, fk=fk, cu_seqlens=cu_seqlens,
        **ctx.flags, map_grads=map_grads)
    grads = dict(q=dq, k=dk, v=dv, mix=dmix.to(mix.dtype), S0=dS0 if S0 is not None else None,
                 z0=dz0 if S0 is not None else None, fq=dfq if wants("fq") else None,
                 fk=dfk if wants("fk") else None)
    return tuple(grads.get(name) for name in _HybridArgs._fields)


hybrid_attention_fwd.register_autograd(_hybrid_backward, setup_context=_hybrid_setup)


@torch.library.custom_op("lintx::hybrid_attention_step_", mutates_args=("S", "z", "kb", "vb", "pos"))
def hybrid_attention_step_(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mix: Tensor,
    S: Tensor,
    z: Tensor,
    kb: Tensor,
    vb: Tensor,
    pos: Tensor,
    fq: Optional[Tensor],
    fk: Optional[Tensor],
    feature_map: str,
    window: int,
    sliding: bool,
    affine: bool,
    scale: float,
    qk_scale: float,
) -> Tensor:
    """One token of the hybrid, updating its :class:`lintx_triton.hybrid.WindowState` (S, z, kb, vb, pos; contiguous)
    in place: -> o [B, H, DV]. Nothing is allocated but o and nothing is read on the host, so a decode loop can be
    captured in a CUDA graph."""
    spec = make_spec(feature_map, q, v, True, False, False)
    o = hybrid_decode(spec, _step_config(spec, q), q.contiguous(), k.contiguous(), v.contiguous(), mix.contiguous(),
                      S, z, kb, vb, pos, _c(fq), _c(fk), window=window, sliding=sliding, affine=affine, scale=scale,
                      qk_scale=qk_scale)
    pos.add_(1)
    return o


@hybrid_attention_step_.register_fake
def _(q, k, v, mix, S, z, kb, vb, pos, fq, fk, feature_map, window, sliding, affine, scale, qk_scale):
    B, H, _ = q.shape
    return q.new_empty(B, H, v.shape[-1])
