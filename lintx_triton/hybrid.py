r"""Sliding-window softmax + linear attention (LoLCATs' hybrid) in PyTorch: the float64 quadratic reference,
the O(T) chunked ``backend="torch"`` path, and the in-place decode step.

The hybrid (Zhang et al. 2024, "LoLCATs"), per query head h, for a query at position t:

    a_sm(t, s) = f_h exp(c q_t.k_s - m_t)        for s in the window of t (causal), m_t = max_s of c q_t.k_s there
    a_ln(t, s) = g_h scale phi(q_t)^T phi(k_s)   for every earlier s outside the window
    o_t = (sum_s (a_sm + a_ln)(t, s) v_s + g_h scale phi(q_t)^T S_0)
          / (sum_s (a_sm + a_ln)(t, s) + g_h scale phi(q_t)^T z_0)

with f_h = sigmoid(alpha_h) (``window_mix`` = alpha, one per query head), g_h = 1 (LoLCATs' default) or
g_h = 1 - f_h (``affine=True``, LoLCATs' ``affine_attention_factors``), c the softmax scale (1/sqrt(D) by
default), ``scale`` the factor on phi(q)^T phi(k) (1 by default, as LoLCATs has none), and (S_0, z_0) the
linear state of a preceding segment. m_t is not a free stabilizer: the linear part is not multiplied by
exp(-m_t), so m_t sets the balance between the two parts and must be exactly the row's window maximum. A
kernel with an online (running) max must keep the linear part apart from its rescaled softmax accumulator (or
rescale it with every change of the max) and join the two with the final m_t only; here the max of the whole
window row is taken first, so no term exceeds f_h and scores of any size (1e3 and more) do not overflow. No eps is added: the denominator holds f_h exp(0) from the row maximum.
``phi(q)`` is taken without the per-query stabilization of :func:`lintx_triton.linear_attention` (which
cancels there in num / den, and would not cancel here).

Windows (``kind``), with positions counted from a sequence's first token:

* ``"terraced"`` (LoLCATs' training form): tokens are cut in blocks of w; a query in block c sees blocks
  c - 1 and c in softmax form (causally), everything before block c - 1 in linear form. LoLCATs builds the
  mask for a multiple of w and crops it to the last T rows, the same thing whenever T is a multiple of w
  (otherwise a token's window would depend on the total length, which a causal model must not); and for
  T <= w its ``torch.roll`` wraps the single block onto itself, so the linear mask covers every earlier token
  too. This module follows the formula, not those artifacts.
* ``"sliding"``: a query sees the last w tokens (itself included) in softmax form, everything earlier in
  linear form (LoLCATs' decode step).

The resumable state (:class:`WindowState`) after P tokens of a sequence: ``S [N, HKV, M, DV]`` and
``z [N, HKV, M]`` (float32), the linear state of the tokens that left the window (those before
``window_start(P)``, the first token the next query sees); ``k [N, HKV, C, D]`` and ``v [N, HKV, C, DV]`` (the
inputs' dtype), a ring buffer holding tokens ``window_start(P) .. P - 1``, token s in slot ``s % C``, with
C = 2w (terraced) or w (sliding), the other slots zero; and ``pos [N]`` (int64), P. That is exactly what a decode
step needs; a call with ``return_state=True`` returns it, and a call or a step from it continues the sequence
as if it had never been cut. A plain pair ``(S_0, z_0)`` is also taken: a state with an empty window at P = 0,
i.e. a preceding segment seen in linear form only, with blocks counted from this call's first token (LoLCATs'
``kv_state``/``k_state`` in ``hybrid_attention_quadratic``).

Implementations: :func:`hybrid_attention_reference` (float64, quadratic: what everything is checked against);
:func:`hybrid_attention_torch` (chunked PyTorch, autograd; ``backend="torch"``, the CPU's default) and
:func:`hybrid_step_torch_`; and the fused Triton kernels (``lintx_triton/codegen/kernels/hybrid.py``, the ops
``lintx::hybrid_attention_fwd`` / ``_bwd`` / ``_step_``; ``backend="triton"``, the default on CUDA, for every
map family within the kernels' limits) behind :func:`hybrid_attention_triton`, which puts a state's window tokens in front of their
sequence (positions then count from ``window_start(pos)``, a block boundary for the terraced window) and runs the
kernels on the extended sequences with (S, z) as the linear initial state. Their decode step decides everything
on the device (CUDA-graph safe); the PyTorch step decides a terraced fold on the host.

Source: HazyResearch/lolcats at commit 375df84f58417a57b78c875fa3f8fa76e84ab12e,
``src/model/linear_attention/linear_window_attention_tk.py``: ``get_masks`` (lines 25-43: the terraced masks,
``block_diag`` + ``torch.roll``, cropped to the last rows), ``hybrid_attention_quadratic`` (lines 46-84: scores
times ``k.shape[-1] ** -0.5``, the row max ``a_sm_max``, ``window_factor * exp``, ``linear_factor`` on
phi(q)^T phi(k), the prior ``kv_state``/``k_state`` added with ``linear_factor``), the window factors
(lines 113-121: ``init_window_factor * torch.ones(1, num_heads, 1, 1)``, a parameter when trained; the
distillation configs, e.g. ``configs/model/distill_llama3_8b_lk_smd_wtk64_fd64_w01.yaml`` line 19, set
``init_window_factor: -2.1972245773362196`` = logit(0.1)), ``sigmoid`` and ``affine_attention_factors``
(lines 155-156: ``linear_factors = 1 - window_factors if self.affine_attention_factors else 1``), and the decode
step over the last ``window_size`` keys (lines 180-195, cache update lines 316-342).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_maps import FeatureMap

__all__ = ["KINDS", "WINDOW_MULTIPLE", "MAX_WINDOW", "WindowState", "window_capacity", "window_start",
           "window_masks", "empty_window_state", "check_window", "hybrid_attention_reference",
           "hybrid_attention_torch", "hybrid_step_torch_", "hybrid_attention_triton", "hybrid_attention",
           "hybrid_attention_step"]

KINDS = ("terraced", "sliding")
#: w must be a multiple of this (the kernels' smallest tile) and at most MAX_WINDOW
WINDOW_MULTIPLE = 16
MAX_WINDOW = 1024


class WindowState(NamedTuple):
    """The resumable state of the hybrid after ``pos`` tokens (see the module doc): the linear state of the
    tokens that left the window, and a ring buffer of the window's keys and values."""

    S: Tensor  # [N, HKV, M, DV] float32
    z: Tensor  # [N, HKV, M] float32
    k: Tensor  # [N, HKV, C, D] the inputs' dtype; token s in slot s % C
    v: Tensor  # [N, HKV, C, DV]
    pos: Tensor  # [N] int64: tokens seen


