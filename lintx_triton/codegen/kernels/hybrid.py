"""LoLCATs' hybrid (``window=``): sliding-window softmax + linear attention under one normalizer, chunk = BT, w = W.

For a query at position t (in its sequence) the window is [lo_t, t], lo_t = ``_win_lo(t)``: terraced (blocks of
W counted from the sequence's first token; the query's block and the previous one) or sliding (the last W
tokens). Keys before lo_t are seen in linear form. With chunks of BT tokens (BT divides W) the linear keys of
chunk c are those before chunk kc = lo_(c BT) // BT, a chunk state S[kc] of the forward's scan, plus, for the
sliding window only, the keys of chunk kc before each row's lo_t (a masked [BT, BT] product). The softmax keys
are chunks kc .. c, masked to [lo_t, t]. Per row (f = sigmoid(alpha_h), g = 1 or 1 - f, c = QK_SCALE):

    num = f sum_s exp(c q.k_s - m_t) v_s + g scale a (S[kc] + intra)      m_t the window row's exact max
    den = f sum_s exp(c q.k_s - m_t)     + g scale a (z[kc] + intra)      o = num / den

m_t is not a free stabilizer (the linear part is not scaled by exp(-m_t)): the softmax accumulator is rescaled
online and joined with the linear part once the row's max is final. The forward stores den (L), m and the
argmax (the key that set m: m's gradient flows there, as through ``torch.amax``, which splits it between ties;
a tie here gives it to the first key). Backward, with dN = do / L, dL = -(do . o) / L:

    dP_ts = dN_t . v_s + dL_t       ds_ts = P_ts dP_ts + [s = argmax_t] dm_t     dm_t = -sum_s P_ts dP_ts
    dq_t  = c sum_s ds_ts k_s + phi's vjp of g scale (dN S^T + dL z^T + intra)        (dq kernel)
    dk_s  = c sum_t ds_ts q_t + phi's vjp of (v_s dS_rev^T + dz_rev + intra),  dv_s = sum_t P_ts dN_t + ...
    dL/df_h = -sum_t dm_t / f_h,   dL/dg_h = sum_t dm_t / g_h                            (in PyTorch)

dS_rev of key chunk j sums G_c = g scale sum_t a_t^T [dN_t, dL_t] over the query chunks c whose state holds
chunk j (kc(c) > j): a reverse scan of ``hybrid_bwd_kernel_h``'s sums. The linear parts walk the map's
feature blocks (NMB of BM features: one for elementwise and projected maps, several for polynomial ones, whose
dq and dk sum dL/dy' over the blocks and take pre's vjp once, as backward.py does); the fused forward carries a
one-block state only (the launcher runs blocked maps chunked). The spec is generated unnormalized so that a projected map's queries take no per-row shift (it would not
cancel here). Launch-time constants beyond the forward's: W (the window w), SLIDING (False: terraced),
AFFINE (g = 1 - f), HAS_INIT (S0, z0), HAS_DFM.
"""
import triton
import triton.language as tl

from .constants import BD, BDA, BDV, BM, D, DV, FMS, M, NMB
from .elementwise import _phi, _store_phi_vjp  # or projected.py's (one-block maps)
from .single_block import _phi_blk, _phi_vjp_acc, _phi_vjp_store  # or polynomial.py's (blocked maps)
from .backward import _rows_state_t
from .helpers import _chunk, _den_offset, _load_rows, _mm, _mm_wide, _seq, _store_rows

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _win_lo(t, W: tl.constexpr, SLIDING: tl.constexpr):
    # the first token a query at position t sees in softmax form
    if SLIDING:
        lo = t - W + 1
    else:
        lo = (t // W - 1) * W
    return tl.maximum(lo, 0)


@triton.jit
def _mix_factors(mix, i_h, AFFINE: tl.constexpr):
    # (f, g) of query head i_h: f = sigmoid(alpha), g = 1 or 1 - f
    b_al = tl.load(mix + i_h).to(tl.float32)
    f = 1.0 / (1.0 + tl.exp(-b_al))
    if AFFINE:
        g = 1.0 / (1.0 + tl.exp(b_al))  # 1 - f without cancellation
    else:
        g = f * 0.0 + 1.0
    return f, g


@triton.jit
def _query_rows(den, gl, i_b, i_h, bos, T, o_t, m_t, H: tl.constexpr, IS_VARLEN: tl.constexpr):
    # query head i_h's rows o_t of a sequence starting at bos: their first row in [B, T, H, *], their offsets in the
    # [B, H, T] rows, 1 / L and dL there (0 on padded rows)
    p_st = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN) + o_t
    b_rL = tl.where(m_t, 1.0 / tl.load(den + p_st, mask=m_t, other=1.0), 0.0)
    return bos * H + i_h, p_st, b_rL, tl.load(gl + p_st, mask=m_t, other=0.0)


