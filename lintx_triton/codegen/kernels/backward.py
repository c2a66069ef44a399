"""Backward kernels: g (the normalizer's share), dq, and (dk, dv) per kv head."""
import triton
import triton.language as tl

from .constants import BDA, BDV, BM, DV, FMS, IS_CAUSAL, M, NMB, NORMALIZE
# the map's set: elementwise.py, projected.py or polynomial.py
from .elementwise import _phi, _store_phi_vjp
from .single_block import _phi_blk, _phi_vjp_acc, _phi_vjp_store
from .helpers import _chunk, _den_offset, _load_rows, _mm, _mm_wide, _store_rows

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _bwd_program(T, NT, cu, cmap, H: tl.constexpr, HKV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    # program (chunk slot, batch*head) -> its query head, first rows of its q and k sequences, den / g offset,
    # the chunk's token offsets and mask, and the index of its state in the [B*HKV, NT, ...] chunk-state
    # buffers (of the [N, HKV, ...] totals when not causal)
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, T_n, i_n, i_t = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    if IS_CAUSAL:
        i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c
    else:
        i_s = i_n * HKV + i_hk
    return i_h, bos * H + i_h, bos * HKV + i_hk, _den_offset(i_b, i_h, bos, T, H, IS_VARLEN), o_t, o_t < T_n, i_s


@triton.jit
def _rows_state_t(y, row0, o_t, m_t, HS: tl.constexpr, S, i_s, o_mb, m_mb, BV: tl.constexpr):
    # the rows o_t of y [.., DV] times the feature rows o_mb of state i_s of S [.., M, DV], transposed, summed over
    # the value blocks -> [BT, BM]: do S^T (dq) or v dS^T (dk) of one feature block (blocked maps)
    b = tl.zeros([o_t.shape[0], BM], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_S = tl.load(S + (i_s * M + o_mb[:, None]) * DV + o_v[None, :], mask=m_mb[:, None] & m_v[None, :], other=0.0)
        b += _mm_wide(_load_rows(y, row0, o_t, m_t, o_v, m_v, HS, DV), tl.trans(b_S))
    return b


# ---- backward: g = -(do . o) / den, the normalizer's share of the gradient ----
@triton.jit(do_not_specialize=["T", "NT"])
def bwd_kernel_g(
    o,  # [B, T, H, DV]
    do,  # [B, T, H, DV]
    den,  # [B, H, T]
    g,  # [B, H, T] out
    cu,
    cmap,
    T,
    NT,
    H: tl.constexpr,
    BT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_h, row0, _, p_t0, o_t, m_t, _ = _bwd_program(T, NT, cu, cmap, H, H, BT, IS_VARLEN)
    o_w = tl.arange(0, BDV)
    m_w = o_w < DV
    b_o = _load_rows(o, row0, o_t, m_t, o_w, m_w, H, DV)
    b_do = _load_rows(do, row0, o_t, m_t, o_w, m_w, H, DV)
    b_den = tl.load(den + p_t0 + o_t, mask=m_t, other=1.0)
    tl.store(g + p_t0 + o_t, -tl.sum(b_o * b_do, 1) / b_den, mask=m_t)


# ---- backward: dq of one chunk from S_c (the state before it). dq and (dk, dv) are two kernels:
#      one kernel holding every tile spilled at BT = 64 (bench/NOTES.md) ----
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_bwd_kernel_dq(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    fq,  # [HWQ, D + 1, M] fp32: the query map's W and bias row per head (fq_hs = (D + 1) M) or shared (fq_hs = 0)
    fk,  # [HWK, D + 1, M] the key map's (fq, fk: projected maps only)
    do,  # [B, T, H, DV]
    den,  # [B, H, T]  NORMALIZE only
    g,  # [B, H, T]    NORMALIZE only
    S,  # [B*HKV, NT, M, DV] S_c (causal) or [N, HKV, M, DV] the total (not causal)
    z,  # [B*HKV, NT, M] / [N, HKV, M]
    dq,  # [B, T, H, D] out
    dfq,  # [H, *fq's per-head shape] fp32, HAS_DFM only: the query map's parameter gradient per query head (FMS each)
    cu,
    cmap,
    scale,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DFM: tl.constexpr,
):
    i_h, row_q, row_k, p_t0, o_t, m_t, i_s = _bwd_program(T, NT, cu, cmap, H, HKV, BT, IS_VARLEN)
    p_fq = fq + i_h * fq_hs  # this head's map parameters
    p_fk = fk + (i_h // (H // HKV)) * fk_hs
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    if NMB == 1:
        b_da = tl.zeros([BT, BM], dtype=tl.float32)  # do S^T, then dL/da without the factor scale
        if IS_CAUSAL:
            b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T, then dL/d(a b^T)
        for i_v in range(0, tl.cdiv(DV, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < DV
            b_S = tl.load(S + (i_s * M + o_m[:, None]) * DV + o_v[None, :], mask=m_m[:, None] & m_v[None, :],
                          other=0.0)
            b_do = _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)  # [BT, BV]
            b_da += _mm_wide(b_do, tl.trans(b_S))
            if IS_CAUSAL:
                b_dA += _mm(b_do, tl.trans(_load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)))
        if NORMALIZE:
            b_rden = 1.0 / tl.load(den + p_t0 + o_t, mask=m_t, other=1.0)  # [BT]
            b_g = tl.load(g + p_t0 + o_t, mask=m_t, other=0.0)
            b_z = tl.load(z + i_s * M + o_m, mask=m_m, other=0.0)  # [BM]
            b_da = b_da * b_rden[:, None] + b_g[:, None] * b_z[None, :]
        if IS_CAUSAL:
            if NORMALIZE:
                b_dA = b_dA * b_rden[:, None] + b_g[:, None]
            b_dA = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[:, None], b_dA, 0.0)
            b_b = _phi(k, row_k, o_t, m_t, HKV, p_fk, False)  # [BT, BM]
            b_da += _mm_wide(b_dA, b_b)
        _store_phi_vjp(dq, row_q, H, q, row_q, H, o_t, m_t, scale * b_da, p_fq, True, dfq + i_h * FMS,
                       HAS_DFM)
    else:
        # blocked map: dL/dy' (y' = [pre(q), 1]) summed over the feature blocks, dq from it once
        if NORMALIZE:
            b_rden = 1.0 / tl.load(den + p_t0 + o_t, mask=m_t, other=1.0)  # [BT]
            b_g = tl.load(g + p_t0 + o_t, mask=m_t, other=0.0)
        if IS_CAUSAL:
            b_dA = tl.zeros([BT, BT], dtype=tl.float32)
            for i_v in range(0, tl.cdiv(DV, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < DV
                b_do = _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)  # [BT, BV]
                b_dA += _mm(b_do, tl.trans(_load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)))
            if NORMALIZE:
                b_dA = b_dA * b_rden[:, None] + b_g[:, None]
            b_dA = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[:, None], b_dA, 0.0)
        b_dy = tl.zeros([BT, BDA], dtype=tl.float32)
        for i_mb in range(0, NMB):
            o_mb = i_mb * BM + o_m
            m_mb = o_mb < M
            b_da = _rows_state_t(do, row_q, o_t, m_t, H, S, i_s, o_mb, m_mb, BV)  # do S^T [BT, BM]
            if NORMALIZE:
                b_z = tl.load(z + i_s * M + o_mb, mask=m_mb, other=0.0)  # [BM]
                b_da = b_da * b_rden[:, None] + b_g[:, None] * b_z[None, :]
            if IS_CAUSAL:
                b_da += _mm_wide(b_dA, _phi_blk(k, row_k, o_t, m_t, HKV, p_fk, False, i_mb))
            b_dy = _phi_vjp_acc(b_dy, q, row_q, H, o_t, m_t, scale * b_da, p_fq, True, i_mb)
        _phi_vjp_store(b_dy, dq, row_q, H, q, row_q, H, o_t, m_t, p_fq, True, dfq + i_h * FMS, HAS_DFM)


# ---- backward: dk, dv of one chunk from dS_c (the state gradient after it), per (chunk, batch * kv head).
#      With grouped heads (HKV < H) the program walks the G = H / HKV query heads sharing its kv head: dk
#      sums their shares on chip; dv's shares are added (atomically) into an fp32 [B, T, HKV, DV] buffer
#      the launcher zeroes and casts. The dS_c terms (the kv head's own state gradient) enter once. ----
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_bwd_kernel_dkv(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    fq,  # [HWQ, D + 1, M] fp32: the query map's W and bias row per head (fq_hs = (D + 1) M) or shared (fq_hs = 0)
    fk,  # [HWK, D + 1, M] the key map's (fq, fk: projected maps only)
    do,  # [B, T, H, DV]
    den,  # [B, H, T]  NORMALIZE only
    g,  # [B, H, T]    NORMALIZE only
    dS,  # dS_c: the state gradient from every later token (and the final state), per kv head
    dz,
    dk,  # [B, T, HKV, D] out
    dv,  # [B, T, HKV, DV] out: dv itself when HKV = H, else a zeroed fp32 buffer
    dfk,  # [HKV, *fk's per-head shape] fp32, HAS_DFM only: the key map's parameter gradient per kv head (FMS each)
    cu,
    cmap,
    scale,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DFM: tl.constexpr,
):
    i_c, i_bs = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bs // HKV, i_bs % HKV
    bos, T_n, i_n, i_t = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    if IS_CAUSAL:
        i_s = i_bs.to(tl.int64) * NT + i_c
    else:
        i_s = i_n * HKV + i_hk
    row_k = bos * HKV + i_hk
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    p_fk = fk + i_hk * fk_hs  # the kv head's key map parameters
    if NMB == 1:
        b_b = _phi(k, row_k, o_t, m_t, HKV, p_fk, False)  # [BT, BM]
        if IS_CAUSAL:
            m_c = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]
        # unrolled: i_g is a compile-time constant, so the dS_c terms below cost no branch
        for i_g in tl.static_range(H // HKV):
            i_h = i_hk * (H // HKV) + i_g
            if H == HKV:
                row_q = row_k
            else:
                row_q = bos * H + i_h
            p_t0 = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN)
            if NORMALIZE:
                b_rden = 1.0 / tl.load(den + p_t0 + o_t, mask=m_t, other=1.0)  # [BT]
            if IS_CAUSAL:
                b_a = _phi(q, row_q, o_t, m_t, H, fq + i_h * fq_hs, True)  # [BT, BM]
                b_A = tl.where(m_c, _mm(b_a, tl.trans(b_b)), 0.0)  # [BT, BT] scores a b^T
                if NORMALIZE:
                    b_A = b_A * b_rden[:, None]  # attention weights: dv's intra term is A^T do
                b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T, then dL/d(a b^T)
            if i_g == 0:
                b_db = tl.zeros([BT, BM], dtype=tl.float32)  # dL/db, summed over the group (created late: registers)
            for i_v in range(0, tl.cdiv(DV, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < DV
                if i_g == 0:  # the kv head's state gradient: once
                    b_dS = tl.load(dS + (i_s * M + o_m[:, None]) * DV + o_v[None, :], mask=m_m[:, None] & m_v[None, :],
                                   other=0.0)
                    b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]
                    b_db += _mm_wide(b_v, tl.trans(b_dS))
                    b_dv = _mm_wide(b_b, b_dS)  # [BT, BV]
                else:
                    b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)
                    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
                if IS_CAUSAL:
                    b_do = _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)
                    b_dA += _mm(b_do, tl.trans(b_v))
                    b_dv += scale * _mm_wide(tl.trans(b_A), b_do)
                if H == HKV:
                    _store_rows(dv, b_dv, row_k, o_t, m_t, o_v, m_v, HKV, DV)
                else:
                    p_dv = dv + (row_k + o_t[:, None].to(tl.int64) * HKV) * DV + o_v[None, :]
                    tl.atomic_add(p_dv, b_dv, mask=m_t[:, None] & m_v[None, :])
            if i_g == 0:
                b_db += tl.load(dz + i_s * M + o_m, mask=m_m, other=0.0)[None, :]
            if IS_CAUSAL:
                if NORMALIZE:
                    b_g = tl.load(g + p_t0 + o_t, mask=m_t, other=0.0)
                    b_dA = b_dA * b_rden[:, None] + b_g[:, None]
                b_dA = tl.where(m_c, b_dA, 0.0)
                b_db += scale * _mm_wide(tl.trans(b_dA), b_a)
        _store_phi_vjp(dk, row_k, HKV, k, row_k, HKV, o_t, m_t, b_db, p_fk, False, dfk + i_hk * FMS,
                       HAS_DFM)
    else:
        # blocked map: dv needs the scores a b^T summed over the feature blocks first; dk sums dL/dy'
        # (y' = [pre(k), 1]) over the feature blocks and the group's query heads, dk from it once
        if IS_CAUSAL:
            m_c = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]
        b_dy = tl.zeros([BT, BDA], dtype=tl.float32)
        for i_g in tl.static_range(H // HKV):
            i_h = i_hk * (H // HKV) + i_g
            if H == HKV:
                row_q = row_k
            else:
                row_q = bos * H + i_h
            p_t0 = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN)
            p_fq = fq + i_h * fq_hs
            if NORMALIZE:
                b_rden = 1.0 / tl.load(den + p_t0 + o_t, mask=m_t, other=1.0)  # [BT]
            if IS_CAUSAL:
                b_A = tl.zeros([BT, BT], dtype=tl.float32)  # scores a b^T
                for i_mb in range(0, NMB):
                    b_A += _mm(_phi_blk(q, row_q, o_t, m_t, H, p_fq, True, i_mb),
                               tl.trans(_phi_blk(k, row_k, o_t, m_t, HKV, p_fk, False, i_mb)))
                b_A = tl.where(m_c, b_A, 0.0)
                if NORMALIZE:
                    b_A = b_A * b_rden[:, None]
                b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T, then dL/d(a b^T)
            for i_v in range(0, tl.cdiv(DV, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < DV
                b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]
                b_dv = tl.zeros([BT, BV], dtype=tl.float32)
                if i_g == 0:  # the kv head's state gradient: once
                    for i_mb in range(0, NMB):
                        o_mb = i_mb * BM + o_m
                        b_dS = tl.load(dS + (i_s * M + o_mb[:, None]) * DV + o_v[None, :],
                                       mask=(o_mb < M)[:, None] & m_v[None, :], other=0.0)
                        b_dv += _mm_wide(_phi_blk(k, row_k, o_t, m_t, HKV, p_fk, False, i_mb), b_dS)
                if IS_CAUSAL:
                    b_do = _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)
                    b_dA += _mm(b_do, tl.trans(b_v))
                    b_dv += scale * _mm_wide(tl.trans(b_A), b_do)
                if H == HKV:
                    _store_rows(dv, b_dv, row_k, o_t, m_t, o_v, m_v, HKV, DV)
                else:
                    p_dv = dv + (row_k + o_t[:, None].to(tl.int64) * HKV) * DV + o_v[None, :]
                    tl.atomic_add(p_dv, b_dv, mask=m_t[:, None] & m_v[None, :])
            if IS_CAUSAL:
                if NORMALIZE:
                    b_g = tl.load(g + p_t0 + o_t, mask=m_t, other=0.0)
                    b_dA = b_dA * b_rden[:, None] + b_g[:, None]
                b_dA = tl.where(m_c, b_dA, 0.0)
                for i_mb in range(0, NMB):
                    b_a = _phi_blk(q, row_q, o_t, m_t, H, p_fq, True, i_mb)
                    b_dy = _phi_vjp_acc(b_dy, k, row_k, HKV, o_t, m_t, scale * _mm_wide(tl.trans(b_dA), b_a), p_fk,
                                        False, i_mb)
        for i_mb in range(0, NMB):  # the kv head's state gradient: v dS^T + dz
            o_mb = i_mb * BM + o_m
            m_mb = o_mb < M
            b_db = _rows_state_t(v, row_k, o_t, m_t, HKV, dS, i_s, o_mb, m_mb, BV)  # v dS^T [BT, BM]
            b_db += tl.load(dz + i_s * M + o_mb, mask=m_mb, other=0.0)[None, :]
            b_dy = _phi_vjp_acc(b_dy, k, row_k, HKV, o_t, m_t, b_db, p_fk, False, i_mb)
        _phi_vjp_store(b_dy, dk, row_k, HKV, k, row_k, HKV, o_t, m_t, p_fk, False, dfk + i_hk * FMS, HAS_DFM)
