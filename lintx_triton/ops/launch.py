"""Launchers: allocate, plan and launch the generated kernels, every argument by keyword.

Each kernel has one *plan* function (``chunk_sums_plan`` for ``chunk_kernel_h``, ...): its grid, its
launch-time constants and its warps and stages, from a spec, a config and a :class:`Layout`. The
launchers (``chunk_fwd``, ``chunk_bwd``, ``decode_step``, ``state_fwd``, ``state_bwd``) call the plans and
hand each :class:`Launch` to a runner: :func:`launch` runs it; :func:`record` keeps it, so that
:mod:`lintx_triton.compile_report` and the tuner's pruning see exactly the launches a call makes (they run
the launchers on meta tensors) and compile those. An argument a variant never reads gets a valid pointer
named ``unused`` at the call. Inputs arrive validated and contiguous (:mod:`lintx_triton.ops.custom`).

The kernels, by the file that defines them (``lintx_triton/codegen/kernels/``): ``chunk_kernel_h``,
``chunk_scan_kernel``, ``chunk_fwd_kernel_o`` in forward.py; ``bwd_kernel_g``, ``chunk_bwd_kernel_dq``,
``chunk_bwd_kernel_dkv`` in backward.py; ``decode_kernel_step`` in decode.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codegen import load
from ..config import Config, path_of, value_blocks
from ..spec import KernelSpec

__all__ = ["Layout", "Plan", "Launch", "launch", "record", "chunk_fwd", "chunk_bwd", "decode_step", "state_fwd",
           "state_bwd", "chunk_sums_plan", "scan_plan", "output_plan", "g_plan", "dq_plan", "dkv_plan",
           "decode_plan", "decode_warps", "hybrid_chunk", "hybrid_fwd_plan", "hybrid_bwd_plan", "hybrid_fwd",
           "hybrid_bwd", "hybrid_decode"]

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

    def seqs(self, unused) -> dict:
        """The packed-sequence arguments (``unused`` pointers when batched: never read)."""
        return dict(cu=self.cu, cmap=self.cmap) if self.varlen else dict(cu=unused, cmap=unused)


# ---------------------------------------------------------------- plans: one per kernel

@dataclass(frozen=True)
class Plan:
    """How one kernel launches: grid, launch-time constants, warps and stages (None: Triton's default)."""

    grid: tuple[int, ...]
    constexprs: dict
    num_warps: int
    num_stages: int | None


def _pass(cfg: Config, in_bwd: bool) -> tuple[int, int, int]:
    """(BV, num_warps, num_stages) of the forward's or the backward's half of a config."""
    if in_bwd:
        return cfg.bwd_block_v, cfg.bwd_num_warps, cfg.bwd_num_stages
    return cfg.block_v, cfg.num_warps, cfg.num_stages


def chunk_sums_plan(spec: KernelSpec, cfg: Config, lay: Layout, *, in_bwd: bool, grads: bool) -> Plan:
    """``chunk_kernel_h``: one program per (chunk slot, value block and feature block, batch * kv head).
    ``grads``: sums of the state's gradient (BACKWARD); ``in_bwd``: launched by the backward pass (its BV, warps,
    stages)."""
    BV, warps, stages = _pass(cfg, in_bwd)
    return Plan((lay.NT, _cdiv(spec.value_dim, BV) * spec.feature_blocks, lay.B * lay.HKV),
                dict(H=lay.H, HKV=lay.HKV, BT=lay.BT, BV=BV, BACKWARD=grads, IS_VARLEN=lay.varlen), warps, stages)


def scan_plan(spec: KernelSpec, cfg: Config, lay: Layout, *, in_bwd: bool, reverse: bool, has_init: bool) -> Plan:
    """``chunk_scan_kernel``: one program per (BMS state rows, value block, sequence * kv head)."""
    BV, warps, stages = _pass(cfg, in_bwd)
    BMS = min(spec.block_m, 64)
    return Plan((_cdiv(spec.feature_dim, BMS), _cdiv(spec.value_dim, BV), lay.N * lay.HKV),
                dict(HKV=lay.HKV, BMS=BMS, BV=BV, HAS_INIT=has_init, REVERSE=reverse, IS_VARLEN=lay.varlen),
                warps, stages)


def output_plan(spec: KernelSpec, cfg: Config, lay: Layout) -> Plan:
    """``chunk_fwd_kernel_o``: fused, one program per (value block, sequence * head) walking its chunks; else
    one per (chunk slot, value block, batch * head)."""
    BV, warps, stages = _pass(cfg, False)
    fused = path_of(spec, cfg) == "fused"
    NV = _cdiv(spec.value_dim, BV)
    grid = (1, NV, lay.N * lay.H) if fused else (lay.NT, NV, lay.B * lay.H)
    return Plan(grid, dict(H=lay.H, HKV=lay.HKV, BT=lay.BT, BV=BV, FUSED=fused, IS_VARLEN=lay.varlen), warps, stages)


def g_plan(spec: KernelSpec, cfg: Config, lay: Layout) -> Plan:
    """``bwd_kernel_g``: one program per (chunk slot, batch * head)."""
    _, warps, stages = _pass(cfg, True)
    return Plan((lay.NT, lay.B * lay.H), dict(H=lay.H, BT=lay.BT, IS_VARLEN=lay.varlen), warps, stages)


def dq_plan(spec: KernelSpec, cfg: Config, lay: Layout, *, map_grads: bool = False) -> Plan:
    """``chunk_bwd_kernel_dq``: one program per (chunk slot, batch * head). ``map_grads``: it also adds up the
    query map's parameter gradient (HAS_DFM)."""
    BV, warps, stages = _pass(cfg, True)
    return Plan((lay.NT, lay.B * lay.H), dict(H=lay.H, HKV=lay.HKV, BT=lay.BT, BV=BV, IS_VARLEN=lay.varlen,
                                              HAS_DFM=map_grads), warps, stages)


def dkv_plan(spec: KernelSpec, cfg: Config, lay: Layout, *, map_grads: bool = False) -> Plan:
    """``chunk_bwd_kernel_dkv``: one program per (chunk slot, batch * kv head), walking the group's query heads.
    ``map_grads``: it also adds up the key map's parameter gradient (HAS_DFM)."""
    BV, warps, stages = _pass(cfg, True)
    return Plan((lay.NT, lay.B * lay.HKV), dict(H=lay.H, HKV=lay.HKV, BT=lay.BT, BV=BV, IS_VARLEN=lay.varlen,
                                                HAS_DFM=map_grads), warps, stages)


def decode_plan(spec: KernelSpec, cfg: Config, B: int, H: int, HKV: int, *, has_state: bool) -> Plan:
    """``decode_kernel_step``: one program per (batch, kv head) walking the value blocks; Triton's default
    stages."""
    BV = value_blocks(spec, cfg).block_v
    return Plan((B * HKV,), dict(H=H, HKV=HKV, BV=BV, HAS_STATE=has_state), decode_warps(spec), None)


# ---------------------------------------------------------------- runners

@dataclass(frozen=True)
class Launch:
    """One kernel launch: a label for reports (``"fwd scan"``), the generated function's name, its plan and
    every other argument by name."""

    stage: str
    kernel: str
    plan: Plan
    args: dict = field(repr=False)


Runner = Callable[[KernelSpec, Launch], None]


def launch(spec: KernelSpec, L: Launch) -> None:
    """Run ``L`` with the generated module of ``spec``."""
    opts = dict(num_warps=L.plan.num_warps)
    if L.plan.num_stages is not None:
        opts["num_stages"] = L.plan.num_stages
    getattr(load(spec), L.kernel)[L.plan.grid](**L.args, **L.plan.constexprs, **opts)


@contextlib.contextmanager
def record():
    """``with record() as (run, launches)``: a runner that keeps each launch in ``launches`` instead of running
    it; pass ``run=run`` to a launcher called on meta tensors to see what it would launch."""
    launches: list[Launch] = []
    yield (lambda spec, L: launches.append(L)), launches


# ---------------------------------------------------------------- launchers

def _chunk_states(spec, cfg, lay, run, stage, *, x, y, fmap, den, g, init, final, scale, in_bwd, grads, unused):
    """Chunk sums then a scan over them, per kv head.

    Forward (x = k, y = v): S[c] becomes the state before chunk c, ``final`` the state after the last.
    Gradients (``grads``; x = q, y = do): S[c] becomes dS after chunk c (summed over the query heads of the
    group), ``final`` the gradient of the initial state. ``init``: the scan's initial value (S0, z0), or None.
    Returns S, z ([B*HKV, NT, M, DV], [B*HKV, NT, M]).
    """
    M, DV = spec.feature_dim, spec.value_dim
    S = torch.empty(lay.B * lay.HKV, lay.NT, M, DV, dtype=F32, device=x.device)
    z = torch.empty(lay.B * lay.HKV, lay.NT, M, dtype=F32, device=x.device)
    run(spec, Launch(f"{stage} chunk sums", "chunk_kernel_h", chunk_sums_plan(spec, cfg, lay, in_bwd=in_bwd, grads=grads),
                     dict(x=x, y=y, **fmap, den=den, g=g, S=S, z=z, **lay.seqs(unused), scale=scale, T=lay.T,
                          NT=lay.NT)))
    S0, z0 = init if init is not None else (unused, unused)
    ST, zT = final
    run(spec, Launch(f"{stage} scan", "chunk_scan_kernel",
                     scan_plan(spec, cfg, lay, in_bwd=in_bwd, reverse=grads, has_init=init is not None),
                     dict(S=S, z=z, S0=S0, z0=z0, ST=ST, zT=zT, coffs=lay.coffs if lay.varlen else unused, T=lay.T,
                          NT=lay.NT)))
    return S, z


def _state_like(q: torch.Tensor, spec: KernelSpec, lay: Layout):
    M, DV = spec.feature_dim, spec.value_dim
    return (
        torch.empty(lay.N, lay.HKV, M, DV, dtype=F32, device=q.device),
        torch.empty(lay.N, lay.HKV, M, dtype=F32, device=q.device),
    )


def _pass_through(S, z, S0, z0):
    """T = 0: the state leaves as it came in (zeros when none came)."""
    if S0 is None:
        return S.zero_(), z.zero_()
    return S.copy_(S0), z.copy_(z0)


def _map_args(fq, fk, unused) -> dict:
    """The feature map's parameters [HW, D + 1, M] for queries and keys (None for elementwise maps) as the kernels
    take them: pointers and head strides (0 when HW = 1, one W shared by every head)."""
    def stride(p):
        return 0 if p is None or p.shape[0] == 1 else p.stride(0)
    return dict(fq=fq if fq is not None else unused, fk=fk if fk is not None else unused, fq_hs=stride(fq),
                fk_hs=stride(fk))


def _map_grads(p, heads: int, device):
    """A zeroed fp32 accumulator of dL/d(W, b) per head [heads, D + 1, M] (None without parameters)."""
    return None if p is None else torch.zeros(heads, *p.shape[1:], dtype=F32, device=device)


def _per_param(acc, p, device):
    """The per-head accumulator summed to the parameters' heads (HW = 1: over every head); [0] without."""
    if acc is None:
        return torch.empty(0, dtype=F32, device=device)
    return acc if p.shape[0] == acc.shape[0] else acc.sum(0, keepdim=True)


def chunk_fwd(spec: KernelSpec, cfg: Config, q, k, v, S0, z0, fq, fk, scale: float, eps: float, cu=None, *,
              run: Runner = launch):
    """-> o [B, T, H, DV], den [B, H, T] (or [0] unnormalized), ST [N, HKV, M, DV], zT [N, HKV, M]. ``fq``, ``fk``:
    the map's parameters for queries and keys ([HW, D + 1, M] fp32, or None)."""
    B, T, H, _ = q.shape
    lay = Layout(q, k, cu, cfg.chunk)
    o = torch.empty(B, T, H, spec.value_dim, dtype=q.dtype, device=q.device)
    den = torch.empty((B, H, T) if spec.normalize else (0,), dtype=F32, device=q.device)
    ST, zT = _state_like(q, spec, lay)
    if T == 0:
        return (o, den) + _pass_through(ST, zT, S0, z0)
    unused = ST  # a valid pointer for what a variant never reads
    fmap = _map_args(fq, fk, unused)
    plan = output_plan(spec, cfg, lay)
    if plan.constexprs["FUSED"] and spec.feature_blocks > 1:
        # a blocked map's running state, one per (sequence, query head) and z's per value block too: the kernel
        # reads and writes it a feature block at a time
        NV = plan.grid[1]
        S = torch.empty(lay.N * H, spec.feature_dim, spec.value_dim, dtype=F32, device=q.device)
        z = torch.empty(lay.N * H * NV, spec.feature_dim, dtype=F32, device=q.device)
    elif plan.constexprs["FUSED"]:
        S = z = unused  # the fused path carries the state on chip
    else:
        S, z = _chunk_states(spec, cfg, lay, run, "fwd", x=k, y=v, fmap=fmap, den=unused, g=unused,
                             init=(S0, z0) if S0 is not None else None, final=(ST, zT), scale=scale, in_bwd=False,
                             grads=False, unused=unused)
    run(spec, Launch("fwd output (fused)" if plan.constexprs["FUSED"] else "fwd output (chunked)", "chunk_fwd_kernel_o",
                     plan, dict(q=q, k=k, v=v, **fmap, o=o, den=den if spec.normalize else unused, S=S, z=z,
                                S0=S0 if S0 is not None else unused, z0=z0 if z0 is not None else unused, ST=ST,
                                zT=zT, **lay.seqs(unused), scale=scale, eps=eps, T=T, NT=lay.NT)))
    return o, den, ST, zT


def chunk_bwd(spec: KernelSpec, cfg: Config, do, dST, dzT, q, k, v, o, den, S0, z0, fq, fk, scale: float,
              cu=None, *, map_grads: bool = False, run: Runner = launch):
    """-> dq, dk, dv, dS0 [N, HKV, M, DV], dz0 [N, HKV, M], dfq, dfk. ``dST``/``dzT`` (gradients of the final state)
    may be None. ``map_grads``: dfq, dfk are the gradients of ``fq``, ``fk`` (fp32, their shapes), summed over
    tokens and chunks with fp32 atomics (their order varies between runs on a GPU: the sums agree to fp32
    rounding, not bit for bit); else [0]."""
    B, T, H, _ = q.shape
    lay = Layout(q, k, cu, cfg.bwd_chunk)
    G = H // lay.HKV
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dS0, dz0 = _state_like(q, spec, lay)
    map_grads = map_grads and fq is not None
    dfq_h, dfk_h = (_map_grads(fq, H, q.device), _map_grads(fk, lay.HKV, q.device)) if map_grads else (None, None)

    def dfm():  # the accumulators summed to the parameters' heads, once the kernels have added into them
        return _per_param(dfq_h, fq, q.device), _per_param(dfk_h, fk, q.device)
    if dST is None and dzT is not None:
        dST = torch.zeros_like(dS0)
    if dzT is None and dST is not None:
        dzT = torch.zeros_like(dz0)
    if T == 0:
        return (dq, dk, dv) + _pass_through(dS0, dz0, dST, dzT) + dfm()
    unused = dS0  # a valid pointer for what a variant never reads
    fmap = _map_args(fq, fk, unused)
    if spec.normalize:
        g = torch.empty(B, H, T, dtype=F32, device=q.device)
        run(spec, Launch("bwd g", "bwd_kernel_g", g_plan(spec, cfg, lay),
                         dict(o=o, do=do, den=den, g=g, **lay.seqs(unused), T=T, NT=lay.NT)))
    else:
        den = g = unused
    ST, zT = _state_like(q, spec, lay)  # recomputed final state: the total when not causal
    S, z = _chunk_states(spec, cfg, lay, run, "bwd recomputed", x=k, y=v, fmap=fmap, den=unused, g=unused,
                         init=(S0, z0) if S0 is not None else None, final=(ST, zT), scale=scale, in_bwd=True,
                         grads=False, unused=unused)
    dS, dz = _chunk_states(spec, cfg, lay, run, "bwd", x=q, y=do, fmap=fmap, den=den, g=g,
                           init=(dST, dzT) if dST is not None else None, final=(dS0, dz0), scale=scale,
                           in_bwd=True, grads=True, unused=unused)
    if not spec.causal:
        S, z, dS, dz = ST, zT, dS0, dz0
    # grouped heads: the group's shares of dv are added into an fp32 buffer of dv's shape (dk sums on chip)
    dv_acc = dv if G == 1 else torch.zeros(v.shape, dtype=F32, device=q.device)
    common = dict(q=q, k=k, v=v, **fmap, do=do, den=den, g=g, **lay.seqs(unused), scale=scale, T=T, NT=lay.NT)
    run(spec, Launch("bwd dq", "chunk_bwd_kernel_dq", dq_plan(spec, cfg, lay, map_grads=map_grads),
                     dict(common, S=S, z=z, dq=dq, dfq=dfq_h if map_grads else unused)))
    run(spec, Launch("bwd dk dv", "chunk_bwd_kernel_dkv", dkv_plan(spec, cfg, lay, map_grads=map_grads),
                     dict(common, dS=dS, dz=dz, dk=dk, dv=dv_acc, dfk=dfk_h if map_grads else unused)))
    if G > 1:
        dv = dv_acc.to(v.dtype)
    return (dq, dk, dv, dS0, dz0) + dfm()


def decode_step(spec: KernelSpec, cfg: Config, q, k, v, S0, z0, ST, zT, fq, fk, scale: float, eps: float, *,
                run: Runner = launch):
    """One token: q [B, H, D], k [B, HKV, D], v [B, HKV, DV] -> o [B, H, DV]; writes ST, zT (may be S0, z0)."""
    B, H, _ = q.shape
    HKV = k.shape[1]
    o = torch.empty(B, H, spec.value_dim, dtype=q.dtype, device=q.device)
    if B * H == 0:
        return o
    has_state = S0 is not None
    unused = ST
    run(spec, Launch("decode step", "decode_kernel_step", decode_plan(spec, cfg, B, H, HKV, has_state=has_state),
                     dict(q=q, k=k, v=v, **_map_args(fq, fk, unused), o=o, S0=S0 if has_state else unused,
                          z0=z0 if has_state else unused, ST=ST, zT=zT, scale=scale, eps=eps)))
    return o


def state_fwd(spec: KernelSpec, cfg: Config, k, v, S0, z0, fk, cu=None, *, run: Runner = launch):
    """The final state alone: (ST [N, HKV, M, DV], zT [N, HKV, M]) = (S0, z0) + sums of phi(k) v^T, phi(k).

    Chunk sums and the scan of the forward, nothing else (``spec`` is the non-causal variant, whose scan keeps
    only the total)."""
    lay = Layout(k, k, cu, cfg.chunk)
    ST, zT = _state_like(k, spec, lay)
    if lay.T == 0:
        return _pass_through(ST, zT, S0, z0)
    unused = ST
    _chunk_states(spec, cfg, lay, run, "state", x=k, y=v, fmap=_map_args(None, fk, unused), den=unused, g=unused,
                  init=(S0, z0) if S0 is not None else None, final=(ST, zT), scale=1.0, in_bwd=False, grads=False,
                  unused=unused)
    return ST, zT


def state_bwd(spec: KernelSpec, cfg: Config, dS, dz, k, v, fk, cu=None, *, map_grads: bool = False,
              run: Runner = launch):
    """dk, dv (and dfk, the key map's parameter gradient, as in :func:`chunk_bwd`) of the final state: dv = phi(k)
    dS, dk = phi's vjp of (v dS^T + dz); per token, one launch of the (dk, dv) kernel in its non-causal,
    unnormalized form (which reads neither q, do, den nor g)."""
    lay = Layout(k, k, cu, cfg.bwd_chunk)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    map_grads = map_grads and fk is not None
    dfk_h = _map_grads(fk, lay.HKV, k.device) if map_grads else None
    if lay.T == 0:
        return dk, dv, _per_param(dfk_h, fk, k.device)
    unused = dS
    run(spec, Launch("state dk dv", "chunk_bwd_kernel_dkv", dkv_plan(spec, cfg, lay, map_grads=map_grads),
                     dict(q=unused, k=k, v=v, **_map_args(None, fk, unused), do=unused, den=unused, g=unused, dS=dS,
                          dz=dz, dk=dk, dv=dv, dfk=dfk_h if map_grads else unused, **lay.seqs(unused), scale=1.0,
                          T=lay.T, NT=lay.NT)))
    return dk, dv, _per_param(dfk_h, fk, k.device)


# ---------------------------------------------------------------- LoLCATs' hybrid (window=)

# The hybrid's backward holds more tiles than the linear one (scores, their gradient, q, k, v, do and a [BM, DV]
# state block per chunk): at D = DV = 64, bf16, sm_90, 8 warps, BT = 64 spilled 784 bytes in (dk, dv) and 32 in dq;
# BT = 32 none. Wider (M or DV of 128) it takes BT = 16: elu at D = 128 kept 768 / 248 bytes of stack in (dk, dv)
# / dq at 32, 128 / 136 at 16 (bench/NOTES.md).
HYBRID_BWD_CHUNK = 32


def hybrid_bwd_chunk(spec: KernelSpec, cfg: Config, window: int) -> int:
    """BT of the hybrid's backward (see HYBRID_BWD_CHUNK)."""
    widest = max(spec.block_m, spec.block_dv)
    return hybrid_chunk(window, min(cfg.bwd_chunk, HYBRID_BWD_CHUNK if widest <= 64 else HYBRID_BWD_CHUNK // 2))


def hybrid_chunk(window: int, chunk: int) -> int:
    """BT of the hybrid: the config's chunk, or the largest power of two dividing ``window`` if smaller (chunks
    must tile the window: a query's window starts on a chunk boundary, terraced, or a fixed chunk back, sliding)."""
    return min(chunk, window & -window)


def hybrid_fwd_plan(spec: KernelSpec, cfg: Config, lay: Layout, *, window: int, sliding: bool, affine: bool,
                    has_init: bool) -> Plan:
    """``hybrid_fwd_kernel_o``: fused, one program per (value block, sequence * head) walking its chunks; else
    one per (chunk slot, value block, batch * head). Blocked (polynomial) maps always run chunked: their state
    would not fit on chip."""
    BV, warps, stages = _pass(cfg, False)
    fused = path_of(spec, cfg) == "fused" and spec.feature_blocks == 1  # a blocked map's state is not carried
    slots, rows = (1, lay.N) if fused else (lay.NT, lay.B)  # chunk slots; sequences (fused) or batch rows
    grid = (slots, _cdiv(spec.value_dim, BV), rows * lay.H)
    return Plan(grid, dict(H=lay.H, HKV=lay.HKV, BT=lay.BT, BV=BV, W=window, SLIDING=sliding, AFFINE=affine,
                           HAS_INIT=has_init, FUSED=fused, IS_VARLEN=lay.varlen), warps, stages)


def hybrid_bwd_plan(spec: KernelSpec, cfg: Config, lay: Layout, kernel: str, *, window: int, sliding: bool,
                    affine: bool, map_grads: bool = False) -> Plan:
    """The hybrid's backward kernels: one program per (chunk slot, batch * head) for dq, per (chunk slot,
    batch * kv head) for the state gradient's chunk sums and (dk, dv)."""
    BV, warps, stages = _pass(cfg, True)
    heads = lay.H if kernel == "hybrid_bwd_kernel_dq" else lay.HKV
    const = dict(H=lay.H, HKV=lay.HKV, BT=lay.BT, AFFINE=affine, IS_VARLEN=lay.varlen)
    if kernel != "hybrid_bwd_kernel_h":  # the state's products in value blocks where the tiles are wide
        const.update(W=window, SLIDING=sliding, HAS_DFM=map_grads,
                     BV=min(BV, spec.block_dv) if max(spec.block_m, spec.block_dv) > 64 else spec.block_dv)
    return Plan((lay.NT, lay.B * heads), const, warps, stages)


def hybrid_fwd(spec: KernelSpec, cfg: Config, q, k, v, mix, S0, z0, fq, fk, *, window: int, sliding: bool,
               affine: bool, scale: float, qk_scale: float, cu=None, run: Runner = launch):
    """-> o [B, T, H, DV], L [B, H, T] (the denominator), m [B, H, T] (each row's window max of c q.k), and the
    position of the key that set it [B, H, T] int32. ``mix`` [H] fp32 alpha; (S0, z0) the linear initial state
    or None. ``spec`` is the unnormalized causal variant (queries' features take no per-row shift)."""
    B, T, H, _ = q.shape
    lay = Layout(q, k, cu, hybrid_chunk(window, cfg.chunk))
    o = torch.empty(B, T, H, spec.value_dim, dtype=q.dtype, device=q.device)
    L, m = (torch.empty(B, H, T, dtype=F32, device=q.device) for _ in range(2))
    idx = torch.empty(B, H, T, dtype=torch.int32, device=q.device)
    if T == 0:
        return o, L, m, idx
    ST, zT = _state_like(q, spec, lay)
    unused = ST
    fmap = _map_args(fq, fk, unused)
    plan = hybrid_fwd_plan(spec, cfg, lay, window=window, sliding=sliding, affine=affine, has_init=S0 is not None)
    if plan.constexprs["FUSED"]:
        S = z = unused  # carried on chip
    else:
        S, z = _chunk_states(spec, cfg, lay, run, "hybrid fwd", x=k, y=v, fmap=fmap, den=unused, g=unused,
                             init=(S0, z0) if S0 is not None else None, final=(ST, zT), scale=1.0, in_bwd=False,
                             grads=False, unused=unused)
    run(spec, Launch("hybrid fwd output (fused)" if plan.constexprs["FUSED"] else "hybrid fwd output (chunked)",
                     "hybrid_fwd_kernel_o", plan,
                     dict(q=q, k=k, v=v, **fmap, mix=mix, o=o, den=L, mx=m, amx=idx, S=S, z=z,
                          S0=S0 if S0 is not None else unused, z0=z0 if z0 is not None else unused, **lay.seqs(unused),
                          scale=scale, qk_scale=qk_scale, T=T, NT=lay.NT)))
    return o, L, m, idx


def hybrid_bwd(spec: KernelSpec, cfg: Config, do, q, k, v, o, L, m, idx, mix, S0, z0, fq, fk, *, window: int,
               sliding: bool, affine: bool, scale: float, qk_scale: float, cu=None, map_grads: bool = False,
               run: Runner = launch):
    """-> dq, dk, dv (inputs' dtype), dmix [H] fp32, dS0 [N, HKV, M, DV], dz0 [N, HKV, M], dfq, dfk (as
    :func:`chunk_bwd`). The forward's chunk states are recomputed; G (the state gradient's chunk sums) is scanned
    in reverse; dm (m's gradient per row) gives alpha's: dL/df = -sum dm / f, dL/dg = sum dm / g."""
    B, T, H, _ = q.shape
    lay = Layout(q, k, cu, hybrid_bwd_chunk(spec, cfg, window))
    HKV, M, DV = lay.HKV, spec.feature_dim, spec.value_dim
    dS0, dz0 = _state_like(q, spec, lay)
    map_grads = map_grads and fq is not None
    dfq_h, dfk_h = (_map_grads(fq, H, q.device), _map_grads(fk, HKV, q.device)) if map_grads else (None, None)
    dmix = torch.zeros(H, dtype=F32, device=q.device)
    if T == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmix, dS0.zero_(), dz0.zero_(),
                _per_param(dfq_h, fq, q.device), _per_param(dfk_h, fk, q.device))
    unused = dS0
    fmap = _map_args(fq, fk, unused)
    ST, zT = _state_like(q, spec, lay)
    S, z = _chunk_states(spec, cfg, lay, run, "hybrid bwd recomputed", x=k, y=v, fmap=fmap, den=unused, g=unused,
                         init=(S0, z0) if S0 is not None else None, final=(ST, zT), scale=1.0, in_bwd=True,
                         grads=False, unused=unused)
    win = dict(window=window, sliding=sliding, affine=affine)
    dq_sm, dq_ln = (torch.empty(q.shape, dtype=F32, device=q.device) for _ in range(2))
    gl, dm = (torch.empty(B, H, T, dtype=F32, device=q.device) for _ in range(2))
    common = dict(**lay.seqs(unused), T=T, NT=lay.NT)
    run(spec, Launch("hybrid bwd dq", "hybrid_bwd_kernel_dq",
                     hybrid_bwd_plan(spec, cfg, lay, "hybrid_bwd_kernel_dq", **win, map_grads=map_grads),
                     dict(q=q, k=k, v=v, **fmap, mix=mix, o=o, do=do, den=L, mx=m, amx=idx, S=S, z=z, dq=dq_sm,
                          dql=dq_ln, gl=gl, dm=dm, dfq=dfq_h if map_grads else unused, scale=scale, qk_scale=qk_scale,
                          **common)))
    dS = torch.empty(lay.B * HKV, lay.NT, M, DV, dtype=F32, device=q.device)
    dz = torch.empty(lay.B * HKV, lay.NT, M, dtype=F32, device=q.device)
    run(spec, Launch("hybrid bwd state sums", "hybrid_bwd_kernel_h",
                     hybrid_bwd_plan(spec, cfg, lay, "hybrid_bwd_kernel_h", **win),
                     dict(q=q, fq=fmap["fq"], fq_hs=fmap["fq_hs"], mix=mix, do=do, den=L, gl=gl, dS=dS, dz=dz,
                          scale=scale, **common)))
    run(spec, Launch("hybrid bwd scan", "chunk_scan_kernel", scan_plan(spec, cfg, lay, in_bwd=True, reverse=True,
                                                                        has_init=False),
                     dict(S=dS, z=dz, S0=unused, z0=unused, ST=dS0, zT=dz0, coffs=lay.coffs if lay.varlen else unused,
                          T=T, NT=lay.NT)))
    dk_sm, dk_ln = (torch.empty(k.shape, dtype=F32, device=q.device) for _ in range(2))
    dv = torch.empty(v.shape, dtype=F32, device=q.device)  # the kernel adds the linear part into it
    run(spec, Launch("hybrid bwd dk dv", "hybrid_bwd_kernel_dkv",
                     hybrid_bwd_plan(spec, cfg, lay, "hybrid_bwd_kernel_dkv", **win, map_grads=map_grads),
                     dict(q=q, k=k, v=v, **fmap, mix=mix, do=do, den=L, mx=m, amx=idx, gl=gl, dm=dm, dS=dS, dz=dz,
                          dk=dk_sm, dkl=dk_ln, dv=dv, dfk=dfk_h if map_grads else unused, scale=scale,
                          qk_scale=qk_scale, **common)))
    # alpha's gradient: f = sigmoid(alpha), dL/df = -sum_t dm_t / f; g = 1 (dL/dalpha = -(1 - f) sum dm) or
    # g = 1 - f (dL/dalpha = f (1 - f) (dL/df - dL/dg) = -sum dm)
    dm_h = dm.sum((0, 2))
    dmix = -dm_h if affine else -(1 - torch.sigmoid(mix.float())) * dm_h
    return ((dq_sm + dq_ln).to(q.dtype), (dk_sm + dk_ln).to(k.dtype), dv.to(v.dtype), dmix, dS0, dz0,
            _per_param(dfq_h, fq, q.device), _per_param(dfk_h, fk, q.device))


# The hybrid's decode step reads its ring in blocks of this many slots, with twice the linear step's warps: at D = DV
# = 64, bf16, sm_90, 64 slots and 4 warps spilled 80 bytes (bench/NOTES.md)
HYBRID_DECODE_SLOTS = 32


def hybrid_decode(spec: KernelSpec, cfg: Config, q, k, v, mix, S, z, kb, vb, pos, fq, fk, *, window: int,
                  sliding: bool, affine: bool, scale: float, qk_scale: float, run: Runner = launch):
    """One token of the hybrid, in place: q [B, H, D], k [B, HKV, D], v [B, HKV, DV] -> o [B, H, DV]; the state
    (S, z, the rings kb [B, HKV, C, D], vb [B, HKV, C, DV]) is updated by the kernel, ``pos`` [B] is not (the caller
    adds 1: every kv head's program reads it)."""
    B, H, _ = q.shape
    HKV, C = k.shape[1], kb.shape[2]
    o = torch.empty(B, H, spec.value_dim, dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    unused = S
    BV = value_blocks(spec, cfg).block_v
    plan = Plan((B * HKV,), dict(H=H, HKV=HKV, C=C, BC=HYBRID_DECODE_SLOTS, BV=BV, W=window, SLIDING=sliding,
                                 AFFINE=affine), 2 * decode_warps(spec), None)
    run(spec, Launch("hybrid decode step", "hybrid_decode_kernel_step", plan,
                     dict(q=q, k=k, v=v, **_map_args(fq, fk, unused), mix=mix, o=o, S=S, z=z, kb=kb, vb=vb, pos=pos,
                          scale=scale, qk_scale=qk_scale)))
    return o