# ---- forward: the outputs, L, m and argmax (FUSED: one program per (value block, sequence, head) walks its
#      chunks, the linear state carried on chip one window behind; else one program per chunk slot reading
#      S[kc] of the forward's scan) ----
@triton.jit(do_not_specialize=["T", "NT"])
def hybrid_fwd_kernel_o(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    fq,  # [HWQ, D + 1, M] projected maps' parameters (as chunk_fwd_kernel_o)
    fk,  # [HWK, D + 1, M]
    mix,  # [H] alpha (f = sigmoid(alpha))
    o,  # [B, T, H, DV] out
    den,  # [B, H, T] out: L = f l + g scale (a . z)
    mx,  # [B, H, T] out: m_t, the window row's max of c q.k
    amx,  # [B, H, T] int32 out: the position (in the sequence) of the key that set m_t
    S,  # [B*HKV, NT, M, DV] the state before each chunk (chunked)
    z,  # [B*HKV, NT, M]
    S0,  # [N, HKV, M, DV] FUSED + HAS_INIT
    z0,  # [N, HKV, M]
    cu,
    cmap,
    scale,
    qk_scale,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    W: tl.constexpr,
    SLIDING: tl.constexpr,
    AFFINE: tl.constexpr,
    HAS_INIT: tl.constexpr,
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
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if FUSED:
        i_n = (i_bh // H).to(tl.int64)
        if IS_VARLEN:
            i_b = i_n * 0
        else:
            i_b = i_n
        bos, T_n = _seq(i_n, T, cu, IS_VARLEN)
        i_lo = 0
        i_hi = tl.cdiv(T_n, BT)
        if HAS_INIT:
            p_f = ((i_n * HKV + i_hk) * M + o_m[:, None]) * DV + o_v[None, :]
            b_S = tl.load(S0 + p_f, mask=m_mv, other=0.0)  # [BM, BV]
            b_z = tl.load(z0 + (i_n * HKV + i_hk) * M + o_m, mask=m_m, other=0.0)  # [BM]
        else:
            b_S = tl.zeros([BM, BV], dtype=tl.float32)
            b_z = tl.zeros([BM], dtype=tl.float32)
    else:
        i_b = i_bh // H
        bos, T_n, i_n, i_t0 = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
        i_lo = i_t0
        i_hi = i_t0 + 1
    row_q = bos * H + i_h
    row_k = bos * HKV + i_hk
    p_fq = fq + i_h * fq_hs
    p_fk = fk + i_hk * fk_hs
    p_st = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN)
    f, g = _mix_factors(mix, i_h, AFFINE)
    i_cur = 0  # FUSED: the chunks in (b_S, b_z)
    for i_t in range(i_lo, i_hi):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T_n
        b_lo = _win_lo(o_t, W, SLIDING)  # [BT]
        i_k = _win_lo(i_t * BT, W, SLIDING) // BT  # the first chunk with softmax keys; the state is before it
        o_sk = i_k * BT + tl.arange(0, BT)  # chunk i_k's keys (the sliding window's intra-chunk linear part)
        m_sk = o_sk < T_n
        if SLIDING:
            b_Pl = tl.zeros([BT, BT], dtype=tl.float32)
        if FUSED:  # one feature block (NMB = 1: the launcher runs blocked maps chunked)
            for i_j in range(i_cur, i_k):  # move the carried state up to chunk i_k
                o_s = i_j * BT + tl.arange(0, BT)
                m_s = o_s < T_n
                b_b = _phi(k, row_k, o_s, m_s, HKV, p_fk, False)  # [BT, BM]
                b_S += _mm(tl.trans(b_b), _load_rows(v, row_k, o_s, m_s, o_v, m_v, HKV, DV))
                b_z += tl.sum(b_b, 0)
            i_cur = tl.maximum(i_cur, i_k)
            b_a = _phi(q, row_q, o_t, m_t, H, p_fq, True)  # [BT, BM]
            b_lin = _mm_wide(b_a, b_S)  # [BT, BV]
            b_lden = tl.sum(b_a * b_z[None, :], 1)  # [BT]
            if SLIDING:
                b_Pl = _mm(b_a, tl.trans(_phi(k, row_k, o_sk, m_sk, HKV, p_fk, False)))
        else:  # the state before chunk i_k, a feature block at a time
            i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c - (i_t - i_k)
            b_lin = tl.zeros([BT, BV], dtype=tl.float32)
            b_lden = tl.zeros([BT], dtype=tl.float32)
            for i_mb in range(0, NMB):
                o_mb = i_mb * BM + o_m
                m_mb = o_mb < M
                b_S = tl.load(S + (i_s * M + o_mb[:, None]) * DV + o_v[None, :], mask=m_mb[:, None] & m_v[None, :],
                              other=0.0)  # [BM, BV]
                b_z = tl.load(z + i_s * M + o_mb, mask=m_mb, other=0.0)
                b_a = _phi_blk(q, row_q, o_t, m_t, H, p_fq, True, i_mb)  # [BT, BM]
                b_lin += _mm_wide(b_a, b_S)
                b_lden += tl.sum(b_a * b_z[None, :], 1)
                if SLIDING:
                    b_Pl += _mm(b_a, tl.trans(_phi_blk(k, row_k, o_sk, m_sk, HKV, p_fk, False, i_mb)))
        if SLIDING:  # chunk i_k's keys before a row's window are linear
            b_Pl = tl.where((o_sk[None, :] < b_lo[:, None]) & m_sk[None, :], b_Pl, 0.0)
            b_lin += _mm_wide(b_Pl, _load_rows(v, row_k, o_sk, m_sk, o_v, m_v, HKV, DV))
            b_lden += tl.sum(b_Pl, 1)
        b_q = _load_rows(q, row_q, o_t, m_t, o_d, m_d, H, D)  # [BT, BD]
        b_m = tl.full([BT], float("-inf"), dtype=tl.float32)
        b_idx = tl.zeros([BT], dtype=tl.int32)
        b_l = tl.zeros([BT], dtype=tl.float32)
        b_acc = tl.zeros([BT, BV], dtype=tl.float32)
        for i_j in range(i_k, i_t + 1):
            o_s = i_j * BT + tl.arange(0, BT)
            m_s = o_s < T_n
            b_k = _load_rows(k, row_k, o_s, m_s, o_d, m_d, HKV, D)  # [BT, BD]
            b_vj = _load_rows(v, row_k, o_s, m_s, o_v, m_v, HKV, DV)  # [BT, BV]
            m_sm = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] >= b_lo[:, None]) & m_s[None, :]
            b_s = tl.where(m_sm, qk_scale * _mm(b_q, tl.trans(b_k)), float("-inf"))  # [BT, BT] fp32
            b_tmax = tl.max(b_s, 1)
            b_idx = tl.where(b_tmax > b_m, tl.argmax(b_s, 1).to(tl.int32) + i_j * BT, b_idx)
            b_mn = tl.maximum(b_m, b_tmax)
            b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # a row with no key yet: every term 0
            b_p = tl.exp(b_s - b_ms[:, None])  # [BT, BT] in [0, 1]
            b_r = tl.exp(b_m - b_ms)
            b_acc = b_acc * b_r[:, None] + _mm(b_p, b_vj)
            b_l = b_l * b_r + tl.sum(b_p, 1)
            b_m = b_mn
        b_L = f * b_l + g * scale * b_lden
        b_L = tl.where(m_t, b_L, 1.0)
        b_o = (f * b_acc + g * scale * b_lin) / b_L[:, None]
        _store_rows(o, b_o, row_q, o_t, m_t, o_v, m_v, H, DV)
        if i_v == 0:
            tl.store(den + p_st + o_t, b_L, mask=m_t)
            tl.store(mx + p_st + o_t, b_m, mask=m_t)
            tl.store(amx + p_st + o_t, b_idx, mask=m_t)


