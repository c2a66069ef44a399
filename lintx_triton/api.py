"""The public functions: :func:`linear_attention` and :func:`emit`."""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from . import feature_maps, native
from .config import interpreting
from .feature_maps import FeatureMap
from .ops import custom  # noqa: F401  (registers torch.ops.lintx.*)
from .reference import linear_attention_step_torch, linear_attention_step_torch_, linear_attention_torch
from .spec import DTYPES, KernelSpec, dtype_of, products_in_fp32, triton_limits

__all__ = ["linear_attention", "linear_attention_state", "linear_attention_step", "linear_attention_step_", "emit",
           "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")


_TORCH_DTYPES = tuple(d.torch for d in DTYPES.values())
_LAYOUTS = {"q": "[B, T, H, D]", "k": "[B, T, HKV, D]", "v": "[B, T, HKV, DV]"}


def _check_inputs(q, k, v, fm: FeatureMap, causal, initial_state, scale, eps, backend, cu_seqlens=None,
                  check_seqlens=True, has_queries=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions {_LAYOUTS[name]}, got shape {tuple(t.shape)}")
        if t.dtype not in _TORCH_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be [B, T, HKV, D] with B, T, D of q {_LAYOUTS['q']}, got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [B, T, HKV, DV] with B, T, HKV of k, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    H, HKV = q.shape[2], k.shape[2]
    if HKV == 0 and H == 0:
        pass
    elif HKV == 0 or H % HKV:
        raise ValueError(f"q's heads H = {H} must be a multiple of k and v's heads HKV = {HKV} (grouped-query "
                         f"attention: H / HKV query heads share a key/value head)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got D = {q.shape[-1]}, DV = {v.shape[-1]}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fm.check_head_dim(q.shape[-1])
    fm.check_heads(H if has_queries else None, HKV)
    N = q.shape[0] if cu_seqlens is None else _check_seqlens(cu_seqlens, q, check_seqlens)
    if initial_state is None:
        return
    if not causal:
        raise ValueError("initial_state is only defined for causal=True (non-causal attention has no prefix)")
    _check_state(initial_state, "initial_state", N, HKV, fm.feature_dim(q.shape[-1]), v.shape[-1], fm, q.device)


def _check_seqlens(cu, q, check_values: bool) -> int:
    """Validate packed-sequence offsets; -> N, the number of sequences. Values are read back only when
    ``check_values`` and not while compiling or capturing a CUDA graph."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64 (FlashAttention's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] (0, then the cumulative lengths), got shape "
                         f"{tuple(cu.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along T: q must be [1, total_T, H, D], got "
                         f"{tuple(q.shape)}")
    if cu.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu.device}, q on {q.device}")
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_values and not torch.compiler.is_compiling() and not capturing:
        c = cu.cpu()
        if c[0] != 0 or c[-1] != q.shape[1] or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at total_T = {q.shape[1]}; got "
                             f"{c.tolist() if c.numel() <= 16 else c}")
    return cu.shape[0] - 1


def _check_state(state, what, B, H, M, DV, fm, device):
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{what} must be a pair (S, z), got {type(state).__name__}")
    for name, t, shape in (("S", state[0], (B, H, M, DV)), ("z", state[1], (B, H, M))):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{what} {name} must have shape {list(shape)} ([B, H, M{', DV' if name == 'S' else ''}] with "
                f"M = {M} features of map {fm.name!r}), got {tuple(t.shape)}"
            )
        if t.dtype != torch.float32:
            raise TypeError(f"{what} {name} must be float32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what} {name} is on {t.device}, q on {device}")


def _map_params(fm: FeatureMap, device, inference: bool = False) -> dict:
    """The map's parameters for the ops: ``fq``, ``fk`` ([HW, D + 1, M] fp32, one tensor when the map is tied;
    None for elementwise maps). A learnable map builds them from its ``nn.Parameter``s, so the ops' gradients
    reach them; the decode step (``inference``), which has none, gets them detached."""
    fq = fm.kernel_params("query", device)
    fk = fq if getattr(fm, "tied", True) else fm.kernel_params("key", device)
    if inference and fq is not None:
        fq, fk = fq.detach(), fk.detach()
    return dict(fq=fq, fk=fk)


def _pick_backend(backend: str, q: Tensor, v: Tensor, fm: FeatureMap) -> str:
    """The backend a call runs on; every entry point asks here, so the Triton path's limits are checked once."""
    if backend == "auto":
        backend = "triton" if (q.is_cuda or interpreting()) else "torch"
    elif backend == "triton" and not (q.is_cuda or interpreting()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment before the first "
            f"call to run the kernels in Triton's CPU interpreter; got tensors on {q.device}. "
            f"Use backend='torch' or 'auto' on CPU."
        )
    why = triton_limits(fm, q.shape[-1], v.shape[-1]) if backend == "triton" else None
    if why is not None:
        raise ValueError(f"{why}; use backend='torch'")
    return backend


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    causal: bool = True,
    normalize: bool = True,
    scale: float = 1.0,
    eps: float = 1e-6,
    initial_state: Optional[tuple[Tensor, Tensor]] = None,
    return_state: bool = False,
    backend: str = "auto",
    cu_seqlens: Optional[Tensor] = None,
    check_seqlens: bool = True,
    window: Optional[int] = None,
    window_mix: Optional[Tensor] = None,
    window_kind: str = "terraced",
    window_affine: bool = False,
    window_scale: Optional[float] = None,
):
    r"""Linear attention of "Transformers are RNNs" with the feature map fused into the kernels.

    With a = phi(q), b = phi(k) applied per head vector:
    S_t = S_0 + \sum_{s<=t} b_s v_s^T, z_t = z_0 + \sum_{s<=t} b_s,
    o_t = scale a_t^T S_t / (scale a_t^T z_t + eps) (``normalize``) or scale a_t^T S_t.

    Args:
        q (torch.Tensor): queries of shape ``[B, T, H, D]``.
        k (torch.Tensor): keys of shape ``[B, T, HKV, D]``; HKV divides H (grouped-query attention:
            H / HKV query heads share a key/value head, read in place; multi-query when HKV = 1).
        v (torch.Tensor): values of shape ``[B, T, HKV, DV]``; DV may differ from D.
            q, k, v share one dtype (float32, float16, bfloat16) and one device.
        feature_map (str | FeatureMap): ``"elu"`` (elu(x) + 1, default), ``"relu"``,
            ``"identity"``, or a :class:`lintx_triton.feature_maps.FeatureMap` such as
            ``lx.feature_maps.favor(D, num_features=M)``. M is its feature width (M = D for the
            three named maps). A fixed map's parameters (random projections) follow q's device; a
            learnable map (``lx.feature_maps.hedgehog``, ``t2r``: an ``nn.Module``) must be on q's device, and
            its parameters get gradients from the kernels.
        causal (bool): each position attends to itself and the past (default ``True``),
            or to every position.
        normalize (bool): divide by the normalizer (default ``True``).
        scale (float): factor on phi(q)^T phi(k). Default: ``1.0``.
        eps (float): added to the normalizer. Default: ``1e-6``.
        initial_state (tuple[torch.Tensor, torch.Tensor] | None): ``(S_0 [N, HKV, M, DV], z_0 [N, HKV, M])``
            in float32, the state of a preceding segment (causal only); N = B, or the number of packed
            sequences. Default: ``None`` (zeros).
        return_state (bool): also return the final state ``(S_T, z_T)`` in float32, per sequence and
            kv head. Default: ``False``.
        backend (str): ``"auto"`` (Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, the chunked
            PyTorch implementation on CPU otherwise), ``"triton"`` or ``"torch"``.
        cu_seqlens (torch.Tensor | None): packed sequences, FlashAttention's convention: q, k, v are
            ``[1, total_T, H, *]`` and sequence n is tokens ``cu_seqlens[n] .. cu_seqlens[n+1]`` (int32 or
            int64 ``[N + 1]`` on q's device; empty sequences allowed). No token attends across a boundary;
            states are per sequence. The Triton path never reads these values on the host (works under
            torch.compile and CUDA graphs). Default: ``None``.
        check_seqlens (bool): check that cu_seqlens starts at 0, never decreases and ends at total_T
            (one small device-to-host copy; skipped while compiling or capturing). With ``False`` (or
            under torch.compile / a CUDA graph) the offsets are trusted: offsets past total_T make the
            kernels read out of bounds. Default: ``True``.
        window (int | None): the softmax window w of LoLCATs' hybrid (:mod:`lintx_triton.hybrid`): recent tokens
            in softmax form, older ones in linear form, under one normalizer: o_t = (f_h sum_win
            exp(c q_t.k_s - m_t) v_s + g_h scale sum_older phi(q_t)^T phi(k_s) v_s) / (the same sums without v),
            m_t the exact maximum of the window's scores. A multiple of 16 from 16 to 1024; causal and
            normalized only; ``eps`` unused. Runs the chunked PyTorch path (``backend="auto"`` or
            ``"torch"``; the fused Triton kernels are not built yet). ``initial_state`` is then a
            :class:`lintx_triton.hybrid.WindowState` (the linear state of the tokens that left the window, a ring
            buffer of the window's keys and values, the position) or a pair ``(S_0, z_0)`` of a prefix seen in
            linear form only; ``return_state`` returns a ``WindowState``, which :func:`linear_attention_step`
            continues token by token. Default: ``None`` (linear attention).
        window_mix (torch.Tensor | None): alpha ``[H]``, f_h = sigmoid(alpha_h) per query head; gradients
            flow to it. Default: ``None`` (alpha = 0, f = 1/2).
        window_kind (str): ``"terraced"`` (LoLCATs' training form: tokens in blocks of w counted from the first
            token; a query sees its block and the previous one in softmax form) or ``"sliding"`` (the last w
            tokens, itself included). Default: ``"terraced"``.
        window_affine (bool): g_h = 1 - f_h (LoLCATs' ``affine_attention_factors``) instead of g_h = 1.
            Default: ``False``.
        window_scale (float | None): c, the softmax scale. Default: ``None`` (1/sqrt(D)).

    Returns:
        o (torch.Tensor): ``[B, T, H, DV]`` in the inputs' dtype, and ``(S_T, z_T)`` when ``return_state``.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> q, k = torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 32)
        >>> v = torch.randn(2, 100, 4, 48)
        >>> o = lx.linear_attention(q, k, v)                       # elu(x) + 1, causal, normalized
        >>> o1, state = lx.linear_attention(q[:, :60], k[:, :60], v[:, :60], return_state=True)
        >>> o2 = lx.linear_attention(q[:, 60:], k[:, 60:], v[:, 60:], initial_state=state)
        >>> torch.allclose(torch.cat([o1, o2], 1), o, atol=1e-5)
        True
        >>> o = lx.linear_attention(q, k, v, window=64, window_mix=torch.zeros(4))   # LoLCATs' hybrid
    """
    fm = feature_maps.resolve(feature_map)
    if window is not None:
        from .hybrid import hybrid_attention

        return hybrid_attention(q, k, v, fm, window=window, window_mix=window_mix, window_kind=window_kind,
                                window_affine=window_affine, window_scale=window_scale, scale=scale, causal=causal,
                                normalize=normalize, initial_state=initial_state, return_state=return_state,
                                backend=backend, cu_seqlens=cu_seqlens, check_seqlens=check_seqlens, eps=eps)
    _check_inputs(q, k, v, fm, causal, initial_state, scale, eps, backend, cu_seqlens, check_seqlens)
    backend = _pick_backend(backend, q, v, fm)
    S0, z0 = initial_state if initial_state is not None else (None, None)
    if backend == "torch":
        kw = dict(causal=causal, normalize=normalize, scale=float(scale), eps=float(eps))
        if cu_seqlens is None:
            o, (S, z) = linear_attention_torch(q, k, v, fm, initial_state=initial_state, **kw)
        else:
            o, (S, z) = _packed_torch(q, k, v, fm, cu_seqlens, initial_state, kw)
    else:
        o, _, S, z = torch.ops.lintx.linear_attention_fwd(
            q=q, k=k, v=v, S0=S0, z0=z0, **_map_params(fm, q.device), cu_seqlens=cu_seqlens,
            feature_map=fm.name, causal=bool(causal), normalize=bool(normalize), scale=float(scale), eps=float(eps))
    return (o, (S, z)) if return_state else o


