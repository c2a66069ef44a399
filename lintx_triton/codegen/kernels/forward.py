"""Forward kernels: chunk sums (also the backward's, BACKWARD), the scan over chunks, the outputs."""
import triton
import triton.language as tl

from .constants import BM, DV, HAS_S0, IS_CAUSAL, M, NMB, NORMALIZE
from .elementwise import _phi  # the map's set: elementwise.py or projected.py (+ single_block.py), or polynomial.py
from .single_block import _phi_blk
from .helpers import _chunk, _den_offset, _load_rows, _mm, _mm_wide, _seq, _store_rows

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


# ---- chunk sums: forward  S_c = b^T v,  z_c = sum b   (one program per value block and feature block, kv head)
#                  backward dS_c = scale sum_g a_g^T (do_g / den_g),   dz_c = scale sum_g a_g^T g_g
#                  (the G = H / HKV query heads sharing the kv head: its state's gradient sums them) ----
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_kernel_h(
    x,  # [B, T, HKV, D] k (forward) or [B, T, H, D] q (backward)
    y,  # [B, T, HKV, DV] v (forward) or [B, T, H, DV] do (backward)
    fq,  # [HWQ, D + 1, M] fp32: the query map's W and bias row per head (fq_hs = (D + 1) M) or shared (fq_hs = 0)
    fk,  # [HWK, D + 1, M] the key map's (fq, fk: projected maps only)
    den,  # [B, H, T]    backward + NORMALIZE only
    g,  # [B, H, T]      backward + NORMALIZE only
    S,  # [B*HKV, NT, M, DV] out
    z,  # [B*HKV, NT, M]  out
    cu,  # [N + 1] IS_VARLEN only
    cmap,  # [NT, 2] IS_VARLEN only
    scale,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BACKWARD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_c, i_bs = tl.program_id(0), tl.program_id(2)
    if NMB == 1:
        i_v, i_mb = tl.program_id(1), 0
    else:  # axis 1: (feature block, value block)
        i_v, i_mb = tl.program_id(1) % tl.cdiv(DV, BV), tl.program_id(1) // tl.cdiv(DV, BV)
    i_b, i_hk = i_bs // HKV, i_bs % HKV
    bos, T_n, i_n, i_t = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    o_m = i_mb * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    if BACKWARD:
        b_S = tl.zeros([BM, BV], dtype=tl.float32)
        b_z = tl.zeros([BM], dtype=tl.float32)
        for i_g in range(0, H // HKV):
            i_h = i_hk * (H // HKV) + i_g
            row0 = bos * H + i_h
            b_f = _phi_blk(x, row0, o_t, m_t, H, fq + i_h * fq_hs, True, i_mb)  # [BT, BM]
            b_y = _load_rows(y, row0, o_t, m_t, o_v, m_v, H, DV)  # [BT, BV]
            if NORMALIZE:
                p_t = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN) + o_t
                b_rden = tl.where(m_t, 1.0 / tl.load(den + p_t, mask=m_t, other=1.0), 0.0)
                b_w = tl.load(g + p_t, mask=m_t, other=0.0)
                b_z += scale * tl.sum(b_f * b_w[:, None], 0)  # [BM]
                # dS = scale a^T (do / den): do / den would underflow fp16 once den grows with T
                b_S += scale * _mm_wide(tl.trans(b_f * b_rden[:, None]), b_y)  # [BM, BV]
            else:
                b_S += scale * _mm(tl.trans(b_f), b_y)
    else:
        row0 = bos * HKV + i_hk
        b_f = _phi_blk(x, row0, o_t, m_t, HKV, fk + i_hk * fk_hs, False, i_mb)  # [BT, BM]
        b_y = _load_rows(y, row0, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]
        b_z = tl.sum(b_f, 0)
        b_S = _mm(tl.trans(b_f), b_y)
    i_s = i_bs.to(tl.int64) * NT + i_c
    p_S = S + (i_s * M + o_m[:, None]) * DV + o_v[None, :]
    tl.store(p_S, b_S, mask=m_m[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(z + i_s * M + o_m, b_z, mask=m_m)


# ---- scan over chunks: S_c <- sum of the chunk sums before c (REVERSE: after c) plus the
#      initial value, in place (causal only); the total goes to ST. One program per
#      (sequence, kv head): packed sequences scan their own slots coffs[n] .. coffs[n+1] ----
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_scan_kernel(
    S,  # [B*HKV, NT, M, DV] in/out
    z,  # [B*HKV, NT, M]    in/out
    S0,  # [N, HKV, M, DV] HAS_INIT only (N = B when batched)
    z0,  # [N, HKV, M]     HAS_INIT only
    ST,  # [N, HKV, M, DV] out
    zT,  # [N, HKV, M]     out
    coffs,  # [N + 1] first chunk slot of each sequence, IS_VARLEN only
    T,
    NT,
    HKV: tl.constexpr,
    BMS: tl.constexpr,
    BV: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_m, i_v, i_ns = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        c_lo = tl.load(coffs + i_ns // HKV)
        c_hi = tl.load(coffs + i_ns // HKV + 1)
        row = (i_ns % HKV).to(tl.int64) * NT
    else:
        c_lo = 0
        c_hi = NT
        row = i_ns.to(tl.int64) * NT
    o_m = i_m * BMS + tl.arange(0, BMS)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m = o_m < M
    # only the first value block carries z: the others scan it with every lane masked off
    m_z = m_m & (tl.zeros([BMS], dtype=tl.int32) + i_v == 0)
    m_mv = m_m[:, None] & (o_v < DV)[None, :]
    o_hv = o_m[:, None] * DV + o_v[None, :]
    p_f = i_ns.to(tl.int64) * M * DV + o_hv
    p_fz = i_ns.to(tl.int64) * M + o_m
    if HAS_INIT:
        b_s = tl.load(S0 + p_f, mask=m_mv, other=0.0)  # [BMS, BV]
        b_z = tl.load(z0 + p_fz, mask=m_z, other=0.0)  # [BMS]
    else:
        b_s = tl.zeros([BMS, BV], dtype=tl.float32)
        b_z = tl.zeros([BMS], dtype=tl.float32)
    for i in range(c_lo, c_hi):
        if REVERSE:
            i_c = c_hi - 1 - (i - c_lo)
        else:
            i_c = i
        i_s = row + i_c
        p_S = S + i_s * M * DV + o_hv
        p_z = z + i_s * M + o_m
        b_c = tl.load(p_S, mask=m_mv, other=0.0)
        b_cz = tl.load(p_z, mask=m_z, other=0.0)
        if IS_CAUSAL:
            tl.store(p_S, b_s, mask=m_mv)
            tl.store(p_z, b_z, mask=m_z)
        b_s += b_c
        b_z += b_cz
    tl.store(ST + p_f, b_s, mask=m_mv)
    tl.store(zT + p_fz, b_z, mask=m_z)


# ---- forward output (FUSED: one program per (value block, sequence, head) walks its chunks carrying the
#      state; only the group's first query head writes the kv head's final state). Blocked maps (NMB > 1) sum
#      each chunk's products over the feature blocks; fused, their state lives in a scratch buffer per program
#      (S, z), read and written one feature block at a time ----
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_fwd_kernel_o(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    fq,  # [HWQ, D + 1, M] fp32: the query map's W and bias row per head (fq_hs = (D + 1) M) or shared (fq_hs = 0)
    fk,  # [HWK, D + 1, M] the key map's (fq, fk: projected maps only)
    o,  # [B, T, H, DV] out
    den,  # [B, H, T] out, NORMALIZE only
    S,  # [B*HKV, NT, M, DV] state before each chunk (chunked, causal); FUSED and NMB > 1: [N*H, M, DV] scratch
    z,  # [B*HKV, NT, M]; FUSED and NMB > 1: [N*H*NV, M] scratch (NV value blocks)
    S0,  # [N, HKV, M, DV] initial state (FUSED + HAS_S0)
    z0,  # [N, HKV, M]
    ST,  # [N, HKV, M, DV] final state: out when FUSED, the total when not causal
    zT,  # [N, HKV, M]
    cu,  # [N + 1] IS_VARLEN only
    cmap,  # [NT, 2] IS_VARLEN only
    scale,
    eps,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    FUSED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    m_mv = m_m[:, None] & m_v[None, :]
    if FUSED:
        i_n = (i_bh // H).to(tl.int64)  # the sequence (the batch row when batched)
        if IS_VARLEN:
            i_b = i_n * 0
        else:
            i_b = i_n
        bos, T_n = _seq(i_n, T, cu, IS_VARLEN)
        i_lo = 0
        i_hi = tl.cdiv(T_n, BT)
    else:
        i_b = i_bh // H
        bos, T_n, i_n, i_t = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
        i_lo = i_t
        i_hi = i_t + 1
    p_f = ((i_n * HKV + i_hk) * M + o_m[:, None]) * DV + o_v[None, :]
    p_fz = (i_n * HKV + i_hk) * M + o_m
    i_w = i_n * H + i_h  # FUSED, NMB > 1: the program's scratch state (z's: row i_w NV + i_v)
    i_wz = i_w * tl.cdiv(DV, BV) + i_v
    if FUSED:
        if NMB == 1:
            if HAS_S0:
                b_S = tl.load(S0 + p_f, mask=m_mv, other=0.0)  # [BM, BV]
                b_z = tl.load(z0 + p_fz, mask=m_m, other=0.0)  # [BM]
            else:
                b_S = tl.zeros([BM, BV], dtype=tl.float32)
                b_z = tl.zeros([BM], dtype=tl.float32)
        else:
            for i_mb in range(0, NMB):
                o_mb = i_mb * BM + o_m
                m_mbv = (o_mb < M)[:, None] & m_v[None, :]
                if HAS_S0:
                    b_S = tl.load(S0 + p_f + i_mb * BM * DV, mask=m_mbv, other=0.0)
                    b_z = tl.load(z0 + p_fz + i_mb * BM, mask=o_mb < M, other=0.0)
                else:
                    b_S = tl.zeros([BM, BV], dtype=tl.float32)
                    b_z = tl.zeros([BM], dtype=tl.float32)
                tl.store(S + (i_w * M + o_mb[:, None]) * DV + o_v[None, :], b_S, mask=m_mbv)
                tl.store(z + i_wz * M + o_mb, b_z, mask=o_mb < M)
            tl.debug_barrier()
    row_q = bos * H + i_h
    row_k = bos * HKV + i_hk
    p_fq = fq + i_h * fq_hs  # this head's map parameters
    p_fk = fk + i_hk * fk_hs
    p_den = den + _den_offset(i_b, i_h, bos, T, H, IS_VARLEN)
    for i_t in range(i_lo, i_hi):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T_n
        if NMB == 1:
            if not FUSED:
                if IS_CAUSAL:
                    i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c
                    b_S = tl.load(S + (i_s * M + o_m[:, None]) * DV + o_v[None, :], mask=m_mv, other=0.0)
                    b_z = tl.load(z + i_s * M + o_m, mask=m_m, other=0.0)
                else:
                    b_S = tl.load(ST + p_f, mask=m_mv, other=0.0)
                    b_z = tl.load(zT + p_fz, mask=m_m, other=0.0)
            b_a = _phi(q, row_q, o_t, m_t, H, p_fq, True)  # [BT, BM]
            b_inter = _mm_wide(b_a, b_S)  # [BT, BV]
            b_den = tl.sum(b_a * b_z[None, :], 1)  # [BT]
            if IS_CAUSAL:
                b_b = _phi(k, row_k, o_t, m_t, HKV, p_fk, False)  # [BT, BM]
                b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]
                b_P = tl.where(o_t[:, None] >= o_t[None, :], _mm(b_a, tl.trans(b_b)), 0.0)  # [BT, BT] fp32
                b_den += tl.sum(b_P, 1)
        else:
            b_inter = tl.zeros([BT, BV], dtype=tl.float32)
            b_den = tl.zeros([BT], dtype=tl.float32)
            if IS_CAUSAL:
                b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]
                b_P = tl.zeros([BT, BT], dtype=tl.float32)
            for i_mb in range(0, NMB):
                o_mb = i_mb * BM + o_m
                m_mb = o_mb < M
                m_mbv = m_mb[:, None] & m_v[None, :]
                if FUSED:
                    p_w = S + (i_w * M + o_mb[:, None]) * DV + o_v[None, :]
                    b_S = tl.load(p_w, mask=m_mbv, other=0.0)
                    b_z = tl.load(z + i_wz * M + o_mb, mask=m_mb, other=0.0)
                elif IS_CAUSAL:
                    i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c
                    b_S = tl.load(S + (i_s * M + o_mb[:, None]) * DV + o_v[None, :], mask=m_mbv, other=0.0)
                    b_z = tl.load(z + i_s * M + o_mb, mask=m_mb, other=0.0)
                else:
                    b_S = tl.load(ST + p_f + i_mb * BM * DV, mask=m_mbv, other=0.0)
                    b_z = tl.load(zT + p_fz + i_mb * BM, mask=m_mb, other=0.0)
                b_a = _phi_blk(q, row_q, o_t, m_t, H, p_fq, True, i_mb)  # [BT, BM]
                b_inter += _mm_wide(b_a, b_S)
                b_den += tl.sum(b_a * b_z[None, :], 1)
                if IS_CAUSAL:
                    b_b = _phi_blk(k, row_k, o_t, m_t, HKV, p_fk, False, i_mb)  # [BT, BM]
                    b_P += _mm(b_a, tl.trans(b_b))
                    if FUSED:
                        tl.store(p_w, b_S + _mm(tl.trans(b_b), b_v), mask=m_mbv)
                        tl.store(z + i_wz * M + o_mb, b_z + tl.sum(b_b, 0), mask=m_mb)
            if FUSED:
                tl.debug_barrier()
            if IS_CAUSAL:
                b_P = tl.where(o_t[:, None] >= o_t[None, :], b_P, 0.0)  # [BT, BT] fp32
                b_den += tl.sum(b_P, 1)
        if NORMALIZE:
            b_den = scale * b_den + eps
            b_r = scale / b_den  # [BT]
            b_o = b_inter * b_r[:, None]
            if IS_CAUSAL:
                # attention weights P * scale / den: in [0, 1] for positive maps
                b_o += _mm_wide(b_P * b_r[:, None], b_v)
            if i_v == 0:
                tl.store(p_den + o_t, b_den, mask=m_t)
        else:
            if IS_CAUSAL:
                b_inter += _mm_wide(b_P, b_v)
            b_o = scale * b_inter
        _store_rows(o, b_o, row_q, o_t, m_t, o_v, m_v, H, DV)
        if FUSED and NMB == 1:
            b_S += _mm(tl.trans(b_b), b_v)
            b_z += tl.sum(b_b, 0)
    if FUSED:
        if i_h % (H // HKV) == 0:
            if NMB == 1:
                tl.store(ST + p_f, b_S, mask=m_mv)
                if i_v == 0:
                    tl.store(zT + p_fz, b_z, mask=m_m)
            else:
                for i_mb in range(0, NMB):
                    o_mb = i_mb * BM + o_m
                    m_mbv = (o_mb < M)[:, None] & m_v[None, :]
                    b_S = tl.load(S + (i_w * M + o_mb[:, None]) * DV + o_v[None, :], mask=m_mbv, other=0.0)
                    tl.store(ST + p_f + i_mb * BM * DV, b_S, mask=m_mbv)
                    if i_v == 0:
                        b_z = tl.load(z + i_wz * M + o_mb, mask=o_mb < M, other=0.0)
                        tl.store(zT + p_fz + i_mb * BM, b_z, mask=o_mb < M)
