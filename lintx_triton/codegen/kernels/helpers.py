"""Shared helpers: products, row loads and stores, and where a program's tokens are."""
import triton
import triton.language as tl

from .constants import DOT_FP32, ELEM, FEAT_TF32, WIDE_TF32

# %% kernels (the renderer joins what follows; the lines above are for editors and linters)


@triton.jit
def _mm(a, b):
    # [P, Q] @ [Q, R] -> [P, R], fp32 accumulation
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif FEAT_TF32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return tl.dot(a.to(ELEM), b.to(ELEM))


@triton.jit
def _mm_wide(a, b):
    # [P, Q] @ [Q, R] where a or b is fp32 of unbounded range: a state (grows with T), scores, or
    # values scaled by 1 / den (shrink with T). Cast to fp16 they would overflow or underflow.
    if WIDE_TF32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return _mm(a, b)


@triton.jit
def _load_rows(ptr, row0, o_t, m_t, o_c, m_c, H: tl.constexpr, W: tl.constexpr):
    # rows o_t, columns o_c of one (batch, head) of a [B, T, H, W] tensor -> [BT, BC] fp32, 0 outside
    p = ptr + (row0 + o_t[:, None].to(tl.int64) * H) * W + o_c[None, :]
    return tl.load(p, mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, row0, o_t, m_t, o_c, m_c, H: tl.constexpr, W: tl.constexpr):
    p = ptr + (row0 + o_t[:, None].to(tl.int64) * H) * W + o_c[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])



# ---- where a program's tokens are. Batched: q [B, T, H, D]; packed (IS_VARLEN): B = 1, sequence n holds tokens
#      cu[n] .. cu[n+1] of the T, and chunk slot c holds chunk cmap[c, 1] of sequence cmap[c, 0] (an idle slot
#      points past its sequence's end, so every mask is off). Tokens live on the flattened [B*T] axis. ----
@triton.jit
def _seq(i_n, T, cu, IS_VARLEN: tl.constexpr):
    # sequence i_n -> (its first token on the [B*T] axis, its length)
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        return bos, tl.load(cu + i_n + 1).to(tl.int64) - bos
    else:
        return i_n.to(tl.int64) * T, T


@triton.jit
def _chunk(i_c, i_b, T, cu, cmap, IS_VARLEN: tl.constexpr):
    # chunk slot i_c of batch row i_b -> (first token, length, sequence index) of its sequence, and the
    # chunk's index inside it
    if IS_VARLEN:
        i_n = tl.load(cmap + 2 * i_c).to(tl.int64)
        bos, T_n = _seq(i_n, T, cu, IS_VARLEN)
        return bos, T_n, i_n, tl.load(cmap + 2 * i_c + 1)
    else:
        bos, T_n = _seq(i_b, T, cu, IS_VARLEN)
        return bos, T_n, i_b.to(tl.int64), i_c


@triton.jit
def _den_offset(i_b, i_h, bos, T, H: tl.constexpr, IS_VARLEN: tl.constexpr):
    # offset of a sequence's first token in the [B, H, T] den / g buffers (packed: B = 1, row i_h, column bos)
    if IS_VARLEN:
        return i_h.to(tl.int64) * T + bos
    else:
        return (i_b.to(tl.int64) * H + i_h) * T