def linear_attention_state(
    k: Tensor,
    v: Tensor,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    initial_state: Optional[tuple[Tensor, Tensor]] = None,
    backend: str = "auto",
    cu_seqlens: Optional[Tensor] = None,
    check_seqlens: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""The state a segment leaves, without its outputs: S = S_0 + \sum_t phi(k_t) v_t^T, z = z_0 + \sum_t phi(k_t).

    What :func:`linear_attention` returns with ``return_state=True``, at the cost of its chunk sums
    alone (no queries, no output); differentiable. For a prompt whose outputs are not needed, and for
    the first pass of context parallelism (:mod:`lintx_triton.distributed`).

    Args:
        k (torch.Tensor): keys ``[B, T, HKV, D]``.
        v (torch.Tensor): values ``[B, T, HKV, DV]``.
        feature_map, initial_state, backend, cu_seqlens, check_seqlens: as in :func:`linear_attention`.

    Returns:
        ``(S [N, HKV, M, DV], z [N, HKV, M])`` in float32.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> k, v = torch.randn(2, 50, 4, 32), torch.randn(2, 50, 4, 16)
        >>> S, z = lx.linear_attention_state(k, v)
        >>> _, (S2, z2) = lx.linear_attention(k, k, v, return_state=True)
        >>> torch.allclose(S, S2, atol=1e-4) and torch.allclose(z, z2, atol=1e-4)
        True
    """
    fm = feature_maps.resolve(feature_map)
    _check_inputs(k, k, v, fm, True, initial_state, 1.0, 0.0, backend, cu_seqlens, check_seqlens, has_queries=False)
    if _pick_backend(backend, k, v, fm) == "torch":
        return _state_torch(k, v, fm, initial_state, cu_seqlens)
    S0, z0 = initial_state if initial_state is not None else (None, None)
    return tuple(torch.ops.lintx.linear_attention_state(k=k, v=v, S0=S0, z0=z0, fk=_map_params(fm, k.device)["fk"],
                                                        cu_seqlens=cu_seqlens, feature_map=fm.name))


def _state_torch(k, v, fm, initial_state, cu):
    b = fm.features(k.float(), "key")  # [B, T, HKV, M]
    if cu is None:
        S, z = torch.einsum("bthm,bthv->bhmv", b, v.float()), b.sum(1)
    else:  # a sum per sequence: scatter the tokens onto their sequence
        seq = torch.searchsorted(cu[1:].long(), torch.arange(k.shape[1], device=k.device), right=True)
        N = cu.shape[0] - 1
        kv = torch.einsum("thm,thv->thmv", b[0], v[0].float())
        S = kv.new_zeros(N, *kv.shape[1:]).index_add_(0, seq, kv)
        z = b.new_zeros(N, *b.shape[2:]).index_add_(0, seq, b[0])
    if initial_state is not None:
        S, z = initial_state[0] + S, initial_state[1] + z
    return S, z


def _packed_torch(q, k, v, fm, cu, initial_state, kw):
    """The torch backend on packed sequences: one chunked call per sequence (reads cu on the host)."""
    bounds = cu.tolist()
    outs, states = [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = tuple(x[n:n + 1] for x in initial_state) if initial_state is not None else None
        o, st = linear_attention_torch(q[:, s:e], k[:, s:e], v[:, s:e], fm, initial_state=init, **kw)
        outs.append(o)
        states.append(st)
    if not states:  # no sequence: the empty call's output (tied to the inputs), and the states of none
        o, (S, z) = linear_attention_torch(q, k, v, fm, **kw)
        return o, (S[:0], z[:0])
    return torch.cat(outs, 1), (torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states]))


def _check_step(q, k, v, state, fm: FeatureMap, scale, eps, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dimensions {_LAYOUTS[name].replace('T, ', '')} (one token), "
                f"got shape {tuple(t.shape)}"
            )
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be [B, HKV, D] with B, D of q [B, H, D], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must be [B, HKV, DV] with B, HKV of k, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    # the [B, T, H, D] checks with T = 1 give the same messages for dtypes, devices and head counts
    _check_inputs(q[:, None], k[:, None], v[:, None], fm, True, None, scale, eps, backend)
    if state is not None:
        B, _, D = q.shape
        _check_state(state, "state", B, k.shape[1], fm.feature_dim(D), v.shape[-1], fm, q.device)


# Decode steps that passed _check_step, by everything the checks read -> the backend they run on. A decode loop
# repeats one key, so its steps after the first skip the checks (24 us of Python a step on a 2-core CPU, against
# 30-50 us for the step's arithmetic at B = 1; the key and the lookup cost 3 us: bench/NOTES.md, issue #17); any
# change of type, shape, dtype, device, contiguity, map, eps, scale's type, backend or TRITON_INTERPRET is a new
# key and is checked. Replaced by an empty dict when it reaches _STEP_KEYS_MAX keys (and by
# lintx_triton.native.set_enabled).
_STEP_KEYS: dict = {}
_STEP_KEYS_MAX = 256
# The last native step planned, functional [0] and in place [1], with the rest of its key and the _STEP_KEYS it was
# planned under (see _fast_step): (fm, backend, type(scale), type(eps), eps, TRITON_INTERPRET, runner, _STEP_KEYS)
_STEP_FAST: list = [None, None]


_is_compiling = torch.compiler.is_compiling


def _step_key(q, k, v, state, fm, scale, eps, backend, inplace):
    """The cache key of a decode step's arguments, or None when they are not all tensors where tensors belong
    (the full checks then run, and raise)."""
    if type(state) not in (tuple, list) or len(state) != 2:
        return None
    S, z = state
    try:
        return (fm, backend, type(scale), type(eps), eps, inplace, interpreting(), type(q), type(k), type(v),
                type(state), type(S), type(z), q.shape, k.shape, v.shape, S.shape, z.shape, q.dtype, k.dtype,
                v.dtype, S.dtype, z.dtype, q.device, k.device, v.device, S.device, z.device,
                inplace and S.is_contiguous() and z.is_contiguous())
    except AttributeError:  # not tensors: the full checks say what is wrong
        return None


def _fast_step(inplace: bool, q, k, v, state, fm: FeatureMap, normalize, scale, eps, backend):
    """The last native step planned (for this form: in place or functional) run on these arguments, or None when
    they are not what it was planned for. Its runner compares every tensor property the checks read with what
    they passed, this the rest of the key: the map, the backend, eps and scale's type, TRITON_INTERPRET. A decode
    loop's step so skips building, hashing and looking up the key of 29 attributes (in bench/cpu_decode.py's
    rounds a B = 1 step 13.1-13.4 -> 11.7-12.4 us, 10.3-10.6 with the runner in C, beside a 4.0-4.4 us copy of its
    state; hot, in a tight loop, the guard costs what the key did: bench/NOTES.md, issue #17)."""
    last = _STEP_FAST[inplace]
    if (last is None or last[7] is not _STEP_KEYS or fm is not last[0] or backend != last[1]
            or type(scale) is not last[2] or type(eps) is not last[3] or eps != last[4]
            or interpreting() is not last[5] or _is_compiling()):
        return None
    return last[6](q, k, v, state, normalize, float(scale), float(eps))


def _step_backend(q, k, v, state, fm: FeatureMap, scale, eps, backend, inplace: bool):
    """Check a decode step's arguments (once per key, see _STEP_KEYS) -> its backend, "torch" or "triton", or
    on the torch backend the native CPU step's runner when the key is eligible (lintx_triton.native.plan; it
    returns None for a call that must take the torch path after all)."""
    global _STEP_KEYS
    # not while dynamo traces (key None): it traces the checks once and guards on what they read
    key = None if state is None or _is_compiling() else _step_key(q, k, v, state, fm, scale, eps, backend, inplace)
    picked = None
    if key is not None:
        try:
            picked = _STEP_KEYS.get(key)
        except TypeError:  # an unhashable eps: the checks say what is wrong
            key = None
    if picked is None:  # a new key: checked, then planned
        _check_step(q, k, v, state, fm, scale, eps, backend)
        if inplace and not (state[0].is_contiguous() and state[1].is_contiguous()):
            raise ValueError("linear_attention_step_ updates the state in place: S and z must be contiguous")
        picked = _pick_backend(backend, q, v, fm)
        if picked == "torch" and key is not None:  # the traced torch path under dynamo (key None)
            picked = native.plan(q, k, v, state[0], state[1], fm, inplace, type(state)) or picked
        if key is not None:
            if len(_STEP_KEYS) >= _STEP_KEYS_MAX:
                _STEP_KEYS = {}
            _STEP_KEYS[key] = picked
    if key is not None and type(picked) is not str:  # a native step: the next call's fast path (_fast_step)
        _STEP_FAST[inplace] = (fm, backend, type(scale), type(eps), eps, key[6], picked, _STEP_KEYS)
    return picked


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Optional[tuple[Tensor, Tensor]] = None,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    normalize: bool = True,
    scale: float = 1.0,
    eps: float = 1e-6,
    backend: str = "auto",
    window: Optional[int] = None,
    window_mix: Optional[Tensor] = None,
    window_kind: str = "terraced",
    window_affine: bool = False,
    window_scale: Optional[float] = None,
):
    r"""One step of the RNN form: a new token's output and the updated state, in constant time.

    S <- S + phi(k) v^T, z <- z + phi(k), o = scale phi(q)^T S / (scale phi(q)^T z + eps). T steps equal
    one :func:`linear_attention` call with ``return_state=True`` over the same tokens, and a prefill's
    state continues exactly.

    Args:
        q (torch.Tensor): the new token's queries ``[B, H, D]``.
        k (torch.Tensor): its keys ``[B, HKV, D]`` (HKV divides H).
        v (torch.Tensor): its values ``[B, HKV, DV]``.
        state (tuple[torch.Tensor, torch.Tensor] | None): ``(S [B, HKV, M, DV], z [B, HKV, M])`` float32, or
            ``None`` for an empty one. Not modified.
        feature_map, normalize, scale, eps, backend: as in :func:`linear_attention`.
        window, window_mix, window_kind, window_affine, window_scale: LoLCATs' hybrid, as in
            :func:`linear_attention` (the torch path); ``state`` is then a
            :class:`lintx_triton.hybrid.WindowState` (or None), the one a call with ``return_state=True``
            returns.

    Returns:
        o (torch.Tensor): ``[B, H, DV]`` in the inputs' dtype, and the new state ``(S, z)``.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> q, k, v = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32)
        >>> o, state = lx.linear_attention(q[:, :9], k[:, :9], v[:, :9], return_state=True)   # prefill
        >>> o_last, state = lx.linear_attention_step(q[:, 9], k[:, 9], v[:, 9], state)          # decode
        >>> torch.allclose(o_last, lx.linear_attention(q, k, v)[:, 9], atol=1e-5)
        True
    """
    fm = feature_maps.resolve(feature_map)
    if window is not None:
        from .hybrid import hybrid_attention_step

        return hybrid_attention_step(q, k, v, state, fm, window=window, window_mix=window_mix,
                                     window_kind=window_kind, window_affine=window_affine, window_scale=window_scale,
                                     scale=scale, backend=backend, inplace=False)
    out = _fast_step(False, q, k, v, state, fm, normalize, scale, eps, backend)
    if out is not None:
        return out
    backend = _step_backend(q, k, v, state, fm, scale, eps, backend, False)
    if type(backend) is not str:  # the native CPU step (lintx_triton.native)
        out = backend(q, k, v, state, normalize, float(scale), float(eps))
        if out is not None:
            return out
        backend = "torch"
    if backend == "torch":
        return linear_attention_step_torch(q, k, v, fm, normalize=normalize, scale=float(scale), eps=float(eps),
                                           state=state)
    S0, z0 = state if state is not None else (None, None)
    o, S, z = torch.ops.lintx.linear_attention_step(q=q, k=k, v=v, S0=S0, z0=z0, **_map_params(fm, q.device, True),
                                                    feature_map=fm.name, normalize=bool(normalize),
                                                    scale=float(scale), eps=float(eps))
    return o, (S, z)