def window_capacity(window: int, kind: str) -> int:
    """C, the ring buffer's slots: 2w for the terraced window (a block and the previous one), w for sliding."""
    return 2 * window if kind == "terraced" else window


def window_start(pos, window: int, kind: str):
    """The first token a query at ``pos`` sees in softmax form (an int, or elementwise on an int64 tensor)."""
    if kind == "terraced":
        s = (pos // window - 1) * window
    else:
        s = pos - window + 1
    return s.clamp(min=0) if isinstance(s, Tensor) else max(0, s)


def window_masks(pos_q: Tensor, pos_k: Tensor, window: int, kind: str) -> tuple[Tensor, Tensor]:
    """(softmax mask, linear mask), bool ``[Tq, Tk]``, from absolute positions of queries and keys."""
    pq, pk = pos_q[:, None], pos_k[None, :]
    causal = pk <= pq
    sm = causal & (pk >= window_start(pq, window, kind))
    return sm, causal & ~sm


def empty_window_state(batch: int, kv_heads: int, M: int, D: int, DV: int, window: int, kind: str,
                       dtype: torch.dtype = torch.float32, device=None) -> WindowState:
    """A zero :class:`WindowState` (no token seen), for :func:`hybrid_step_torch_` and the in-place steps."""
    C = window_capacity(window, kind)
    return WindowState(torch.zeros(batch, kv_heads, M, DV, device=device),
                       torch.zeros(batch, kv_heads, M, device=device),
                       torch.zeros(batch, kv_heads, C, D, dtype=dtype, device=device),
                       torch.zeros(batch, kv_heads, C, DV, dtype=dtype, device=device),
                       torch.zeros(batch, dtype=torch.int64, device=device))


def check_window(window, kind, window_mix, H: int, device, affine, window_scale) -> None:
    """Raise ValueError/TypeError for window arguments the hybrid does not take."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int (the softmax window w), got {type(window).__name__}")
    if window < WINDOW_MULTIPLE or window % WINDOW_MULTIPLE or window > MAX_WINDOW:
        raise ValueError(f"window must be a multiple of {WINDOW_MULTIPLE} between {WINDOW_MULTIPLE} and "
                         f"{MAX_WINDOW}, got {window}")
    if kind not in KINDS:
        raise ValueError(f"window_kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(affine, bool):
        raise TypeError(f"window_affine must be a bool, got {type(affine).__name__}")
    if window_scale is not None and (isinstance(window_scale, bool) or not isinstance(window_scale, (int, float))):
        raise TypeError(f"window_scale must be a real number or None (1/sqrt(D)), got {type(window_scale).__name__}")
    if window_mix is None:
        return
    if not isinstance(window_mix, Tensor):
        raise TypeError(f"window_mix must be a torch.Tensor of shape [H] (alpha, f = sigmoid(alpha)), got "
                        f"{type(window_mix).__name__}")
    if tuple(window_mix.shape) != (H,):
        raise ValueError(f"window_mix must have shape [H] = [{H}] (one alpha per query head), got "
                         f"{tuple(window_mix.shape)}")
    if not window_mix.is_floating_point():
        raise TypeError(f"window_mix must be a floating-point tensor, got {window_mix.dtype}")
    if window_mix.device != device:
        raise ValueError(f"window_mix is on {window_mix.device}, q on {device}")


def _check_state(state, B: int, HKV: int, M: int, D: int, DV: int, window: int, kind: str, dtype, device):
    """A WindowState (or a pair (S, z)) for a call or step with these shapes -> a WindowState."""
    if isinstance(state, (tuple, list)) and len(state) == 2 and not isinstance(state, WindowState):
        S, z = state
        for name, t, shape in (("S", S, (B, HKV, M, DV)), ("z", z, (B, HKV, M))):
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
                raise ValueError(f"initial_state {name} must be a float32 tensor of shape {list(shape)}, got "
                                 f"{type(t).__name__ if not isinstance(t, Tensor) else (t.dtype, tuple(t.shape))}")
        C = window_capacity(window, kind)
        dtype = dtype if dtype is not None else torch.float32
        return WindowState(S, z, S.new_zeros(B, HKV, C, D, dtype=dtype), S.new_zeros(B, HKV, C, DV, dtype=dtype),
                           torch.zeros(B, dtype=torch.int64, device=S.device))
    if not isinstance(state, WindowState):
        raise TypeError(f"the hybrid's state must be a lintx_triton.hybrid.WindowState (or a pair (S, z) of a "
                        f"linear-only prefix), got {type(state).__name__}")
    C = window_capacity(window, kind)
    shapes = dict(S=(B, HKV, M, DV), z=(B, HKV, M), k=(B, HKV, C, D), v=(B, HKV, C, DV), pos=(B,))
    dtypes = dict(S=torch.float32, z=torch.float32, k=dtype, v=dtype, pos=torch.int64)
    for name in WindowState._fields:
        t = getattr(state, name)
        want = dtypes[name] if dtypes[name] is not None else getattr(t, "dtype", None)
        if not isinstance(t, Tensor) or tuple(t.shape) != shapes[name] or t.dtype != want:
            got = (t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"state.{name} must be {dtypes[name]} of shape {list(shapes[name])} (window {window}, "
                             f"{kind}: {C} slots), got {got}")
        if t.device != device:
            raise ValueError(f"state.{name} is on {t.device}, q on {device}")
    return state


def _starting_state(initial_state, q, k, v, fm, window: int, kind: str, buffer_dtype) -> WindowState:
    """The state a call starts from: ``initial_state`` checked (a pair made a WindowState), or an empty one."""
    B, _, _, D = q.shape
    HKV, DV, M = k.shape[2], v.shape[-1], fm.feature_dim(D)
    if initial_state is None:
        return empty_window_state(B, HKV, M, D, DV, window, kind, k.dtype, q.device)
    return _check_state(initial_state, B, HKV, M, D, DV, window, kind, buffer_dtype, q.device)


def _factors(window_mix: Tensor, affine: bool, dtype, absolute: bool = False):
    """(f, g) per query head [H]: f = sigmoid(alpha), g = 1 or 1 - f. With ``absolute`` g = 1 - f keeps its value
    but gets the derivative +f(1 - f) (magnitudes add up in a bound, they do not cancel)."""
    alpha = window_mix.to(dtype)
    f = torch.sigmoid(alpha)
    if not affine:
        return f, torch.ones_like(f)
    return f, torch.sigmoid(alpha - 2 * alpha.detach()) if absolute else 1 - f


def _window_tokens(state: WindowState, window: int, kind: str, row: int = 0):
    """The window tokens a state holds, in position order: (k [B, n, HKV, D], v [B, n, HKV, DV], P, start)."""
    P = int(state.pos[row])
    start = window_start(P, window, kind)
    C = state.k.shape[2]
    slots = torch.arange(start, P, device=state.k.device) % C
    return state.k[:, :, slots].transpose(1, 2), state.v[:, :, slots].transpose(1, 2), P, start


def _ring(x: Tensor, start: int, C: int) -> Tensor:
    """Tokens ``x [B, n, HKV, *]`` at positions start .. start + n - 1 placed in a zero ring buffer
    [B, HKV, C, *] (slot = position % C); differentiable."""
    B, n, HKV = x.shape[:3]
    buf = x.new_zeros(B, HKV, C, x.shape[-1])
    if n == 0:
        return buf + 0 * x.sum()
    return buf.index_copy(2, torch.arange(start, start + n, device=x.device) % C, x.transpose(1, 2))


def _rows_apart(fn, q, k, v, state, **kw):
    """Run ``fn`` row by row when the rows of a state are at different positions; -> (o, WindowState)."""
    outs, states = [], []
    for b in range(q.shape[0]):
        st = WindowState(*(x[b:b + 1] for x in state))
        o, s, *_ = fn(q[b:b + 1], k[b:b + 1], v[b:b + 1], initial_state=st, **kw)
        outs.append(o)
        states.append(s)
    return torch.cat(outs), WindowState(*(torch.cat(x) for x in zip(*states)))


def _sign(x: Tensor) -> Tensor:
    # +-1 also at 0, so that a bound's derivative does not vanish where a factor is 0
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def hybrid_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    window_mix: Tensor,
    *,
    window: int,
    kind: str = "terraced",
    affine: bool = False,
    window_scale: Optional[float] = None,
    scale: float = 1.0,
    initial_state=None,
    absolute: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """The hybrid's formula (module doc) evaluated quadratically in ``dtype`` (float64 by default): full
    [T, T_window + T] score matrices and masks from absolute positions. What the chunked path, the decode
    step and the kernels are checked against; never fast.

    With ``absolute=True`` every factor is replaced by its magnitude (|v|, |S_0|, |z_0|, ``fm.magnitude`` for
    phi) and each softmax term f exp(c q.k_s - m_t) (value held fixed) by itself times 1 + X, X =
    c |q|.|k_s| + c |q|.|k_max|: the rounding error of the exponent's argument is X times the unit roundoff.
    Its derivative with respect to q and k is (1 + X) dX, the magnitude of a gradient term through the
    exponential times that same relative error. The result bounds what a rounding-error bound scales with (as
    :func:`lintx_triton.reference.linear_attention_reference`). ``absolute="softmax"`` or ``"linear"``: the
    magnitudes of one part alone (the other's terms zero; the state is the linear part's): the derivatives of
    the two parts can have opposite signs (|q| against phi(q)), so a gradient bound adds the two parts'
    gradients in magnitude rather than taking the magnitude of their sum.

    Args:
        q ``[B, T, H, D]``, k ``[B, T, HKV, D]``, v ``[B, T, HKV, DV]``, window_mix ``[H]``; initial_state a
        :class:`WindowState`, a pair (S_0, z_0), or None.

    Returns:
        ``o [B, T, H, DV], WindowState (S, z in dtype), num [B, T, H, DV], den [B, T, H]``.
    """
    B, T, H, D = q.shape
    HKV, DV = k.shape[2], v.shape[-1]
    # (the buffer's dtype is free here: float64 inputs may continue a float32 call's state)
    state = _starting_state(initial_state, q, k, v, fm, window, kind, None)
    if B > 1 and bool((state.pos != state.pos[0]).any()):
        o, st = _rows_apart(hybrid_attention_reference, q, k, v, state, fm=fm, window_mix=window_mix, window=window,
                            kind=kind, affine=affine, window_scale=window_scale, scale=scale, absolute=absolute,
                            dtype=dtype)
        return o, st, None, None
    if T == 0:
        o = q.new_zeros(B, 0, H, DV, dtype=dtype)
        return o, WindowState(state.S.to(dtype), state.z.to(dtype), *state[2:]), o, o[..., 0]
    c = float(window_scale) if window_scale is not None else D ** -0.5
    kw, vw, P0, base = _window_tokens(state, window, kind)
    kx, vx = torch.cat([kw, k], 1).to(dtype), torch.cat([vw, v], 1).to(dtype)  # [B, L, HKV, *]
    L = kx.shape[1]
    G = H // HKV
    rep = lambda x: x.repeat_interleave(G, 2) if G > 1 else x  # noqa: E731  (kv heads -> query heads)
    qd = q.to(dtype)
    phi = fm.magnitude if absolute else fm.features
    a = phi(qd, "query")  # [B, T, H, M]
    b = phi(kx, "key")  # [B, L, HKV, M]
    S0, z0 = (x.to(dtype) for x in state[:2])
    vv = vx
    if absolute:
        vv, S0, z0 = (x * _sign(x) for x in (vx, S0, z0))
    # f and g written out here, not taken from _factors (which the chunked path and the step use), so that a
    # mistake there cannot hide in both
    f = torch.sigmoid(window_mix.to(dtype))
    g = (1 - f if not absolute else _factors(window_mix, True, dtype, True)[1]) if affine else torch.ones_like(f)
    f, g = f[None, :, None, None], g[None, :, None, None]  # [1, H, 1, 1]
    pos_q = torch.arange(P0, P0 + T, device=q.device)
    pos_k = torch.arange(base, base + L, device=q.device)
    sm, ln = window_masks(pos_q, pos_k, window, kind)  # [T, L]
    s = c * torch.einsum("bthd,bshd->bhts", qd, rep(kx))  # [B, H, T, L]
    s = s.masked_fill(~sm, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)  # 0 outside the window
    if absolute:
        qk = c * torch.einsum("bthd,bshd->bhts", qd * _sign(qd), rep(kx * _sign(kx)))
        X = qk + qk.gather(-1, s.detach().argmax(-1, keepdim=True))  # + the |q|.|k| of the maximum's key
        # value 1 + X, derivative (1 + X) dX: a gradient term through exp carries the exponent's relative
        # error u X besides its own (first order alone, dX, would leave that product out)
        Xd = X.detach()
        e = e.detach() * (1 + Xd + (X - Xd) * (1 + Xd))
    e = e.masked_fill(~sm, 0.0)
    p = scale * torch.einsum("bthm,bshm->bhts", a, rep(b)).masked_fill(~ln, 0.0)
    if absolute == "softmax":  # the softmax terms alone (a gradient bound sums the parts' magnitudes)
        p, S0, z0 = p * 0, S0 * 0, z0 * 0
    elif absolute == "linear":
        e = e * 0
    w_ = f * e + g * p  # [B, H, T, L]
    num = torch.einsum("bhts,bshv->bthv", w_, rep(vv)) \
        + (g * scale * torch.einsum("bthm,bhmv->bhtv", a, _rep_state(S0, G))).transpose(1, 2)
    den = w_.sum(-1).transpose(1, 2) + (g[..., 0] * scale * torch.einsum("bthm,bhm->bht", a, _rep_state(z0, G))
                                        ).transpose(1, 2)
    o = num / den[..., None]
    # the state after P0 + T tokens: tokens before window_start(P0 + T) leave for (S, z)
    P1 = P0 + T
    n_lin = window_start(P1, window, kind) - base
    S = S0 + torch.einsum("bthm,bthv->bhmv", b[:, :n_lin], vv[:, :n_lin])
    z = z0 + b[:, :n_lin].sum(1)
    C = window_capacity(window, kind)
    start1 = window_start(P1, window, kind)
    st = WindowState(S, z, _ring(torch.cat([kw, k], 1)[:, n_lin:], start1, C),
                     _ring(torch.cat([vw, v], 1)[:, n_lin:], start1, C), state.pos + T)
    return o, st, num, den


def _rep_state(x: Tensor, G: int) -> Tensor:
    """A per-kv-head state [B, HKV, ...] repeated for the G query heads of each group: [B, H, ...]."""
    return x.repeat_interleave(G, 1) if G > 1 else x


def hybrid_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    window_mix: Tensor,
    *,
    window: int,
    kind: str = "terraced",
    affine: bool = False,
    window_scale: Optional[float] = None,
    scale: float = 1.0,
    initial_state=None,
):
    """The chunked hybrid in PyTorch (fp32, differentiable by autograd), chunk = w.

    Per chunk j of w tokens, one [w, 2w] score tile over chunks j - 1 and j with the window's mask gives the
    softmax part (its exact row max first, then exp); the linear part is phi(q) times the state of chunks
    <= j - 2 (an exclusive prefix sum of per-chunk sums, delayed by one chunk), plus, for the sliding window,
    the part of chunk j - 1 that has left a row's window (the tile's complementary mask). Memory
    O(T (w + M + DV)) per head plus the chunk states [T / w, M, DV + 1]; never a T x T tensor.

    Returns ``o [B, T, H, DV]`` in q's dtype and the :class:`WindowState` after the call (S, z in float32).
    """
    B, T, H, D = q.shape
    HKV, DV = k.shape[2], v.shape[-1]
    M = fm.feature_dim(D)
    f32 = torch.float32
    state = _starting_state(initial_state, q, k, v, fm, window, kind, k.dtype)
    if B > 1 and bool((state.pos != state.pos[0]).any()):
        return _rows_apart(hybrid_attention_torch, q, k, v, state, fm=fm, window_mix=window_mix, window=window,
                           kind=kind, affine=affine, window_scale=window_scale, scale=scale)
    if T == 0:  # nothing moves; the output still hangs off the inputs, so autograd can run through it. The state
        # is a copy: an in-place step on what a call returned must not write into its initial_state
        return (q.new_zeros(B, 0, H, DV) + 0 * (q.sum() + k.sum() + v.sum()).to(q.dtype),
                WindowState(*(x.clone() for x in state)))
    c = float(window_scale) if window_scale is not None else D ** -0.5
    kw, vw, P0, base = _window_tokens(state, window, kind)
    n0 = kw.shape[1]  # window tokens carried in; the chunks are aligned on position ``base`` (a multiple of w
    # for the terraced window: chunks are its blocks)
    kx, vx = torch.cat([kw, k], 1), torch.cat([vw, v], 1)  # [B, L, HKV, *]
    L = n0 + T
    C = window
    N = max(1, -(-L // C))
    G = H // HKV
    # [B, h, N, C, *] fp32, zero-padded: n0 query rows in front (no query there), N C - L rows at the end.
    # phi is taken before padding: phi(0) need not be 0.
    chunked = lambda x, front: F.pad(x.to(f32), (0, 0, 0, 0, front, N * C - front - x.shape[1])) \
        .transpose(1, 2).reshape(B, x.shape[2], N, C, x.shape[-1])  # noqa: E731
    a = chunked(fm.features(q.to(f32), "query"), n0)  # [B, H, N, C, M]
    qc = chunked(q, n0)  # [B, H, N, C, D]
    b = chunked(fm.features(kx.to(f32), "key"), 0)  # [B, HKV, N, C, M]
    v1 = chunked(torch.cat([vx.to(f32), vx.new_ones(B, L, HKV, 1, dtype=f32)], -1), 0)  # [B, HKV, N, C, DV+1]
    kc = chunked(kx, 0)
    # the linear part: the state of chunks <= j - 2 (exclusive prefix sum, shifted by one more chunk)
    S0 = torch.cat([state.S, state.z[..., None]], -1).to(f32)  # [B, HKV, M, DV + 1]
    kv = b.transpose(-1, -2) @ v1  # [B, HKV, N, M, DV + 1]
    S_lin = S0[:, :, None] + F.pad(kv, (0, 0, 0, 0, 2, 0))[:, :, :N].cumsum(2)
    rep = lambda x: x.repeat_interleave(G, 1) if G > 1 else x  # noqa: E731
    out_ln = a @ rep(S_lin)  # [B, H, N, C, DV + 1]
    prev = lambda x: F.pad(x[:, :, :-1], (0, 0, 0, 0, 1, 0))  # noqa: E731  (chunk j - 1 at j; zeros at 0)
    i = torch.arange(C, device=q.device)[:, None]
    j = torch.arange(2 * C, device=q.device)[None, :]
    rel = j - C  # a tile key's position relative to the chunk's first token
    if kind == "terraced":
        sm = rel <= i
    else:
        sm = (rel <= i) & (rel > i - C)
        ln = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device))  # chunk j - 1's keys s <= t - w
        P = (a @ rep(prev(b)).transpose(-1, -2)).masked_fill(~ln, 0.0)  # [B, H, N, C, C]
        out_ln = out_ln + P @ rep(prev(v1))
    sm = sm.expand(N, C, 2 * C).clone()
    sm[0, :, :C] = False  # chunk 0 has no previous chunk
    k2 = rep(torch.cat([prev(kc), kc], 3))  # [B, H, N, 2C, D]
    v2 = rep(torch.cat([prev(v1), v1], 3))[..., :DV]  # [B, H, N, 2C, DV]
    s = (c * qc @ k2.transpose(-1, -2)).masked_fill(~sm, float("-inf"))  # [B, H, N, C, 2C]
    e = torch.exp(s - s.amax(-1, keepdim=True))  # the exact row max over the window: every term <= 1
    f, g = _factors(window_mix, affine, f32)
    f, g = f[None, :, None, None, None], g[None, :, None, None, None]
    num = f * (e @ v2) + g * scale * out_ln[..., :DV]
    den = f * e.sum(-1, keepdim=True) + g * scale * out_ln[..., DV:]
    o = (num / den).reshape(B, H, N * C, DV)[:, :, n0:n0 + T].transpose(1, 2).to(q.dtype)
    # the state after P0 + T tokens
    P1 = P0 + T
    start1 = window_start(P1, window, kind)
    n_lin = start1 - base
    bl = b.reshape(B, HKV, N * C, M)[:, :, :n_lin]
    vl = v1.reshape(B, HKV, N * C, DV + 1)[:, :, :n_lin]
    S1 = S0 + bl.transpose(-1, -2) @ vl
    Cap = window_capacity(window, kind)
    st = WindowState(S1[..., :DV].contiguous(), S1[..., DV].contiguous(), _ring(kx[:, n_lin:], start1, Cap),
                     _ring(vx[:, n_lin:], start1, Cap), state.pos + T)
    return o, st


def hybrid_step_torch_(q: Tensor, k: Tensor, v: Tensor, fm: FeatureMap, window_mix: Tensor, state: WindowState, *,
                       window: int, kind: str = "terraced", affine: bool = False,
                       window_scale: Optional[float] = None, scale: float = 1.0) -> Tensor:
    """One token of the hybrid: q ``[B, H, D]``, k ``[B, HKV, D]``, v ``[B, HKV, DV]`` -> o ``[B, H, DV]``,
    updating ``state`` (a :class:`WindowState`) in place: the token is written into its ring slot, the output
    read from the window's slots and (S, z), then the tokens the next query no longer sees are folded into
    (S, z) (one token per step for the sliding window, a block of w at the end of each block for the
    terraced one, from the keys kept in the buffer). Rows may be at different positions. No new state. The
    terraced fold is decided on the host (one ``any()`` of the rows' positions): this PyTorch step cannot be
    captured in a CUDA graph."""
    f32 = torch.float32
    S, z, kb, vb, pos = state
    B, H, D = q.shape
    HKV, Cap = kb.shape[1], kb.shape[2]
    DV = vb.shape[-1]
    G = H // HKV
    c = float(window_scale) if window_scale is not None else D ** -0.5
    rows = torch.arange(B, device=q.device)
    kb[rows, :, pos % Cap] = k.to(kb.dtype)
    vb[rows, :, pos % Cap] = v.to(vb.dtype)
    slots = torch.arange(Cap, device=q.device)
    tok = pos[:, None] - ((pos[:, None] - slots) % Cap)  # [B, Cap]: the token each slot holds
    start = window_start(pos, window, kind)
    seen = (tok >= start[:, None])[:, None, None, :]  # [B, 1, 1, Cap]
    qg = q.to(f32).reshape(B, HKV, G, D)
    s = (c * qg @ kb.to(f32).transpose(-1, -2)).masked_fill(~seen, float("-inf"))  # [B, HKV, G, Cap]
    e = torch.exp(s - s.amax(-1, keepdim=True))
    a = fm.features(q.to(f32), "query").reshape(B, HKV, G, -1)  # [B, HKV, G, M]
    f, g = _factors(window_mix, affine, f32)
    f, g = f.view(1, HKV, G, 1), g.view(1, HKV, G, 1)
    num = f * (e @ vb.to(f32)) + g * scale * (a @ S)
    den = f * e.sum(-1, keepdim=True) + g * scale * (a @ z[..., None])
    o = (num / den).view(B, H, DV).to(q.dtype)
    # fold the tokens that leave: window_start(pos) .. window_start(pos + 1) - 1
    nxt = window_start(pos + 1, window, kind)
    leave = nxt > start  # [B]
    if kind == "sliding":
        sl = start % Cap
        kk, vv = kb[rows, :, sl].to(f32), vb[rows, :, sl].to(f32)  # [B, HKV, D], [B, HKV, DV]
        bk = fm.features(kk, "key") * leave[:, None, None]  # [B, HKV, M]
        S.addcmul_(bk[..., :, None], vv[..., None, :])
        z.add_(bk)
        keep = (~leave)[:, None, None]  # an emptied slot is zero, as a call leaves it
        kb[rows, :, sl] = kb[rows, :, sl] * keep
        vb[rows, :, sl] = vb[rows, :, sl] * keep
    elif bool(leave.any()):
        idx = start[:, None] % Cap + torch.arange(window, device=q.device)  # [B, w]: the leaving block's slots
        kk, vv = kb[rows[:, None], :, idx].to(f32), vb[rows[:, None], :, idx].to(f32)  # [B, w, HKV, *]
        bk = fm.features(kk, "key") * leave[:, None, None, None]  # [B, w, HKV, M]
        S.add_(torch.einsum("bthm,bthv->bhmv", bk, vv))
        z.add_(bk.sum(1))
        keep = (~leave)[:, None, None, None]
        kb[rows[:, None], :, idx] = kb[rows[:, None], :, idx] * keep
        vb[rows[:, None], :, idx] = vb[rows[:, None], :, idx] * keep
    pos.add_(1)
    return o


def _linear_prefix(kx, vx, n_lin, S0, z0, fm, cu=None) -> tuple[Tensor, Tensor]:
    """(S0, z0) plus the linear sums of the first ``n_lin`` tokens of each sequence (an int, or a list per packed
    sequence): the state that a hybrid call leaves, through the Triton state op (differentiable)."""
    from .api import _map_params

    fk = _map_params(fm, kx.device)["fk"]
    if cu is None:
        kk, vv, cc = kx[:, :n_lin], vx[:, :n_lin], None
    else:
        bounds = cu.tolist()
        idx = torch.cat([torch.arange(s, s + n, device=kx.device) for s, n in zip(bounds[:-1], n_lin)]
                        + [torch.zeros(0, dtype=torch.int64, device=kx.device)])
        kk, vv = kx[:, idx], vx[:, idx]
        cc = torch.tensor([0] + list(n_lin), device=kx.device).cumsum(0).to(cu.dtype)
    return tuple(torch.ops.lintx.linear_attention_state(k=kk.contiguous(), v=vv.contiguous(), S0=S0, z0=z0, fk=fk,
                                                        cu_seqlens=cc, feature_map=fm.name))


def hybrid_attention_triton(q: Tensor, k: Tensor, v: Tensor, fm: FeatureMap, window_mix: Tensor, *, window: int,
                            kind: str = "terraced", affine: bool = False, window_scale: Optional[float] = None,
                            scale: float = 1.0, initial_state=None, cu_seqlens: Optional[Tensor] = None,
                            return_state: bool = True):
    """The hybrid through the fused Triton kernels (``lintx::hybrid_attention_fwd`` and its backward): returns
    ``o`` and, with ``return_state``, the :class:`WindowState` after the call (else None).

    A state's window tokens (the ring buffer) are put in front of their sequence's tokens, and the kernels run on
    the extended sequences, positions counted from the window's first token ``window_start(pos)`` (a block
    boundary for the terraced window, so its blocks stay aligned), with (S, z) as the linear initial state; their
    outputs are dropped. The state after the call is (S, z) plus the tokens that left the window (the state op)
    and the tokens still in it (a new ring buffer)."""
    from .api import _map_params

    B, T, H, D = q.shape
    HKV, DV = k.shape[2], v.shape[-1]
    M = fm.feature_dim(D)
    Cap = window_capacity(window, kind)
    c = float(window_scale) if window_scale is not None else D ** -0.5
    params = _map_params(fm, q.device)
    flags = dict(feature_map=fm.name, window=window, sliding=kind == "sliding", affine=affine, scale=float(scale),
                 qk_scale=c)
    mix = window_mix.float()
    packed = cu_seqlens is not None
    N = cu_seqlens.shape[0] - 1 if packed else B
    if initial_state is None:
        state = None
        P0 = [0] * N
    else:
        state = initial_state
        P0 = state.pos.tolist()
    bases = [window_start(p, window, kind) for p in P0]
    n0 = [p - b for p, b in zip(P0, bases)]  # window tokens carried in, per sequence
    S0, z0 = (state.S, state.z) if state is not None else (None, None)
    if not packed and len(set(n0)) <= 1:
        n = n0[0] if n0 else 0
        if n:
            slots = torch.arange(bases[0], P0[0], device=q.device) % Cap
            kx = torch.cat([state.k[:, :, slots].transpose(1, 2).to(k.dtype), k], 1)
            vx = torch.cat([state.v[:, :, slots].transpose(1, 2).to(v.dtype), v], 1)
            qx = torch.cat([q.new_zeros(B, n, H, D), q], 1)
        else:
            kx, vx, qx = k, v, q
        ox, *_ = torch.ops.lintx.hybrid_attention_fwd(q=qx, k=kx, v=vx, mix=mix, S0=S0, z0=z0, **params,
                                                      cu_seqlens=None, **flags)
        o = ox[:, n:]
        cx = None
        lens = [T] * B
    else:  # rows at different positions, or packed sequences: one packed call over the extended sequences
        if packed:
            bounds = cu_seqlens.tolist()
            pieces = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
        else:
            pieces = [(b, 0, T) for b in range(B)]
        ks, vs, qs = [], [], []
        for i, ((b, s, e), p, base, n) in enumerate(zip(pieces, P0, bases, n0)):
            slots = torch.arange(base, p, device=q.device) % Cap
            ks += [state.k[i, :, slots].transpose(0, 1).to(k.dtype)[None], k[b:b + 1, s:e]] if n else [k[b:b + 1, s:e]]
            vs += [state.v[i, :, slots].transpose(0, 1).to(v.dtype)[None], v[b:b + 1, s:e]] if n else [v[b:b + 1, s:e]]
            qs += [q.new_zeros(1, n, H, D), q[b:b + 1, s:e]]
        kx, vx, qx = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(qs, 1)
        lens = [e - s for _, s, e in pieces]
        cx = torch.tensor([0] + [n + L for n, L in zip(n0, lens)], device=q.device).cumsum(0).to(torch.int32)
        ox, *_ = torch.ops.lintx.hybrid_attention_fwd(q=qx, k=kx, v=vx, mix=mix, S0=S0, z0=z0, **params,
                                                      cu_seqlens=cx, **flags)
        starts = cx.tolist()
        keep = [ox[:, a + n:a + n + L] for a, n, L in zip(starts[:-1], n0, lens)]
        o = torch.cat(keep, 1) if packed else torch.cat(keep, 0)
    if not return_state:
        return o, None
    # the state after each sequence: tokens before window_start(P1) are linear, the rest go to a new ring
    P1 = [p + L for p, L in zip(P0, lens)]
    start1 = [window_start(p, window, kind) for p in P1]
    n_lin = [s1 - b for s1, b in zip(start1, bases)]
    if cx is None:
        S1, z1 = _linear_prefix(kx, vx, n_lin[0] if n_lin else 0, S0, z0, fm)
        ring_k = _ring(kx[:, n_lin[0]:], start1[0], Cap) if B else kx.new_zeros(0, HKV, Cap, D)
        ring_v = _ring(vx[:, n_lin[0]:], start1[0], Cap) if B else vx.new_zeros(0, HKV, Cap, DV)
    else:
        S1, z1 = _linear_prefix(kx, vx, n_lin, S0, z0, fm, cx)
        starts = cx.tolist()
        ring_k = torch.cat([_ring(kx[:, a + nl:b_], s1, Cap) for a, b_, nl, s1 in
                            zip(starts[:-1], starts[1:], n_lin, start1)] + [kx.new_zeros(0, HKV, Cap, D)])
        ring_v = torch.cat([_ring(vx[:, a + nl:b_], s1, Cap) for a, b_, nl, s1 in
                            zip(starts[:-1], starts[1:], n_lin, start1)] + [vx.new_zeros(0, HKV, Cap, DV)])
    pos = (state.pos if state is not None else torch.zeros(N, dtype=torch.int64, device=q.device)) \
        + torch.tensor(lens, dtype=torch.int64, device=q.device)
    return o, WindowState(S1, z1, ring_k, ring_v, pos)


# ---- the public entry points (called by lintx_triton.api)


def _hybrid_backend(backend: str, q: Tensor, v: Tensor, fm: FeatureMap) -> str:
    """The hybrid's backend: ``"auto"`` runs the fused kernels on CUDA tensors (within the kernels' limits,
    :func:`lintx_triton.spec.triton_limits`), the torch path otherwise (also in Triton's CPU interpreter, where the
    torch path is the faster; ``backend="triton"`` runs the kernels there)."""
    from .api import _pick_backend
    from .spec import triton_limits

    if backend == "auto":
        return "triton" if q.is_cuda and triton_limits(fm, q.shape[-1], v.shape[-1]) is None else "torch"
    if backend == "triton":
        _pick_backend(backend, q, v, fm)  # CUDA or the interpreter, and the kernels' widths
    return backend


def _mix(window_mix, H, device):
    return window_mix if window_mix is not None else torch.zeros(H, device=device)


def hybrid_attention(q, k, v, fm, *, window, window_mix, window_kind, window_affine, window_scale, scale,
                     causal, normalize, initial_state, return_state, backend, cu_seqlens, check_seqlens, eps):
    """:func:`lintx_triton.linear_attention` with ``window``: checks, then the chunked torch path (per packed
    sequence with ``cu_seqlens``)."""
    from .api import _check_inputs, _check_seqlens

    _check_inputs(q, k, v, fm, True, None, scale, eps, backend, cu_seqlens, check_seqlens)
    check_window(window, window_kind, window_mix, q.shape[2], q.device, window_affine, window_scale)
    if not causal:
        raise ValueError("the windowed hybrid is causal: window= needs causal=True")
    if not normalize:
        raise ValueError("the windowed hybrid is normalized (softmax and linear terms share one denominator): "
                         "window= needs normalize=True")
    backend = _hybrid_backend(backend, q, v, fm)
    B, T, H, D = q.shape
    HKV, DV = k.shape[2], v.shape[-1]
    M = fm.feature_dim(D)
    N = B if cu_seqlens is None else _check_seqlens(cu_seqlens, q, check_seqlens)
    if initial_state is not None:
        initial_state = _check_state(initial_state, N, HKV, M, D, DV, window, window_kind, k.dtype, q.device)
    kw = dict(window_mix=_mix(window_mix, H, q.device), window=window, kind=window_kind, affine=window_affine,
              window_scale=window_scale, scale=float(scale))
    if backend == "triton":
        o, st = hybrid_attention_triton(q, k, v, fm, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                        return_state=return_state, **kw)
    elif cu_seqlens is None:
        o, st = hybrid_attention_torch(q, k, v, fm, initial_state=initial_state, **kw)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            init = WindowState(*(x[n:n + 1] for x in initial_state)) if initial_state is not None else None
            o, st = hybrid_attention_torch(q[:, s:e], k[:, s:e], v[:, s:e], fm, initial_state=init, **kw)
            outs.append(o)
            states.append(st)
        if states:
            o, st = torch.cat(outs, 1), WindowState(*(torch.cat(x) for x in zip(*states)))
        else:  # no sequence
            o = q.new_zeros(1, 0, H, DV) + 0 * (q.sum() + k.sum() + v.sum()).to(q.dtype)
            st = empty_window_state(0, HKV, M, D, DV, window, window_kind, k.dtype, q.device)
    return (o, st) if return_state else o


def hybrid_attention_step(q, k, v, state, fm, *, window, window_mix, window_kind, window_affine, window_scale,
                          scale, backend, inplace):
    """:func:`lintx_triton.linear_attention_step` (``inplace=False``: a copy of ``state`` is updated, None
    starts empty; -> (o, state)) and :func:`lintx_triton.linear_attention_step_` (``state`` updated; -> o) with
    ``window``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-dimensional tensor (one token: q [B, H, D], k [B, HKV, D], "
                             f"v [B, HKV, DV])")
    from .api import _check_inputs

    _check_inputs(q[:, None], k[:, None], v[:, None], fm, True, None, scale, 0.0, backend)
    B, H, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    check_window(window, window_kind, window_mix, H, q.device, window_affine, window_scale)
    backend = _hybrid_backend(backend, q[:, None], v[:, None], fm)
    M = fm.feature_dim(D)
    if state is None:
        if inplace:
            raise TypeError("the in-place step needs a preallocated WindowState (lintx_triton.hybrid."
                            "empty_window_state); use linear_attention_step for None")
        state = empty_window_state(B, HKV, M, D, DV, window, window_kind, k.dtype, q.device)
    else:
        if inplace and not isinstance(state, WindowState):  # a pair's ring buffer would be a temporary
            raise TypeError(f"the in-place step updates a WindowState (lintx_triton.hybrid.empty_window_state, or a "
                            f"call's return_state), got {type(state).__name__}")
        state = _check_state(state, B, HKV, M, D, DV, window, window_kind, k.dtype, q.device)
        if inplace and not all(x.is_contiguous() for x in state):
            raise ValueError("the in-place step updates the state where it lies: its tensors must be contiguous")
        if not inplace:
            state = WindowState(*(x.clone() for x in state))
    if backend == "triton":
        from .api import _map_params

        o = torch.ops.lintx.hybrid_attention_step_(
            q=q, k=k, v=v, mix=_mix(window_mix, H, q.device).float(), S=state.S, z=state.z, kb=state.k, vb=state.v,
            pos=state.pos, **_map_params(fm, q.device, True), feature_map=fm.name, window=window,
            sliding=window_kind == "sliding", affine=window_affine, scale=float(scale),
            qk_scale=float(window_scale) if window_scale is not None else D ** -0.5)
    else:
        o = hybrid_step_torch_(q, k, v, fm, _mix(window_mix, H, q.device), state, window=window, kind=window_kind,
                               affine=window_affine, window_scale=window_scale, scale=float(scale))
    return o if inplace else (o, state)
