"""The decode step: one token of the RNN form per (batch, kv head)."""
import triton
import triton.language as tl

from .constants import BM, DV, M, NMB, NORMALIZE
from .single_block import _phi_blk  # the map's set: elementwise.py or projected.py (+ single_block.py), or polynomial.py

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _phi_row(ptr, i_bh, fm_params, IS_Q: tl.constexpr, i_mb):
    # feature block i_mb of phi of row i_bh of a [B*H, D] tensor -> [BM]: a 16-row tile (tl.dot's least) with
    # one real row
    o_r = tl.arange(0, 16)
    return tl.sum(_phi_blk(ptr, i_bh, o_r, o_r == 0, 1, fm_params, IS_Q, i_mb), 0)


# ---- decode: one token per (batch, kv head), the RNN form. S <- S + b v^T, z <- z + b, then for each of
#      the G query heads o = scale a^T S / (scale a^T z + eps). One program per kv head walks the value
#      blocks, so reading z and writing it back cannot race even when ST / zT are S0 / z0. Blocked maps
#      (NMB > 1) update the state one feature block at a time, then read it back for the outputs.
@triton.jit
def decode_kernel_step(
    q,  # [B, H, D]
    k,  # [B, HKV, D]
    v,  # [B, HKV, DV]
    fq,  # [HWQ, D + 1, M] fp32: the query map's W and bias row per head (fq_hs = (D + 1) M) or shared (fq_hs = 0)
    fk,  # [HWK, D + 1, M] the key map's (fq, fk: projected maps only)
    o,  # [B, H, DV] out
    S0,  # [B, HKV, M, DV] fp32 (HAS_STATE)
    z0,  # [B, HKV, M]
    ST,  # [B, HKV, M, DV] fp32 out (may be S0)
    zT,  # [B, HKV, M] out (may be z0)
    scale,
    eps,
    fq_hs,
    fk_hs,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BV: tl.constexpr,
    HAS_STATE: tl.constexpr,
):
    i_bs = tl.program_id(0).to(tl.int64)
    i_q0 = (i_bs // HKV) * H + (i_bs % HKV) * (H // HKV)  # the group's first query row
    if NMB == 1:
        o_m = tl.arange(0, BM)
        m_m = o_m < M
        b_b = _phi_row(k, i_bs, fk + (i_bs % HKV) * fk_hs, False, 0)  # [BM]
        if HAS_STATE:
            b_z = tl.load(z0 + i_bs * M + o_m, mask=m_m, other=0.0)
        else:
            b_z = tl.zeros([BM], dtype=tl.float32)
        b_z += b_b
        for i_v in range(0, tl.cdiv(DV, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < DV
            m_mv = m_m[:, None] & m_v[None, :]
            p_s = (i_bs * M + o_m[:, None]) * DV + o_v[None, :]
            if HAS_STATE:
                b_S = tl.load(S0 + p_s, mask=m_mv, other=0.0)  # [BM, BV]
            else:
                b_S = tl.zeros([BM, BV], dtype=tl.float32)
            b_v = tl.load(v + i_bs * DV + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
            b_S += b_b[:, None] * b_v[None, :]
            for i_g in range(0, H // HKV):
                b_a = _phi_row(q, i_q0 + i_g, fq + ((i_bs % HKV) * (H // HKV) + i_g) * fq_hs, True, 0)  # [BM]
                b_num = scale * tl.sum(b_a[:, None] * b_S, 0)  # [BV]
                if NORMALIZE:
                    b_num = b_num / (scale * tl.sum(b_a * b_z, 0) + eps)
                tl.store(o + (i_q0 + i_g) * DV + o_v, b_num.to(o.dtype.element_ty), mask=m_v)
            tl.store(ST + p_s, b_S, mask=m_mv)
        tl.store(zT + i_bs * M + o_m, b_z, mask=m_m)
    else:
        p_fk = fk + (i_bs % HKV) * fk_hs
        for i_mb in range(0, NMB):  # S <- S + b v^T, z <- z + b, block by block
            o_m = i_mb * BM + tl.arange(0, BM)
            m_m = o_m < M
            b_b = _phi_row(k, i_bs, p_fk, False, i_mb)  # [BM]
            if HAS_STATE:
                b_z = tl.load(z0 + i_bs * M + o_m, mask=m_m, other=0.0)
            else:
                b_z = tl.zeros([BM], dtype=tl.float32)
            tl.store(zT + i_bs * M + o_m, b_z + b_b, mask=m_m)
            for i_v in range(0, tl.cdiv(DV, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < DV
                m_mv = m_m[:, None] & m_v[None, :]
                p_s = (i_bs * M + o_m[:, None]) * DV + o_v[None, :]
                if HAS_STATE:
                    b_S = tl.load(S0 + p_s, mask=m_mv, other=0.0)  # [BM, BV]
                else:
                    b_S = tl.zeros([BM, BV], dtype=tl.float32)
                b_v = tl.load(v + i_bs * DV + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
                tl.store(ST + p_s, b_S + b_b[:, None] * b_v[None, :], mask=m_mv)
        tl.debug_barrier()  # the updated state, written by other threads of this program, is read back below
        for i_g in range(0, H // HKV):
            p_fq = fq + ((i_bs % HKV) * (H // HKV) + i_g) * fq_hs
            for i_v in range(0, tl.cdiv(DV, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < DV
                b_num = tl.zeros([BV], dtype=tl.float32)
                b_den = tl.zeros([BM], dtype=tl.float32)
                for i_mb in range(0, NMB):
                    o_m = i_mb * BM + tl.arange(0, BM)
                    m_m = o_m < M
                    b_a = _phi_row(q, i_q0 + i_g, p_fq, True, i_mb)  # [BM]
                    b_S = tl.load(ST + (i_bs * M + o_m[:, None]) * DV + o_v[None, :], mask=m_m[:, None] & m_v[None, :],
                                  other=0.0)
                    b_num += tl.sum(b_a[:, None] * b_S, 0)
                    b_den += b_a * tl.load(zT + i_bs * M + o_m, mask=m_m, other=0.0)
                b_num = scale * b_num
                if NORMALIZE:
                    b_num = b_num / (scale * tl.sum(b_den, 0) + eps)
                tl.store(o + (i_q0 + i_g) * DV + o_v, b_num.to(o.dtype.element_ty), mask=m_v)
