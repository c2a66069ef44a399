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

__all__ = ["Layout", "chunk_fwd", "chunk_bwd", "decode_step", "state_fwd", "state_bwd"]

F32 = torch.float32
# The decode kernel holds one [M, BV] state block and two vectors: 4 warps suffice, 8 when M > 128 (a
# projected map's [16, M] feature tiles; FAVOR+ at D = 128, M = 256 spilled 808 bytes with 4, 24 with 8).
DECODE_WARPS = 4


def decode_warps(spec: KernelSpec) -> int:
    return DECODE_WARPS if spec.block_m <= 128 else 2 * DECODE_WARPS


def _cdiv(a, b: int):
    """ceil(a / b) of an int or an integer tensor."""
    return -(-a // b)


class Layout:
    """Where the tokens and states of one call are: batched or packed, query and kv heads, chunk slots.

    Batched: N = B sequences of T tokens, NT = ceil(T / BT) chunk slots per sequence. Packed
    (``cu`` given, B = 1): N = len(cu) - 1 sequences, NT = ceil(T / BT) + N slots, an upper bound on
    the chunks of any split of T tokens into N sequences, so nothing is read back from the device;
    ``cmap`` [NT, 2] maps a slot to (sequence, chunk), ``coffs`` [N + 1] gives each sequence's first slot.
    """

    def __init__(self, q, k, cu, BT: int):
        self.B, self.T, self.H, _ = q.shape
        self.HKV = k.shape[2]
        self.BT = BT
        self.cu = cu
        if cu is None:
            self.N, self.NT = self.B, _cdiv(self.T, BT)
            self.cmap = self.coffs = None
        else:
            self.N = cu.shape[0] - 1
            self.NT = _cdiv(self.T, BT) + self.N
            lens = (cu[1:] - cu[:-1]).long()
            ends = torch.cumsum(_cdiv(lens, BT), 0)
            coffs = torch.cat([ends.new_zeros(1), ends])  # [N + 1]: also for N = 0 (no sequence, no slot)
            self.coffs = coffs.to(torch.int32)
            slots = torch.arange(self.NT, device=q.device)
            seq = torch.searchsorted(ends, slots, right=True).clamp_(max=self.N - 1)
            local = slots - coffs[seq]
            # an idle slot (past the last chunk) points far past its sequence's end: every mask is off
            local = torch.where(slots < coffs[-1], local, torch.full_like(local, 1 << 24))
            self.cmap = torch.stack([seq, local], 1).to(torch.int32).contiguous()

    @property
    def varlen(self) -> bool:
        return self.cu is not None

    def args(self, fallback):
        """cu, cmap for the kernels (any valid pointer when batched: never read)."""
        return (self.cu, self.cmap) if self.varlen else (fallback, fallback)

    def kw(self, **extra):
        return dict(H=self.H, HKV=self.HKV, BT=self.BT, IS_VARLEN=self.varlen, **extra)


def _chunk_states(mod, spec, lay, BV, opts, x, y, fm_w, den, g, init_h, init_z, final_h, final_z, scale, backward):
    """Chunk sums then a scan over them, per kv head.

    Forward (x = k, y = v): h[c] becomes the state before chunk c, final_h the state after the last.
    Backward (x = q, y = do): h[c] becomes dS after chunk c (summed over the query heads of the group),
    final_h the gradient of the initial state. Returns h, hz ([B*HKV, NT, M, DV], [B*HKV, NT, M]).
    """
    M, DV = spec.feature_dim, spec.value_dim
    NV = _cdiv(DV, BV)
    h = torch.empty(lay.B * lay.HKV, lay.NT, M, DV, dtype=F32, device=x.device)
    hz = torch.empty(lay.B * lay.HKV, lay.NT, M, dtype=F32, device=x.device)
    cu, cmap = lay.args(h)
    mod.chunk_kernel_h[(lay.NT, NV, lay.B * lay.HKV)](
        x, y, fm_w, den, g, h, hz, cu, cmap, scale, lay.T, lay.NT, BV=BV, BACKWARD=backward, **lay.kw(), **opts
    )
    BMS = min(spec.block_m, 64)
    has_init = init_h is not None
    mod.chunk_scan_kernel[(_cdiv(M, BMS), NV, lay.N * lay.HKV)](
        h,
        hz,
        init_h if has_init else final_h,
        init_z if has_init else final_z,
        final_h,
        final_z,
        lay.coffs if lay.varlen else h,
        lay.T,
        lay.NT,
        HKV=lay.HKV,
        BMS=BMS,
        BV=BV,
        HAS_INIT=has_init,
        REVERSE=backward,
        IS_VARLEN=lay.varlen,
        **opts,
    )
    return h, hz


def _state_like(q: torch.Tensor, spec: KernelSpec, lay: "Layout"):
    M, DV = spec.feature_dim, spec.value_dim
    return (
        torch.empty(lay.N, lay.HKV, M, DV, dtype=F32, device=q.device),
        torch.empty(lay.N, lay.HKV, M, dtype=F32, device=q.device),
    )


def _pass_through(S, z, S_in, z_in):
    """T = 0: the state leaves as it came in (zeros when none came)."""
    if S_in is None:
        return S.zero_(), z.zero_()
    return S.copy_(S_in), z.copy_(z_in)


def _fm_arg(fm_params, q):
    """The feature-map parameter pointer: elementwise maps read none, any tensor will do."""
    return fm_params if fm_params is not None else q


def chunk_fwd(spec: KernelSpec, cfg: Config, q, k, v, h0, z0, fm_params, scale: float, eps: float, cu=None):
    """-> o [B, T, H, DV], den [B, H, T] (or [0] unnormalized), S_T [N, HKV, M, DV], z_T [N, HKV, M]."""
    B, T, H, _ = q.shape
    DV = spec.value_dim
    lay = Layout(q, k, cu, cfg.chunk)
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    den = torch.empty((B, H, T) if spec.normalize else (0,), dtype=F32, device=q.device)
    ht, zt = _state_like(q, spec, lay)
    if T == 0:
        return (o, den) + _pass_through(ht, zt, h0, z0)
    mod = load(spec)
    BV = cfg.block_v
    NV = _cdiv(DV, BV)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    den_arg = den if spec.normalize else ht  # never read unnormalized: any valid pointer will do
    fused = cfg.path == "fused" and spec.causal
    fm_w = _fm_arg(fm_params, q)
    if fused:
        h = hz = ht
        grid = (1, NV, lay.N * H)
    else:
        h, hz = _chunk_states(mod, spec, lay, BV, opts, k, v, fm_w, ht, ht, h0, z0, ht, zt, scale, backward=False)
        grid = (lay.NT, NV, B * H)
    cu_arg, cmap = lay.args(ht)
    mod.chunk_fwd_kernel_o[grid](
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
        cu_arg,
        cmap,
        scale,
        eps,
        T,
        lay.NT,
        BV=BV,
        FUSED=fused,
        **lay.kw(),
        **opts,
    )
    return o, den, ht, zt


def chunk_bwd(spec: KernelSpec, cfg: Config, do, dht, dzt, q, k, v, o, den, h0, z0, fm_params, scale: float,
              cu=None):
    """-> dq, dk, dv, dS_0 [N, HKV, M, DV], dz_0 [N, HKV, M]. ``dht``/``dzt`` (gradients of the final state) may be None."""
    B, T, H, _ = q.shape
    lay = Layout(q, k, cu, cfg.bwd_chunk)
    G = H // lay.HKV
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dh0, dz0 = _state_like(q, spec, lay)
    if dht is None and dzt is not None:
        dht = torch.zeros_like(dh0)
    if dzt is None and dht is not None:
        dzt = torch.zeros_like(dz0)
    if T == 0:
        return (dq, dk, dv) + _pass_through(dh0, dz0, dht, dzt)
    mod = load(spec)
    BV = cfg.bwd_block_v
    opts = dict(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    cu_arg, cmap = lay.args(dh0)
    if spec.normalize:
        g = torch.empty(B, H, T, dtype=F32, device=q.device)
        mod.bwd_kernel_g[(lay.NT, B * H)](o, do, den, g, cu_arg, cmap, T, lay.NT, H=H, BT=lay.BT,
                                          IS_VARLEN=lay.varlen, **opts)
    else:
        den = g = dh0  # never read unnormalized
    ht, zt = _state_like(q, spec, lay)  # recomputed final state: the total when not causal
    fm_w = _fm_arg(fm_params, q)
    h, hz = _chunk_states(mod, spec, lay, BV, opts, k, v, fm_w, den, g, h0, z0, ht, zt, scale, backward=False)
    dh, dhz = _chunk_states(mod, spec, lay, BV, opts, q, do, fm_w, den, g, dht, dzt, dh0, dz0, scale, backward=True)
    if not spec.causal:
        h, hz, dh, dhz = ht, zt, dh0, dz0
    # grouped heads: the group's shares of dv are added into an fp32 buffer of dv's shape (dk sums on chip)
    dv_acc = dv if G == 1 else torch.zeros(v.shape, dtype=F32, device=q.device)
    kw = lay.kw(BV=BV)
    mod.chunk_bwd_kernel_dq[(lay.NT, B * H)](q, k, v, fm_w, do, den, g, h, hz, dq, cu_arg, cmap, scale, T, lay.NT,
                                             **kw, **opts)
    mod.chunk_bwd_kernel_dkv[(lay.NT, B * lay.HKV)](q, k, v, fm_w, do, den, g, dh, dhz, dk, dv_acc, cu_arg, cmap,
                                                    scale, T, lay.NT, **kw, **opts)
    if G > 1:
        dv = dv_acc.to(v.dtype)
    return dq, dk, dv, dh0, dz0


def decode_step(spec: KernelSpec, cfg: Config, q, k, v, S_in, z_in, S_out, z_out, fm_params, scale: float,
                eps: float):
    """One token: q [B, H, D], k [B, HKV, D], v [B, HKV, DV] -> o [B, H, DV]; writes S_out, z_out (may be S_in, z_in)."""
    B, H, _ = q.shape
    HKV = k.shape[1]
    o = torch.empty(B, H, spec.value_dim, dtype=q.dtype, device=q.device)
    if B * H == 0:
        return o
    has_state = S_in is not None
    load(spec).decode_kernel_step[(B * HKV,)](
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
        H=H,
        HKV=HKV,
        BV=min(cfg.block_v, spec.block_dv),
        HAS_STATE=has_state,
        num_warps=decode_warps(spec),
    )
    return o


def state_fwd(spec: KernelSpec, cfg: Config, k, v, h0, z0, fm_params, cu=None):
    """The final state alone: (S_T [N, HKV, M, DV], z_T [N, HKV, M]) = (S_0, z_0) + sums of phi(k) v^T, phi(k).

    Chunk sums and the scan of the forward, nothing else (``spec`` is the non-causal variant, whose scan keeps
    only the total)."""
    lay = Layout(k, k, cu, cfg.chunk)
    ht, zt = _state_like(k, spec, lay)
    if lay.T == 0:
        return _pass_through(ht, zt, h0, z0)
    mod = load(spec)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _chunk_states(mod, spec, lay, cfg.block_v, opts, k, v, _fm_arg(fm_params, k), ht, ht, h0, z0, ht, zt, 1.0,
                  backward=False)
    return ht, zt


def state_bwd(spec: KernelSpec, cfg: Config, dS, dz, k, v, fm_params, cu=None):
    """dk, dv of the final state: dv = phi(k) dS, dk = phi's vjp of (v dS^T + dz); per token, one launch of the
    (dk, dv) kernel in its non-causal, unnormalized form (which reads neither q nor do)."""
    lay = Layout(k, k, cu, cfg.bwd_chunk)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if lay.T == 0:
        return dk, dv
    fm_w = _fm_arg(fm_params, k)
    cu_arg, cmap = lay.args(dS)
    load(spec).chunk_bwd_kernel_dkv[(lay.NT, lay.B * lay.HKV)](
        k, k, v, fm_w, v, dS, dS, dS, dz, dk, dv, cu_arg, cmap, 1.0, lay.T, lay.NT,
        **lay.kw(BV=cfg.bwd_block_v), num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    return dk, dv
