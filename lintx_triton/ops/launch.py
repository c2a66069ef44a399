"""Launchers: allocate, build the grid, launch the generated kernels.

Paired with the kernels of :mod:`lintx_triton.codegen.template` by name
(``chunk_fwd`` launches ``chunk_fwd_kernel_o``, ...). Inputs arrive validated
and contiguous (:mod:`lintx_triton.ops.custom` sees to both).
"""

from __future__ import annotations

import torch

from ..codegen import load
from ..config import Config
from ..spec import KernelSpec

__all__ = ["chunk_fwd", "chunk_bwd", "decode_step"]

F32 = torch.float32
# The decode kernel holds one [M, BV] state block and two vectors: 4 warps suffice.
DECODE_WARPS = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk_states(mod, spec, BT, BV, opts, x, y, fm_w, den, g, init_h, init_z, final_h, final_z, scale, backward):
    """Chunk sums then a scan over them.

    Forward (x = k, y = v): h[c] becomes the state before chunk c, final_h the state after the last.
    Backward (x = q, y = do): h[c] becomes dS after chunk c, final_h the gradient of the initial state.
    Returns h, hz ([B*H, NT, M, DV], [B*H, NT, M]).
    """
    B, T, H, _ = x.shape
    M, DV = spec.feature_dim, spec.value_dim
    NT, NV = _cdiv(T, BT), _cdiv(DV, BV)
    h = torch.empty(B * H, NT, M, DV, dtype=F32, device=x.device)
    hz = torch.empty(B * H, NT, M, dtype=F32, device=x.device)
    mod.chunk_kernel_h[(NT, NV, B * H)](
        x, y, fm_w, den, g, h, hz, scale, T, H=H, BT=BT, BV=BV, BACKWARD=backward, **opts
    )
    BMS = min(spec.block_m, 64)
    has_init = init_h is not None
    mod.chunk_scan_kernel[(_cdiv(M, BMS), NV, B * H)](
        h,
        hz,
        init_h if has_init else final_h,
        init_z if has_init else final_z,
        final_h,
        final_z,
        T,
        BT=BT,
        BMS=BMS,
        BV=BV,
        HAS_INIT=has_init,
        REVERSE=backward,
        **opts,
    )
    return h, hz


def _state_like(q: torch.Tensor, spec: KernelSpec):
    B, _, H, _ = q.shape
    M, DV = spec.feature_dim, spec.value_dim
    return (
        torch.empty(B, H, M, DV, dtype=F32, device=q.device),
        torch.empty(B, H, M, dtype=F32, device=q.device),
    )


def _pass_through(S, z, S_in, z_in):
    """T = 0: the state leaves as it came in (zeros when none came)."""
    if S_in is None:
        return S.zero_(), z.zero_()
    return S.copy_(S_in), z.copy_(z_in)


def _fm_arg(fm_params, q):
    """The feature-map parameter pointer: elementwise maps read none, any tensor will do."""
    return fm_params if fm_params is not None else q


def chunk_fwd(spec: KernelSpec, cfg: Config, q, k, v, h0, z0, fm_params, scale: float, eps: float):
    """-> o [B, T, H, DV], den [B, H, T] (or [0] unnormalized), S_T [B, H, M, DV], z_T [B, H, M]."""
    B, T, H, _ = q.shape
    DV = spec.value_dim
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    den = torch.empty((B, H, T) if spec.normalize else (0,), dtype=F32, device=q.device)
    ht, zt = _state_like(q, spec)
    if T == 0:
        return (o, den) + _pass_through(ht, zt, h0, z0)
    mod = load(spec)
    BT, BV = cfg.chunk, cfg.block_v
    NT, NV = _cdiv(T, BT), _cdiv(DV, BV)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    den_arg = den if spec.normalize else ht  # never read unnormalized: any valid pointer will do
    fused = cfg.path == "fused" and spec.causal
    fm_w = _fm_arg(fm_params, q)
    if fused:
        h = hz = ht
    else:
        h, hz = _chunk_states(mod, spec, BT, BV, opts, k, v, fm_w, ht, ht, h0, z0, ht, zt, scale, backward=False)
    mod.chunk_fwd_kernel_o[(1 if fused else NT, NV, B * H)](
        q,
        k,
        v,
        fm_w,
        o,
        den_arg,
        h,
        hz,
        h0 if h0 is not None else ht,
        z0 if z0 is not None else zt,
        ht,
        zt,
        scale,
        eps,
        T,
        H=H,
        BT=BT,
        BV=BV,
        FUSED=fused,
        **opts,
    )
    return o, den, ht, zt


def chunk_bwd(spec: KernelSpec, cfg: Config, do, dht, dzt, q, k, v, o, den, h0, z0, fm_params, scale: float):
    """-> dq, dk, dv, dS_0 [B, H, M, DV], dz_0 [B, H, M]. ``dht``/``dzt`` (gradients of the final state) may be None."""
    B, T, H, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dh0, dz0 = _state_like(q, spec)
    if dht is None and dzt is not None:
        dht = torch.zeros_like(dh0)
    if dzt is None and dht is not None:
        dzt = torch.zeros_like(dz0)
    if T == 0:
        return (dq, dk, dv) + _pass_through(dh0, dz0, dht, dzt)
    mod = load(spec)
    BT, BV = cfg.bwd_chunk, cfg.bwd_block_v
    NT = _cdiv(T, BT)
    opts = dict(num_warps=cfg.bwd_num_warps, num_stages=cfg.num_stages)
    if spec.normalize:
        g = torch.empty(B, H, T, dtype=F32, device=q.device)
        mod.bwd_kernel_g[(NT, B * H)](o, do, den, g, T, H=H, BT=BT, **opts)
    else:
        den = g = dh0  # never read unnormalized
    ht, zt = _state_like(q, spec)  # recomputed final state: the total when not causal
    fm_w = _fm_arg(fm_params, q)
    h, hz = _chunk_states(mod, spec, BT, BV, opts, k, v, fm_w, den, g, h0, z0, ht, zt, scale, backward=False)
    dh, dhz = _chunk_states(mod, spec, BT, BV, opts, q, do, fm_w, den, g, dht, dzt, dh0, dz0, scale, backward=True)
    if not spec.causal:
        h, hz, dh, dhz = ht, zt, dh0, dz0
    mod.chunk_bwd_kernel_dq[(NT, B * H)](q, k, v, fm_w, do, den, g, h, hz, dq, scale, T, H=H, BT=BT, BV=BV, **opts)
    mod.chunk_bwd_kernel_dkv[(NT, B * H)](q, k, v, fm_w, do, den, g, dh, dhz, dk, dv, scale, T, H=H, BT=BT, BV=BV,
                                          **opts)
    return dq, dk, dv, dh0, dz0


def decode_step(spec: KernelSpec, cfg: Config, q, k, v, S_in, z_in, S_out, z_out, fm_params, scale: float,
                eps: float):
    """One token: q, k [B, H, D], v [B, H, DV] -> o [B, H, DV]; writes S_out, z_out (may be S_in, z_in)."""
    B, H, _ = q.shape
    o = torch.empty(B, H, spec.value_dim, dtype=q.dtype, device=q.device)
    if B * H == 0:
        return o
    has_state = S_in is not None
    load(spec).decode_kernel_step[(B * H,)](
        q,
        k,
        v,
        _fm_arg(fm_params, q),
        o,
        S_in if has_state else S_out,
        z_in if has_state else z_out,
        S_out,
        z_out,
        scale,
        eps,
        BV=min(cfg.block_v, spec.block_dv),
        HAS_STATE=has_state,
        num_warps=DECODE_WARPS,
    )
    return o