def linear_attention_step_(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor],
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    normalize: bool = True,
    scale: float = 1.0,
    eps: float = 1e-6,
    backend: str = "auto",
    window: Optional[int] = None,
    window_mix: Optional[Tensor] = None,
    window_kind: str = "terraced",
    window_affine: bool = False,
    window_scale: Optional[float] = None,
) -> Tensor:
    r""":func:`linear_attention_step` updating a preallocated state in place; returns o ``[B, H, DV]``.

    The state ``(S [B, H, M, DV], z [B, H, M])`` must be contiguous float32 (start from zeros). The op
    declares the mutation to torch.library, so it works under ``torch.compile``, and allocates only o,
    so a whole decode loop can be captured in a CUDA graph. A loop's steps after the first skip the argument
    checks while the arguments' types, shapes, dtypes, devices, the map and the options stay the same (any
    change is checked again). With ``window`` (LoLCATs' hybrid, the arguments of :func:`linear_attention`) the
    state is a :class:`lintx_triton.hybrid.WindowState` (``lintx_triton.hybrid.empty_window_state`` to start),
    whose ring buffer is updated in place too.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> S, z = torch.zeros(2, 4, 32, 32), torch.zeros(2, 4, 32)
        >>> for t in range(3):
        ...     o = lx.linear_attention_step_(torch.randn(2, 4, 32), torch.randn(2, 4, 32), torch.randn(2, 4, 32), (S, z))
        >>> o.shape
        torch.Size([2, 4, 32])
    """
    fm = feature_maps.resolve(feature_map)
    if window is not None:  # LoLCATs' hybrid: state is a lintx_triton.hybrid.WindowState, its ring buffer updated
        from .hybrid import hybrid_attention_step

        return hybrid_attention_step(q, k, v, state, fm, window=window, window_mix=window_mix,
                                     window_kind=window_kind, window_affine=window_affine, window_scale=window_scale,
                                     scale=scale, backend=backend, inplace=True)
    o = _fast_step(True, q, k, v, state, fm, normalize, scale, eps, backend)
    if o is not None:
        return o
    if state is None:
        raise TypeError("linear_attention_step_ needs a preallocated state (S, z); use linear_attention_step for None")
    backend = _step_backend(q, k, v, state, fm, scale, eps, backend, True)
    if type(backend) is not str:  # the native CPU step (lintx_triton.native)
        o = backend(q, k, v, state, normalize, float(scale), float(eps))
        if o is not None:
            return o
        backend = "torch"
    S, z = state
    if backend == "torch":
        return linear_attention_step_torch_(q, k, v, fm, S, z, normalize=normalize, scale=float(scale),
                                            eps=float(eps))
    return torch.ops.lintx.linear_attention_step_(q=q, k=k, v=v, S=S, z=z, **_map_params(fm, q.device, True),
                                                  feature_map=fm.name, normalize=bool(normalize), scale=float(scale),
                                                  eps=float(eps))


