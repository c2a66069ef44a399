"""PyTorch implementations: the float64 reference and the O(T) chunked ``torch`` backend.

:func:`linear_attention_reference` is written straight from the equations
(prefix sums of outer products, O(T * M * DV) memory): it is what every kernel
is checked against, never fast. :func:`linear_attention_torch` is the chunked
algorithm of the kernels in plain PyTorch (fp32, differentiable by autograd):
the ``backend="torch"`` path on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .feature_maps import FeatureMap

__all__ = ["linear_attention_reference", "linear_attention_torch", "linear_attention_step_torch",
           "linear_attention_step_torch_"]


def linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    *,
    causal: bool = True,
    normalize: bool = True,
    scale: float = 1.0,
    eps: float = 1e-6,
    initial_state: Optional[tuple[Tensor, Tensor]] = None,
    absolute: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """The equations, evaluated in ``dtype`` (float64 by default).

    S_t = S_0 + sum_{s<=t} phi(k_s) v_s^T,  z_t = z_0 + sum_{s<=t} phi(k_s),
    num_t = scale * phi(q_t)^T S_t,  den_t = scale * phi(q_t)^T z_t + eps,
    o_t = num_t / den_t if normalize else num_t (causal=False: sums over every s).

    With ``absolute=True`` every factor is replaced by its absolute value
    (|v|, |S_0|, |z_0|, and :meth:`FeatureMap.magnitude` for phi: |phi|, or an envelope for
    maps that cross zero): the result bounds the magnitude of the terms that are summed,
    which is what a rounding-error bound scales with.

    Returns ``o [B, T, H, DV], (S_T [B, H, M, DV], z_T [B, H, M]), num, den``
    (num and den as [B, T, H, DV] and [B, T, H]).
    """
    phi = fm.magnitude if absolute else fm.features
    a = phi(q.to(dtype), "query", stabilize=normalize)  # [B, T, H, M]
    G = q.shape[2] // k.shape[2]  # grouped-query heads: each kv head serves G query heads
    b = _repeat_heads(phi(k.to(dtype), "key"), G, 2)
    vv = _repeat_heads(v.to(dtype), G, 2)
    B, T, H, M = a.shape
    DV = v.shape[-1]
    if initial_state is not None:
        S0, z0 = (_repeat_heads(x.to(dtype), G, 1) for x in initial_state)
    else:
        S0 = a.new_zeros(B, H, M, DV)
        z0 = a.new_zeros(B, H, M)
    if absolute:
        # |x| whose derivative is +-1 also at 0 (torch's abs has 0 there): the bound's gradient must
        # not vanish where a factor happens to be 0
        vv, S0, z0 = (x * torch.where(x >= 0, 1.0, -1.0).to(x.dtype) for x in (vv, S0, z0))
    kv = torch.einsum("bthm,bthv->bthmv", b, vv)
    if causal:
        S = S0[:, None] + kv.cumsum(1)  # [B, T, H, M, DV]
        z = z0[:, None] + b.cumsum(1)  # [B, T, H, M]
    else:
        S = (S0 + kv.sum(1))[:, None].expand(B, T, H, M, DV)
        z = (z0 + b.sum(1))[:, None].expand(B, T, H, M)
    num = scale * torch.einsum("bthm,bthmv->bthv", a, S)
    den = scale * torch.einsum("bthm,bthm->bth", a, z) + eps
    o = num / den[..., None] if normalize else num
    S_T = (S0 + kv.sum(1))[:, ::G]  # the state of each kv head (its G copies are equal)
    z_T = (z0 + b.sum(1))[:, ::G]
    return o, (S_T, z_T), num, den


def _repeat_heads(x: Tensor, G: int, dim: int) -> Tensor:
    return x if G == 1 else x.repeat_interleave(G, dim)


def linear_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    *,
    causal: bool = True,
    normalize: bool = True,
    scale: float = 1.0,
    eps: float = 1e-6,
    initial_state: Optional[tuple[Tensor, Tensor]] = None,
    chunk: int = 64,
):
    """The chunked algorithm in PyTorch, fp32, O(T) memory; differentiable.

    Returns ``o [B, T, H, DV]`` in the inputs' dtype and ``(S_T, z_T)`` in fp32.
    """
    B, T, H, _ = q.shape
    DV = v.shape[-1]
    f32 = torch.float32
    G = H // k.shape[2]
    a = fm.features(q.to(f32), "query", stabilize=normalize).transpose(1, 2)  # [B, H, T, M]
    b = _repeat_heads(fm.features(k.to(f32), "key"), G, 2).transpose(1, 2)
    vv = _repeat_heads(v.to(f32), G, 2).transpose(1, 2)  # [B, H, T, DV]
    M = a.shape[-1]
    if initial_state is not None:
        S0, z0 = (_repeat_heads(x.to(f32), G, 1) for x in initial_state)
    else:
        S0 = a.new_zeros(B, H, M, DV)
        z0 = a.new_zeros(B, H, M)
    if T == 0:
        # an empty output still hangs off the inputs (as the custom op's does), so autograd can run through it
        o = q.new_zeros(B, 0, H, DV) + 0 * (q.sum() + k.sum() + v.sum()).to(q.dtype)
        return o, (S0[:, ::G], z0[:, ::G])
    # The normalizer rides along as one more value column: [v, 1] gives num and den in the same products (and
    # [S0, z0] the state), instead of separate row sums of the scores and of a * z.
    S0 = torch.cat([S0, z0[..., None]], -1)  # [B, H, M, DV + 1]
    if not causal:
        v1 = torch.cat([vv, vv.new_ones(B, H, T, 1)], -1)
        S = S0 + b.transpose(-1, -2) @ v1
        out = a @ S  # [B, H, T, DV + 1]
    else:
        # chunks of C tokens (no longer than the sequence: a short call pads nothing)
        C = min(chunk, T)
        N = -(-T // C)
        # one copy each into the chunked layout [B, H, N, C, *], zero-padded to N * C tokens
        a1, b1 = (x.new_zeros(B, H, N * C, M) for x in (a, b))
        v1 = vv.new_zeros(B, H, N * C, DV + 1)
        a1[:, :, :T], b1[:, :, :T] = a, b
        v1[:, :, :T, :DV] = vv
        v1[:, :, :T, DV] = 1.0
        a, b, v1 = (x.view(B, H, N, C, x.shape[-1]) for x in (a1, b1, v1))
        kv = b.transpose(-1, -2) @ v1  # [B, H, N, M, DV + 1] chunk sums
        # the state before each chunk: an exclusive prefix sum (not S_incl - kv, which leaves rounding noise
        # where the exact state is 0)
        S_c = S0[:, :, None] + torch.nn.functional.pad(kv[:, :, :-1], (0, 0, 0, 0, 1, 0)).cumsum(2)
        P = (a @ b.transpose(-1, -2)).tril_()  # [B, H, N, C, C]
        out = torch.baddbmm((a @ S_c).view(-1, C, DV + 1), P.view(-1, C, C), v1.view(-1, C, DV + 1))
        out = out.view(B, H, N * C, DV + 1)[:, :, :T]
        S = S_c[:, :, -1] + kv[:, :, -1]
    num, den = scale * out[..., :DV], scale * out[..., DV] + eps
    o = num / den[..., None] if normalize else num
    return o.transpose(1, 2).to(q.dtype), (S[:, ::G, :, :DV], S[:, ::G, :, DV])


def linear_attention_step_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    *,
    normalize: bool = True,
    scale: float = 1.0,
    eps: float = 1e-6,
    state: Optional[tuple[Tensor, Tensor]] = None,
):
    """One token of the RNN form in PyTorch (fp32): q [B, H, D], k [B, HKV, D], v [B, HKV, DV] -> o, (S, z).

    The new state is a copy of ``state`` (zeros when None) updated in place by
    :func:`linear_attention_step_torch_`; differentiable."""
    B, HKV = k.shape[:2]
    M, DV = fm.feature_dim(q.shape[-1]), v.shape[-1]
    if state is None:
        S = torch.zeros(B, HKV, M, DV, device=q.device)
        z = torch.zeros(B, HKV, M, device=q.device)
    else:
        S, z = (x.to(torch.float32, copy=True) for x in state)
    o = linear_attention_step_torch_(q, k, v, fm, S, z, normalize=normalize, scale=scale, eps=eps)
    return o, (S, z)


def linear_attention_step_torch_(q: Tensor, k: Tensor, v: Tensor, fm: FeatureMap, S: Tensor, z: Tensor, *,
                                 normalize: bool = True, scale: float = 1.0, eps: float = 1e-6) -> Tensor:
    """:func:`linear_attention_step_torch` updating the fp32 state (S [B, HKV, M, DV], z [B, HKV, M]) in place:
    one rank-1 update of S where it lies and two batched products, no new state (the decode hot path).

    Each torch call costs about 3 us of dispatch on a 2-core CPU, as much as reading the whole state at B = 1, so
    the body makes as few as the arithmetic needs (bench/NOTES.md, issue #17): no dtype conversion of fp32 inputs,
    no multiplication by a scale of 1, the normalizer's eps added in place."""
    f32 = torch.float32
    B, H, _ = q.shape
    HKV, M, DV = S.shape[1:]
    dtype = q.dtype
    if dtype != f32:
        q, k, v = q.to(f32), k.to(f32), v.to(f32)
    a = fm.features(q, "query", stabilize=normalize)  # [B, H, M]
    b = fm.features(k, "key")  # [B, HKV, M]
    S.addcmul_(b[..., :, None], v[..., None, :])
    z.add_(b)
    BH = B * HKV
    a = a.reshape(BH, H // HKV, M)  # the group's query heads share their kv head's state
    o = torch.bmm(a, S.view(BH, M, DV))  # [B*HKV, G, DV]
    if normalize:
        den = torch.bmm(a, z.view(BH, M, 1))  # [B*HKV, G, 1]
        if scale != 1.0:
            o, den = o.mul_(scale), den.mul_(scale)
        o = o.div_(den.add_(eps))
    elif scale != 1.0:
        o = o.mul_(scale)
    o = o.view(B, H, DV)
    return o if dtype == f32 else o.to(dtype)