# ---- backward: dq (softmax part, with m's gradient), dq's linear part through phi's vjp, dm and dL ----
@triton.jit(do_not_specialize=["T", "NT"])
def hybrid_bwd_kernel_dq(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    fq,
    fk,
    mix,  # [H]
    o,  # [B, T, H, DV]
    do,  # [B, T, H, DV]
    den,  # [B, H, T] L
    mx,  # [B, H, T] m
    amx,  # [B, H, T] int32 argmax
    S,  # [B*HKV, NT, M, DV] the forward's chunk states (recomputed)
    z,  # [B*HKV, NT, M]
    dq,  # [B, T, H, D] fp32 out: the softmax part
    dql,  # [B, T, H, D] fp32 out: the linear part
    gl,  # [B, H, T] out: dL = -(do . o) / L
    dm,  # [B, H, T] out: dm
    dfq,  # [H, FMS] fp32, HAS_DFM only
    cu,
    cmap,
    scale,
    qk_scale,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    W: tl.constexpr,
    SLIDING: tl.constexpr,
    AFFINE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DFM: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, T_n, i_n, i_t = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    row_q = bos * H + i_h
    row_k = bos * HKV + i_hk
    p_fq = fq + i_h * fq_hs
    p_fk = fk + i_hk * fk_hs
    p_st = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN) + o_t
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_w = tl.arange(0, BDV)
    m_w = o_w < DV
    f, g = _mix_factors(mix, i_h, AFFINE)
    b_lo = _win_lo(o_t, W, SLIDING)
    i_k = _win_lo(i_t * BT, W, SLIDING) // BT
    b_rL = 1.0 / tl.load(den + p_st, mask=m_t, other=1.0)  # [BT]
    b_m = tl.load(mx + p_st, mask=m_t, other=0.0)
    b_idx = tl.load(amx + p_st, mask=m_t, other=0)
    b_do = _load_rows(do, row_q, o_t, m_t, o_w, m_w, H, DV)  # [BT, BDV]
    b_gl = -tl.sum(b_do * _load_rows(o, row_q, o_t, m_t, o_w, m_w, H, DV), 1) * b_rL  # [BT] dL
    tl.store(gl + p_st, b_gl, mask=m_t)
    b_q = _load_rows(q, row_q, o_t, m_t, o_d, m_d, H, D)  # [BT, BD]
    b_dq = tl.zeros([BT, BD], dtype=tl.float32)
    b_dms = tl.zeros([BT], dtype=tl.float32)
    b_dPl = tl.zeros([BT, BT], dtype=tl.float32)  # SLIDING: dP of chunk i_k's keys outside the rows' windows
    for i_j in range(i_k, i_t + 1):
        o_s = i_j * BT + tl.arange(0, BT)
        m_s = o_s < T_n
        b_k = _load_rows(k, row_k, o_s, m_s, o_d, m_d, HKV, D)  # [BT, BD]
        b_v = _load_rows(v, row_k, o_s, m_s, o_w, m_w, HKV, DV)  # [BT, BDV]
        b_dp = _mm(b_do, tl.trans(b_v)) * b_rL[:, None] + b_gl[:, None]  # [BT, BT] dP = dN . v + dL
        m_sm = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] >= b_lo[:, None]) & m_s[None, :] & m_t[:, None]
        # (masked before exp: a score outside the window may exceed the row's max)
        b_p = f * tl.exp(tl.where(m_sm, qk_scale * _mm(b_q, tl.trans(b_k)) - b_m[:, None], float("-inf")))
        b_ds = b_p * b_dp
        b_dms += tl.sum(b_ds, 1)
        b_dq += _mm_wide(b_ds, b_k)
        if SLIDING:
            if i_j == i_k:
                b_dPl = tl.where((o_s[None, :] < b_lo[:, None]) & m_s[None, :] & m_t[:, None], b_dp, 0.0)
    b_dm = -b_dms
    tl.store(dm + p_st, b_dm, mask=m_t)
    # m's gradient goes to the key that set it: dq_t += c dm_t k_(argmax_t)
    p_ki = k + ((bos + b_idx[:, None].to(tl.int64)) * HKV + i_hk) * D + o_d[None, :]
    b_dq += b_dm[:, None] * tl.load(p_ki, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    _store_rows(dq, qk_scale * b_dq, row_q, o_t, m_t, o_d, m_d, H, D)
    # the linear part, a feature block at a time: dL/da = g scale (dN S^T + dL z^T + intra), S before chunk i_k
    i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c - (i_t - i_k)
    o_sk = i_k * BT + tl.arange(0, BT)
    m_sk = o_sk < T_n
    if NMB > 1:
        b_dy = tl.zeros([BT, BDA], dtype=tl.float32)  # dL/dy' summed over the blocks (polynomial maps)
    for i_mb in range(0, NMB):
        o_mb = i_mb * BM + o_m
        m_mb = o_mb < M
        b_z = tl.load(z + i_s * M + o_mb, mask=m_mb, other=0.0)
        # do S^T in value blocks of BV (a whole [BM, DV] state block spilled at M = DV = 128)
        b_da = _rows_state_t(do, row_q, o_t, m_t, H, S, i_s, o_mb, m_mb, BV) * b_rL[:, None] \
            + b_gl[:, None] * b_z[None, :]  # [BT, BM]
        if SLIDING:
            b_da += _mm_wide(b_dPl, _phi_blk(k, row_k, o_sk, m_sk, HKV, p_fk, False, i_mb))
        if NMB == 1:
            _store_phi_vjp(dql, row_q, H, q, row_q, H, o_t, m_t, (g * scale) * b_da, p_fq, True, dfq + i_h * FMS,
                           HAS_DFM)
        else:
            b_dy = _phi_vjp_acc(b_dy, q, row_q, H, o_t, m_t, (g * scale) * b_da, p_fq, True, i_mb)
    if NMB > 1:
        _phi_vjp_store(b_dy, dql, row_q, H, q, row_q, H, o_t, m_t, p_fq, True, dfq + i_h * FMS, HAS_DFM)


# ---- backward: G_c = sum over the group's query heads of g scale a^T [dN, dL], the chunk sums the reverse
#      scan turns into dS_rev (one program per chunk slot and batch * kv head) ----
@triton.jit(do_not_specialize=["T", "NT"])
def hybrid_bwd_kernel_h(
    q,  # [B, T, H, D]
    fq,
    mix,
    do,  # [B, T, H, DV]
    den,  # [B, H, T] L
    gl,  # [B, H, T] dL
    dS,  # [B*HKV, NT, M, DV] out
    dz,  # [B*HKV, NT, M] out
    cu,
    cmap,
    scale,
    fq_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    AFFINE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_c, i_bs = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bs // HKV, i_bs % HKV
    bos, T_n, i_n, i_t = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_w = tl.arange(0, BDV)
    m_w = o_w < DV
    i_s = i_bs.to(tl.int64) * NT + i_c
    for i_mb in range(0, NMB):
        o_mb = i_mb * BM + o_m
        m_mb = o_mb < M
        b_S = tl.zeros([BM, BDV], dtype=tl.float32)
        b_z = tl.zeros([BM], dtype=tl.float32)
        for i_g in range(0, H // HKV):
            i_h = i_hk * (H // HKV) + i_g
            f, g = _mix_factors(mix, i_h, AFFINE)
            row_q, p_st, b_rL, b_gl = _query_rows(den, gl, i_b, i_h, bos, T, o_t, m_t, H, IS_VARLEN)
            b_a = _phi_blk(q, row_q, o_t, m_t, H, fq + i_h * fq_hs, True, i_mb)  # [BT, BM]
            b_S += (g * scale) * _mm_wide(tl.trans(b_a * b_rL[:, None]),
                                          _load_rows(do, row_q, o_t, m_t, o_w, m_w, H, DV))
            b_z += (g * scale) * tl.sum(b_a * b_gl[:, None], 0)
        tl.store(dS + (i_s * M + o_mb[:, None]) * DV + o_w[None, :], b_S, mask=m_mb[:, None] & m_w[None, :])
        tl.store(dz + i_s * M + o_mb, b_z, mask=m_mb)


# ---- backward: dk (softmax part), dv, dk's linear part through phi's vjp; one program per key chunk slot and
#      batch * kv head, walking the group's query heads and the query chunks whose windows hold the chunk ----
@triton.jit(do_not_specialize=["T", "NT"])
def hybrid_bwd_kernel_dkv(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, DV]
    fq,
    fk,
    mix,
    do,  # [B, T, H, DV]
    den,  # [B, H, T] L
    mx,  # [B, H, T] m
    amx,  # [B, H, T] int32
    gl,  # [B, H, T] dL
    dm,  # [B, H, T] dm
    dS,  # [B*HKV, NT, M, DV] dS_rev: after the reverse scan, slot c holds sum of G over the chunks after c
    dz,  # [B*HKV, NT, M]
    dk,  # [B, T, HKV, D] fp32 out: the softmax part
    dkl,  # [B, T, HKV, D] fp32 out: the linear part
    dv,  # [B, T, HKV, DV] fp32 out
    dfk,  # [HKV, FMS] fp32, HAS_DFM only
    cu,
    cmap,
    scale,
    qk_scale,
    fq_hs,
    fk_hs,
    T,
    NT,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    W: tl.constexpr,
    SLIDING: tl.constexpr,
    AFFINE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DFM: tl.constexpr,
):
    i_c, i_bs = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bs // HKV, i_bs % HKV
    bos, T_n, i_n, i_j = _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN)
    o_s = i_j * BT + tl.arange(0, BT)
    m_s = o_s < T_n
    row_k = bos * HKV + i_hk
    p_fk = fk + i_hk * fk_hs
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_w = tl.arange(0, BDV)
    m_w = o_w < DV
    R: tl.constexpr = W // BT
    n_c = tl.cdiv(T_n, BT)
    b_k = _load_rows(k, row_k, o_s, m_s, o_d, m_d, HKV, D)  # [BT, BD]
    b_v = _load_rows(v, row_k, o_s, m_s, o_w, m_w, HKV, DV)  # [BT, BDV]
    b_dk = tl.zeros([BT, BD], dtype=tl.float32)
    b_dv = tl.zeros([BT, BDV], dtype=tl.float32)
    if SLIDING:
        c_st = i_j + 1 + R  # the first query chunk whose state holds this chunk
        c_hi = i_j + R  # the last query chunk with this chunk's keys in a window
    else:
        c_st = (1 + (i_j + R) // R) * R
        c_hi = (i_j // R + 2) * R - 1
    # the softmax part: the query chunks whose windows hold this chunk's keys, for each query head of the group
    for i_g in range(0, H // HKV):
        i_h = i_hk * (H // HKV) + i_g
        f, g = _mix_factors(mix, i_h, AFFINE)
        for i_t in range(i_j, tl.minimum(c_hi, n_c - 1) + 1):
            o_t = i_t * BT + tl.arange(0, BT)
            m_t = o_t < T_n
            row_q, p_st, b_rL, b_gl = _query_rows(den, gl, i_b, i_h, bos, T, o_t, m_t, H, IS_VARLEN)
            b_lo = _win_lo(o_t, W, SLIDING)
            b_m = tl.load(mx + p_st, mask=m_t, other=0.0)
            b_idx = tl.load(amx + p_st, mask=m_t, other=-1)
            b_dmt = tl.load(dm + p_st, mask=m_t, other=0.0)
            b_q = _load_rows(q, row_q, o_t, m_t, o_d, m_d, H, D)  # [BT, BD]
            b_do = _load_rows(do, row_q, o_t, m_t, o_w, m_w, H, DV)  # [BT, BDV]
            # [BT keys, BT queries]
            m_sm = (o_s[:, None] <= o_t[None, :]) & (o_s[:, None] >= b_lo[None, :]) & m_s[:, None] & m_t[None, :]
            b_p = f * tl.exp(tl.where(m_sm, qk_scale * _mm(b_k, tl.trans(b_q)) - b_m[None, :], float("-inf")))
            b_dp = _mm(b_v, tl.trans(b_do)) * b_rL[None, :] + b_gl[None, :]  # dN_t . v_s + dL_t
            b_dv += _mm_wide(b_p, b_do * b_rL[:, None])
            b_ds = b_p * b_dp + tl.where(o_s[:, None] == b_idx[None, :], b_dmt[None, :], 0.0)
            b_dk += _mm_wide(b_ds, b_q)
    _store_rows(dk, qk_scale * b_dk, row_k, o_s, m_s, o_d, m_d, HKV, D)
    # dv's softmax part to the fp32 dv buffer; the linear part adds into it a value block at a time below (a whole
    # [BM, DV] state block beside the [BT, DV] tiles spilled at M = DV = 128)
    _store_rows(dv, b_dv, row_k, o_s, m_s, o_w, m_w, HKV, DV)
    tl.debug_barrier()
    # the linear part, a feature block at a time: through the states of the query chunks from c_st on, and (sliding)
    # the keys of this chunk that left the windows of query chunk i_j + R before its state holds them
    i_s = i_bs.to(tl.int64) * NT + i_c + (c_st - 1 - i_j)
    i_t = i_j + R
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T_n
    m_ln = (o_s[:, None] < _win_lo(o_t, W, SLIDING)[None, :]) & m_s[:, None] & m_t[None, :]  # [BT keys, BT queries]
    has_state = c_st - 1 < n_c
    has_intra = (i_t < n_c) & SLIDING  # (a runtime flag; always off for the terraced window)
    if NMB > 1:
        b_dy = tl.zeros([BT, BDA], dtype=tl.float32)
    for i_mb in range(0, NMB):
        o_mb = i_mb * BM + o_m
        m_mb = o_mb < M
        b_b = _phi_blk(k, row_k, o_s, m_s, HKV, p_fk, False, i_mb)  # [BT, BM]
        b_db = tl.zeros([BT, BM], dtype=tl.float32)
        if has_state:  # v dS^T + dz
            b_db += _rows_state_t(v, row_k, o_s, m_s, HKV, dS, i_s, o_mb, m_mb, BV) \
                + tl.load(dz + i_s * M + o_mb, mask=m_mb, other=0.0)[None, :]
        for i_v in range(0, tl.cdiv(DV, BV)):  # dv += b dS + (sliding) P_lin dN, a value block at a time
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < DV
            b_dvb = _load_rows(dv, row_k, o_s, m_s, o_v, m_v, HKV, DV)  # [BT, BV]
            if has_state:
                b_dvb += _mm_wide(b_b, tl.load(dS + (i_s * M + o_mb[:, None]) * DV + o_v[None, :],
                                               mask=m_mb[:, None] & m_v[None, :], other=0.0))
            if has_intra:
                for i_g in range(0, H // HKV):
                    i_h = i_hk * (H // HKV) + i_g
                    f, g = _mix_factors(mix, i_h, AFFINE)
                    row_q, p_st, b_rL, b_gl = _query_rows(den, gl, i_b, i_h, bos, T, o_t, m_t, H, IS_VARLEN)
                    b_a = _phi_blk(q, row_q, o_t, m_t, H, fq + i_h * fq_hs, True, i_mb)  # [BT, BM]
                    b_Pl = tl.where(m_ln, _mm(b_b, tl.trans(b_a)), 0.0) * (g * scale)
                    b_dvb += _mm_wide(b_Pl, _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV) * b_rL[:, None])
            _store_rows(dv, b_dvb, row_k, o_s, m_s, o_v, m_v, HKV, DV)
        tl.debug_barrier()  # the next feature block reads dv back
        if has_intra:  # db += g scale dP_lin a, dP = dN . v + dL (v do^T summed over value blocks)
            for i_g in range(0, H // HKV):
                i_h = i_hk * (H // HKV) + i_g
                f, g = _mix_factors(mix, i_h, AFFINE)
                row_q, p_st, b_rL, b_gl = _query_rows(den, gl, i_b, i_h, bos, T, o_t, m_t, H, IS_VARLEN)
                b_dp = tl.zeros([BT, BT], dtype=tl.float32)
                for i_v in range(0, tl.cdiv(DV, BV)):
                    o_v = i_v * BV + tl.arange(0, BV)
                    m_v = o_v < DV
                    b_dp += _mm(_load_rows(v, row_k, o_s, m_s, o_v, m_v, HKV, DV),
                                tl.trans(_load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)))
                b_dp = b_dp * b_rL[None, :] + b_gl[None, :]
                b_a = _phi_blk(q, row_q, o_t, m_t, H, fq + i_h * fq_hs, True, i_mb)  # [BT, BM]
                b_db += (g * scale) * _mm_wide(tl.where(m_ln, b_dp, 0.0), b_a)
        if NMB == 1:
            _store_phi_vjp(dkl, row_k, HKV, k, row_k, HKV, o_s, m_s, b_db, p_fk, False, dfk + i_hk * FMS, HAS_DFM)
        else:
            b_dy = _phi_vjp_acc(b_dy, k, row_k, HKV, o_s, m_s, b_db, p_fk, False, i_mb)
    if NMB > 1:
        _phi_vjp_store(b_dy, dkl, row_k, HKV, k, row_k, HKV, o_s, m_s, p_fk, False, dfk + i_hk * FMS, HAS_DFM)


# ---- decode: one token of the hybrid per (batch, kv head), in place. The token goes into its ring slot
#      (pos % C); each of the G query heads reads the window's slots (an online max over blocks of BC slots) and
#      (S, z); then the tokens the next query no longer sees (window_start(pos) .. window_start(pos + 1) - 1:
#      one for the sliding window, a block of W at a terraced block's end) are folded into (S, z) and their
#      slots zeroed. Everything is decided on the device: no value is read on the host (CUDA-graph safe). ----
@triton.jit
def hybrid_decode_kernel_step(
    q,  # [B, H, D]
    k,  # [B, HKV, D]
    v,  # [B, HKV, DV]
    fq,
    fk,
    mix,  # [H]
    o,  # [B, H, DV] out
    S,  # [B, HKV, M, DV] fp32, in place
    z,  # [B, HKV, M] fp32, in place
    kb,  # [B, HKV, C, D] the ring of keys, in place
    vb,  # [B, HKV, C, DV] the ring of values, in place
    pos,  # [B] int64: the tokens seen (read only: the launcher adds 1 after the kernel)
    scale,
    qk_scale,
    fq_hs,
    fk_hs,
    H: tl.constexpr,
    HKV: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    W: tl.constexpr,
    SLIDING: tl.constexpr,
    AFFINE: tl.constexpr,
):
    i_bs = tl.program_id(0).to(tl.int64)
    i_b, i_hk = i_bs // HKV, i_bs % HKV
    p_fk = fk + i_hk * fk_hs
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_w = tl.arange(0, BDV)
    m_w = o_w < DV
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_r = tl.arange(0, 16)  # a 16-row tile (tl.dot's least) with one real row, for a projected map's phi
    P = tl.load(pos + i_b)
    slot = P % C
    tl.store(kb + (i_bs * C + slot) * D + o_d, tl.load(k + i_bs * D + o_d, mask=m_d).to(kb.dtype.element_ty), mask=m_d)
    tl.store(vb + (i_bs * C + slot) * DV + o_w, tl.load(v + i_bs * DV + o_w, mask=m_w).to(vb.dtype.element_ty),
             mask=m_w)
    tl.debug_barrier()
    lo = _win_lo(P, W, SLIDING)
    nxt = _win_lo(P + 1, W, SLIDING)
    for i_v in range(0, tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        for i_g in range(0, H // HKV):
            i_h = i_hk * (H // HKV) + i_g
            row = i_b * H + i_h
            f, g = _mix_factors(mix, i_h, AFFINE)
            b_q = tl.load(q + row * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
            b_mr = tl.max(tl.full([BC], float("-inf"), dtype=tl.float32), 0)
            b_l = tl.sum(tl.zeros([BC], dtype=tl.float32), 0)
            b_acc = tl.zeros([BV], dtype=tl.float32)
            for c0 in range(0, C, BC):
                o_c = c0 + tl.arange(0, BC)  # slots
                m_c = (P - ((P - o_c + C) % C) >= lo) & (o_c < C)  # the slot's token is in the window
                b_k = tl.load(kb + (i_bs * C + o_c[:, None]) * D + o_d[None, :], mask=m_c[:, None] & m_d[None, :],
                              other=0.0).to(tl.float32)  # [BC, BD]
                b_s = tl.where(m_c, qk_scale * tl.sum(b_q[None, :] * b_k, 1), float("-inf"))  # [BC]
                b_mn = tl.maximum(b_mr, tl.max(b_s, 0))
                b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
                b_p = tl.exp(b_s - b_ms)
                b_vv = tl.load(vb + (i_bs * C + o_c[:, None]) * DV + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                               other=0.0).to(tl.float32)  # [BC, BV]
                b_r = tl.exp(b_mr - b_ms)
                b_acc = b_acc * b_r + tl.sum(b_p[:, None] * b_vv, 0)
                b_l = b_l * b_r + tl.sum(b_p, 0)
                b_mr = b_mn
            b_lin = tl.zeros([BV], dtype=tl.float32)
            b_lden = tl.sum(tl.zeros([BM], dtype=tl.float32), 0)
            for i_mb in range(0, NMB):  # a S and a z before the fold, a feature block at a time
                o_mb = i_mb * BM + o_m
                m_mb = o_mb < M
                b_a = tl.sum(_phi_blk(q, row, o_r, o_r == 0, 1, fq + i_h * fq_hs, True, i_mb), 0)  # [BM]
                b_S = tl.load(S + (i_bs * M + o_mb[:, None]) * DV + o_v[None, :], mask=m_mb[:, None] & m_v[None, :],
                              other=0.0)  # [BM, BV]
                b_lin += tl.sum(b_a[:, None] * b_S, 0)
                b_lden += tl.sum(b_a * tl.load(z + i_bs * M + o_mb, mask=m_mb, other=0.0), 0)
            b_num = f * b_acc + g * scale * b_lin
            b_den = f * b_l + g * scale * b_lden
            tl.store(o + row * DV + o_v, (b_num / b_den).to(o.dtype.element_ty), mask=m_v)
        # every warp has read this value block of S for the outputs before any writes the fold into it (a thread
        # may hold other elements of a tile in the fold's layout than in the reads')
        tl.debug_barrier()
        for i_mb in range(0, NMB):  # fold the tokens that leave into this value block of S
            o_mb = i_mb * BM + o_m
            m_mb = o_mb < M
            p_S = S + (i_bs * M + o_mb[:, None]) * DV + o_v[None, :]
            b_S = tl.load(p_S, mask=m_mb[:, None] & m_v[None, :], other=0.0)
            for c0 in range(lo, nxt, BC):
                o_t = c0 + tl.arange(0, BC)
                m_l = o_t < nxt
                b_b = _phi_blk(kb, i_bs * C, o_t % C, m_l, 1, p_fk, False, i_mb)  # [BC, BM]
                b_S += _mm(tl.trans(b_b), _load_rows(vb, i_bs * C, o_t % C, m_l, o_v, m_v, 1, DV))
            tl.store(p_S, b_S, mask=m_mb[:, None] & m_v[None, :])
    tl.debug_barrier()  # every value block has read z
    for i_mb in range(0, NMB):
        o_mb = i_mb * BM + o_m
        m_mb = o_mb < M
        b_z = tl.load(z + i_bs * M + o_mb, mask=m_mb, other=0.0)
        for c0 in range(lo, nxt, BC):
            o_t = c0 + tl.arange(0, BC)
            b_z += tl.sum(_phi_blk(kb, i_bs * C, o_t % C, o_t < nxt, 1, p_fk, False, i_mb), 0)
        tl.store(z + i_bs * M + o_mb, b_z, mask=m_mb)
    tl.debug_barrier()
    for c0 in range(lo, nxt, BC):  # their slots are emptied, as a call leaves them
        o_sl = (c0 + tl.arange(0, BC)) % C
        m_l = c0 + tl.arange(0, BC) < nxt
        tl.store(kb + (i_bs * C + o_sl[:, None]) * D + o_d[None, :],
                 tl.zeros([BC, BD], dtype=tl.float32).to(kb.dtype.element_ty), mask=m_l[:, None] & m_d[None, :])
        tl.store(vb + (i_bs * C + o_sl[:, None]) * DV + o_w[None, :],
                 tl.zeros([BC, BDV], dtype=tl.float32).to(vb.dtype.element_ty), mask=m_l[:, None] & m_w[None, :])
