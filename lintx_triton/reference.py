"""PyTorch implementations: the float64 reference and the O(T) ``torch`` backend.

:func:`linear_attention_reference` is written straight from the equations
(prefix sums of outer products, O(T * M * DV) memory): it is what every kernel
is checked against, never fast. :func:`linear_attention_torch` is the ``backend="torch"``
path (fp32, differentiable): on a CPU the causal products run as a recurrence in C
(:class:`_RecurrentCausal`, :mod:`lintx_triton.native`), elsewhere as the chunked algorithm of
the kernels in plain PyTorch with a hand-written chunked backward (:class:`_ChunkedCausal`).
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

from . import native
from .feature_maps import FeatureMap

__all__ = ["linear_attention_reference", "linear_attention_torch", "linear_attention_step_torch",
           "linear_attention_step_torch_", "clear_workspace"]


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
    """The ``torch`` backend: fp32, O(T) memory; differentiable.

    Causal on CPU tensors (computed in fp32; the native code built and on, nothing tracing): the recurrence in C
    (:class:`_RecurrentCausal`, :mod:`lintx_triton.native`; phi and phi' of a built-in map are applied there
    too). Elsewhere the chunked algorithm in PyTorch (``chunk`` tokens a chunk): the feature map (and the heads'
    repetition for grouped queries) under autograd, the causal chunked products in :class:`_ChunkedCausal`, with
    a hand-written backward.

    Returns ``o [B, T, H, DV]`` in the inputs' dtype and ``(S_T, z_T)`` in fp32.
    """
    B, T, H, _ = q.shape
    DV = v.shape[-1]
    f32 = torch.float32
    G = H // k.shape[2] if k.shape[2] else 1
    qf, kf, vf = q.to(f32), k.to(f32), v.to(f32)
    states = tuple(x.to(f32) for x in initial_state) if initial_state is not None else ()
    # causal on a CPU (in fp32): causal.c's recurrence (lintx_triton.native), not the chunked products; under
    # torch.compile, a tracer or transform (native._traced), on another device, or with the native code off or
    # unbuilt: the chunked products
    recurrent = (causal and T > 0 and not torch.compiler.is_compiling()
                 and native.causal_eligible(qf, kf, vf, *states))
    inference = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *states)))
    if recurrent and native.fused_map(fm):
        # a built-in elementwise map: phi (and under autograd phi') applied in the C
        S0 = _with_z(*(_repeat_heads(x, G, 1) for x in states)) if states else None
        if inference:  # the grouped heads read in place there too
            o, _, S = native.causal_forward(qf, kf, vf, S0, fm, normalize=normalize, scale=float(scale),
                                            eps=float(eps))
        else:  # the keys' heads repeated under autograd (its backward sums a group's gradients)
            o, S = _RecurrentCausal.apply(qf, _repeat_heads(kf, G, 2), _repeat_heads(vf, G, 2), S0, normalize,
                                          float(scale), float(eps), fm)
        return o.to(q.dtype), (S[:, ::G, :, :DV], S[:, ::G, :, DV])
    a = fm.features(qf, "query", stabilize=normalize)  # [B, T, H, M]
    b = _repeat_heads(fm.features(kf, "key"), G, 2)
    vv = _repeat_heads(vf, G, 2)  # [B, T, H, DV]
    M = a.shape[-1]
    if states:
        S0, z0 = (_repeat_heads(x, G, 1) for x in states)
    else:
        S0 = a.new_zeros(B, H, M, DV)
        z0 = a.new_zeros(B, H, M)
    if T == 0:
        # an empty output still hangs off the inputs (as the custom op's does), so autograd can run through it
        o = q.new_zeros(B, 0, H, DV) + 0 * (q.sum() + k.sum() + v.sum()).to(q.dtype)
        return o, (S0[:, ::G], z0[:, ::G])
    # The normalizer rides along as one more value column: [v, 1] gives num and den in the same products (and
    # [S0, z0] the state), instead of separate row sums of the scores and of a * z.
    S0 = _with_z(S0, z0)  # [B, H, M, DV + 1]
    if recurrent and native.causal_eligible(a, b):  # (a map's features in another dtype: the chunked products)
        o, S = _RecurrentCausal.apply(a, b, vv, S0, normalize, float(scale), float(eps), None)
    elif causal:
        # chunks of C tokens (no longer than the sequence: a short call pads nothing)
        # without autograd (inference) the chunked buffers are carved from a per-thread workspace kept between
        # calls (_workspace_buffers): fresh 16 MB buffers cost page faults on every call
        # (plain tensors, nothing tracing: a FakeTensor cannot land in a real buffer, nor a graph hold one)
        reuse = not (torch.is_grad_enabled() and any(x.requires_grad for x in (a, b, vv, S0)))
        reuse = reuse and not torch.compiler.is_compiling() and native._plain(a, b, vv, S0)
        o, S = _ChunkedCausal.apply(a, b, vv, S0, min(chunk, T), normalize, float(scale), float(eps), reuse)
    else:
        a, b = a.transpose(1, 2), b.transpose(1, 2)  # [B, H, T, M]
        v1 = torch.cat([vv, vv.new_ones(B, T, H, 1)], -1).transpose(1, 2)
        S = S0 + b.transpose(-1, -2) @ v1
        out = a @ S  # [B, H, T, DV + 1]
        num, den = scale * out[..., :DV], scale * out[..., DV] + eps
        o = (num / den[..., None] if normalize else num).transpose(1, 2)
    return o.to(q.dtype), (S[:, ::G, :, :DV], S[:, ::G, :, DV])


def _with_z(S: Tensor, z: Tensor) -> Tensor:
    """The state as the causal paths hold it: ``[B, H, M, DV + 1]``, z as the last column."""
    return torch.cat([S, z[..., None]], -1)


class _RecurrentCausal(torch.autograd.Function):
    """The causal products in C (:func:`lintx_triton.native.causal_forward` and ``causal_backward``):
    ``(a, b [B, T, H, M], v [B, T, H, DV], S0 [B, H, M, DV + 1] or None)`` -> ``(o [B, T, H, DV], S_T [B, H, M,
    DV + 1])``, fp32, as :class:`_ChunkedCausal`; a and b are the features, or with a built-in map ``fm`` q and k
    themselves (phi and phi' applied in the C). The backward needs o and r = scale / den from the forward (o is
    saved as torch's own ops save their outputs: changing it in place before the backward is an error)."""

    @staticmethod
    def forward(ctx, a, b, v, S0, normalize, scale, eps, fm):
        o, r, S = native.causal_forward(a, b, v, S0, fm, normalize=normalize, scale=scale, eps=eps, want_r=True)
        ctx.save_for_backward(a, b, v, S0, o, r)
        ctx.normalize, ctx.scale, ctx.fm = normalize, scale, fm
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        a, b, v, S0, o, r = ctx.saved_tensors
        da, db, dv, dS0 = native.causal_backward(a, b, v, S0, o, r, do, dS, ctx.fm, normalize=ctx.normalize,
                                                 scale=ctx.scale)
        return da, db, dv, dS0 if ctx.needs_input_grad[3] else None, None, None, None, None


def _chunk_views(x: Tensor, C: int):
    """``x [B, T, H, W]`` as views ``[n, B, H, c, W]`` of its whole chunks of C tokens and of its last partial
    chunk: a list of (view, the chunks it covers, c)."""
    B, T, H, W = x.shape
    NF = T // C
    parts = []
    if NF:
        parts.append((x[:, :NF * C].view(B, NF, C, H, W).permute(1, 0, 3, 2, 4), slice(0, NF), C))
    if T > NF * C:
        parts.append((x[:, NF * C:, None].permute(2, 0, 3, 1, 4), slice(NF, NF + 1), T - NF * C))
    return parts


def _to_chunks(x: Tensor, C: int, ones: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """``x [B, T, H, W]`` copied once into the chunked layout ``[N, B, H, C, W (+ 1 column of ones)]``, the
    tokens past T zero (into ``out`` when given). Chunk-major, so that each chunk's products and states are one
    contiguous batch."""
    B, T, H, W = x.shape
    N = -(-T // C)
    out = x.new_empty(N, B, H, C, W + ones) if out is None else out
    if T % C:
        out[-1].zero_()
    for view, n, c in _chunk_views(x, C):
        out[n, :, :, :c, :W].copy_(view)
    if ones:
        out[..., W].fill_(1.0)
    return out


def _from_chunks(x: Tensor, T: int, plus: Optional[Tensor] = None) -> Tensor:
    """The inverse of :func:`_to_chunks`: ``[N, B, H, C, W]`` -> ``[B, T, H, W]`` (the padding dropped); with
    ``plus`` (shaped as x), of x + plus."""
    N, B, H, C, W = x.shape
    out = x.new_empty(B, T, H, W)
    for view, n, c in _chunk_views(out, C):
        view.copy_(x[n, :, :, :c])
        if plus is not None:  # in place, not torch.add(out=view): torch.compile takes no strided out=
            view.add_(plus[n, :, :, :c])
    return out


_WORKSPACE = threading.local()  # .buf: {dtype: this thread's flat CPU buffer}, grown to the largest call
_WORKSPACE_MAX = 1 << 26  # elements (256 MiB of fp32): a larger call allocates its buffers afresh


def clear_workspace() -> None:
    """Free this thread's inference workspace of the chunked CPU forward (kept between calls, up to 256 MiB of
    fp32 per dtype: the largest call's chunked buffers); the next call allocates it again."""
    if getattr(_WORKSPACE, "buf", None):
        _WORKSPACE.buf.clear()


def _workspace_buffers(like: Tensor, shapes, reuse: bool) -> list:
    """Empty tensors of ``shapes`` (``like``'s dtype and device): views of one per-thread buffer kept between calls
    on a CPU when ``reuse`` (the caller keeps none of them past its call, and runs no other call meanwhile on this
    thread), else fresh ones. glibc serves buffers of 16 MB from mmap or trims them from the heap's top when freed,
    so each forward faulted its pages in again: 4-25 thousand faults, 10-65 ms of system time against 85-105 ms
    of user time at B*T = 8192, H = 8, D = 64, 1 thread; more at 2 threads (bench/NOTES.md)."""
    sizes = [math.prod(s) for s in shapes]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + -(-n // 16) * 16)  # 64-byte aligned views
    if not reuse or like.device.type != "cpu" or offsets[-1] > _WORKSPACE_MAX:
        return [like.new_empty(s) for s in shapes]
    bufs = getattr(_WORKSPACE, "buf", None)
    if bufs is None:
        bufs = _WORKSPACE.buf = {}
    key = like.dtype
    buf = bufs.get(key)
    if buf is None or buf.numel() < offsets[-1]:
        bufs.pop(key, None)  # free the old one first
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = bufs[key] = torch.empty(offsets[-1], dtype=like.dtype)
    return [buf[o:o + n].view(s) for o, n, s in zip(offsets, sizes, shapes)]


class _ChunkedCausal(torch.autograd.Function):
    """The causal chunked products on features: ``(a, b [B, T, H, M], v [B, T, H, DV], S0 [B, H, M, DV + 1])`` ->
    ``(o [B, T, H, DV], S_T [B, H, M, DV + 1])``, fp32, the normalizer as the last state column.

    Per chunk n of C tokens (A, B, V1 = [v, 1] its rows): S_n = S0 + sum_{m<n} B_m^T V1_m,
    out_n = A_n S_n + tril(A_n B_n^T) V1_n, o = scale out[:DV] / (scale out[DV] + eps) (the forward takes
    out[DV] = tril(P_n) 1 + A_n z_n from one product A_n [B_n; z_n^T]^T). The backward, with
    dout the gradient of out and G_n = dS_T + sum_{m>n} A_m^T dout_m the gradient of chunk n's B_n^T V1_n:
    dP_n = tril(dout_n V1_n^T), dA_n = dout_n S_n^T + dP_n B_n, dB_n = V1_n G_n^T + dP_n^T A_n,
    dV_n = B_n G_n + P_n^T dout_n, dS0 = G_0 + A_0^T dout_0. Every product is one batched matmul over all
    (chunk, batch, head) at once; the states' prefix sums are N in-place adds of [B, H, M, DV + 1] (faster than
    torch.cumsum over a non-inner dimension)."""

    @staticmethod
    def forward(ctx, a, b, v, S0, C, normalize, scale, eps, reuse=False):
        B, T, H, M = a.shape
        DV = v.shape[-1]
        N = -(-T // C)
        NBH = N * B * H
        A, V1, Bz, S, Pz, out = _workspace_buffers(a, [
            (N, B, H, C, M), (N, B, H, C, DV + 1), (N, B, H, C + 1, M), (N + 1, B, H, M, DV + 1), (NBH, C, C + 1),
            (NBH, C, DV)], reuse)
        _to_chunks(v, C, ones=True, out=V1)  # [N, B, H, C, *]
        # the keys with one more row per chunk, z_n (the normalizer's state before chunk n), so that one product
        # A_n [B_n; z_n^T]^T gives the scores P_n and A_n z_n: den = rowsum(tril(P_n)) + A_n z_n, and the
        # products for num stay DV wide: MKL is slow on a 65-wide output (A S + P V1 at DV + 1 = 65 columns: 28.6
        # ms, at 64 from the same buffers: 21.3; the 65-wide [P | A z]: 13.3 against 11.7 ms; [1024, 64, 64]
        # batches, 1 thread, bench/NOTES.md)
        Bk = Bz[..., :C, :]  # [N, B, H, C, M], a view (the backward's B_n)
        _to_chunks(a, C, out=A), _to_chunks(b, C, out=Bk)
        A3, B3, V3 = A.view(NBH, C, M), Bk.view(NBH, C, M), V1.view(NBH, C, DV + 1)
        # S[n]: the state before chunk n (S[N]: after the last), [N + 1, B, H, M, DV + 1]
        S[0].copy_(S0)
        torch.bmm(B3.transpose(1, 2), V3, out=S[1:].view(NBH, M, DV + 1))  # chunk sums
        for n in range(N):  # an exclusive prefix sum: exact where the state is 0
            S[n + 1].add_(S[n])
        Bz[..., C, :].copy_(S[:N, ..., DV])
        torch.bmm(A3, Bz.view(NBH, C + 1, M).transpose(1, 2), out=Pz)  # [NBH, C, C + 1]: [P | A z]
        P = Pz[..., :C].tril_()  # [NBH, C, C], a view
        torch.bmm(A3, S[:N].view(NBH, M, DV + 1)[..., :DV], out=out).baddbmm_(P, V3[..., :DV])
        out = out.view(N, B, H, C, DV)
        # o = out * r with r = scale / den ([N, B, H, C, 1]), written straight into [B, T, H, DV]
        r = Pz.sum(-1).view(N, B, H, C, 1).mul_(scale).add_(eps).reciprocal_().mul_(scale) if normalize else None
        o = a.new_empty(B, T, H, DV)
        for view, n, c in _chunk_views(o, C):  # in place, not out=: torch.compile takes no strided out=
            view.copy_(out[n, :, :, :c]).mul_(r[n, :, :, :c] if normalize else scale)
        if not reuse:  # (with reuse nothing needs a gradient: there is no backward to save for)
            ctx.save_for_backward(A, Bk, V1, S, P, out, r)
        ctx.C, ctx.normalize, ctx.scale = C, normalize, scale
        # a copy, not a view of the saved states: a custom Function's view outputs cannot be modified in place,
        # and the returned state is one a decode step updates in place
        return o, S[N].clone()

    @staticmethod
    def backward(ctx, do, dS):
        A, Bk, V1, S, P, out, r = ctx.saved_tensors
        C, normalize, scale = ctx.C, ctx.normalize, ctx.scale
        need_a, need_b, need_v, need_s = ctx.needs_input_grad[:4]
        N, B, H, _, M = A.shape
        DV = V1.shape[-1] - 1
        T = do.shape[1]
        NBH = N * B * H
        A3, B3, V3 = (x.view(NBH, C, x.shape[-1]) for x in (A, Bk, V1))
        # dout [N, B, H, C, DV + 1]: the gradient of out through o = scale out[:DV] / (scale out[DV] + eps)
        dout = _to_chunks(do.float(), C, ones=True)
        if normalize:
            # d/dout[DV] = -scale^2 sum(do * out[:DV]) / den^2 = -sum(do * out[:DV]) r^2
            dden = torch.linalg.vecdot(dout[..., :DV], out[..., :DV])[..., None].mul_(r).mul_(r).neg_()
            dout[..., :DV].mul_(r)
            dout[..., DV:].copy_(dden)
        else:
            dout[..., :DV].mul_(scale)
            dout[..., DV].zero_()
        D3 = dout.view(NBH, C, DV + 1)
        da = db = dv = dS0 = None
        if need_b or need_v or need_s:
            # Gs[n] = dS_T + sum_{m>=n} A_m^T dout_m: chunk n's B_n^T V1_n gets Gs[n + 1], S0 gets Gs[0]
            Gs = A.new_empty(N + 1, B, H, M, DV + 1)
            torch.bmm(A3.transpose(1, 2), D3, out=Gs[:N].view(NBH, M, DV + 1))
            Gs[N].copy_(dS)
            for n in range(N - 1, -1, -1):
                Gs[n].add_(Gs[n + 1])
            G3 = Gs[1:].view(NBH, M, DV + 1)
            dS0 = Gs[0] if need_s else None
        # each gradient is two products summed where it is copied out of the chunked layout (two bmm into
        # reused buffers and an add: baddbmm_ is slower on the CPU than bmm)
        W = max(M, DV + 1)
        X, Y = (A.new_empty(NBH * C * W) for _ in range(2))
        buf = lambda x, w: x[:NBH * C * w].view(NBH, C, w)  # noqa: E731
        if need_a or need_b:
            dP = torch.bmm(D3, V3.transpose(1, 2)).tril_()  # [NBH, C, C]
            if need_a:
                x = torch.bmm(D3, S[:N].view(NBH, M, DV + 1).transpose(1, 2), out=buf(X, M))
                y = torch.bmm(dP, B3, out=buf(Y, M))
                da = _from_chunks(x.view(N, B, H, C, M), T, y.view(N, B, H, C, M))
            if need_b:
                x = torch.bmm(V3, G3.transpose(1, 2), out=buf(X, M))
                y = torch.bmm(dP.transpose(1, 2), A3, out=buf(Y, M))
                db = _from_chunks(x.view(N, B, H, C, M), T, y.view(N, B, H, C, M))
        if need_v:
            x = torch.bmm(B3, G3, out=buf(X, DV + 1)).view(N, B, H, C, DV + 1)
            y = torch.bmm(P.transpose(1, 2), D3, out=buf(Y, DV + 1)).view(N, B, H, C, DV + 1)
            dv = _from_chunks(x[..., :DV], T, y[..., :DV])
        return da, db, dv, dS0, None, None, None, None, None


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