def emit(
    spec: Optional[KernelSpec] = None,
    *,
    feature_map: Union[str, FeatureMap] = "elu",
    causal: bool = True,
    normalize: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 64,
    value_dim: Optional[int] = None,
    initial_state: bool = False,
    dot_fp32: Optional[bool] = None,
) -> str:
    """The generated Triton source for a kernel variant: every kernel that runs for it.

    Args:
        spec (KernelSpec | None): a full spec; when given, the keyword arguments are ignored.
        feature_map, causal, normalize: as in :func:`linear_attention`.
        dtype (torch.dtype): the inputs' dtype. Default: ``torch.bfloat16``.
        head_dim (int): D. Default: ``64``.
        value_dim (int | None): DV. Default: ``head_dim``.
        initial_state (bool): whether the variant reads (S_0, z_0). Default: ``False``.
        dot_fp32 (bool | None): products on fp32 operands; default: as a call on a GPU would pick
            (True for float32 only).

    Examples::

        >>> import lintx_triton as lx
        >>> src = lx.emit(feature_map="relu", head_dim=64)
        >>> "tl.maximum(x, 0.0)" in src
        True
    """
    from .codegen import render

    if spec is None:
        fm = feature_maps.resolve(feature_map)
        spec = KernelSpec(
            feature_map=fm.name,
            causal=bool(causal),
            normalize=bool(normalize),
            dtype=dtype_of(dtype).name,
            head_dim=int(head_dim),
            value_dim=int(value_dim if value_dim is not None else head_dim),
            has_initial_state=bool(initial_state),
            dot_fp32=products_in_fp32(dtype_of(dtype).name, False) if dot_fp32 is None else bool(dot_fp32),
        )
    return render(spec)
