"""LoLCATs' sliding-window softmax + linear hybrid (lintx_triton.hybrid): the chunked torch path, the decode step
and the API against the float64 quadratic reference, with bounds built as lintx_triton.testing builds them (the
reference on magnitudes, times TOL / GTOL); the reference against a transcription of LoLCATs' own
``hybrid_attention_quadratic`` and decode step; a window covering the sequence against SDPA; no overflow."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st

import lintx_triton as lx
from lintx_triton import hybrid as hy
from lintx_triton.feature_maps import LEARNABLE_FAMILIES
from lintx_triton.testing import GTOL, TOL, assert_within, map_params

ROOT = Path(__file__).resolve().parents[1]
MAPS = ("elu", "relu", "hedgehog", "t2r")
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _map(name: str, D: int, H: int, seed: int):
    if name not in LEARNABLE_FAMILIES:
        return lx.feature_maps.get(name)
    fm = LEARNABLE_FAMILIES[name](D, 2 * D, 1, None)  # one W shared by every head (any H / HKV)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # parameters away from the init, as lintx_triton.testing draws them
        for n, p in fm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (D ** -0.5 if n.endswith("weight") else 0.5))
    return fm


@st.composite
def hcases(draw, dtypes=("float32",), t_values=(1, 7, 16, 17, 33, 48, 61, 70), state=None):
    H = draw(st.integers(1, 4))
    return dict(
        B=draw(st.integers(1, 2)), T=draw(st.sampled_from(t_values)), H=H,
        HKV=draw(st.sampled_from([d for d in range(1, H + 1) if H % d == 0])),
        D=draw(st.sampled_from((4, 8, 13))), DV=draw(st.sampled_from((3, 8))),
        dtype=draw(st.sampled_from(dtypes)), map=draw(st.sampled_from(MAPS)),
        window=draw(st.sampled_from((16, 32))), kind=draw(st.sampled_from(hy.KINDS)), affine=draw(st.booleans()),
        window_scale=draw(st.sampled_from((None, 0.3))), scale=draw(st.sampled_from((1.0, 0.5))),
        # the state carried in: none, a linear-only pair, or a WindowState after a prefix of P tokens
        state=draw(st.sampled_from((None, "pair", 5, 16, 23, 40))) if state is None else state,
        seed=draw(st.integers(0, 2 ** 16)))


def hid(c: dict) -> str:
    return (f"B{c['B']}-T{c['T']}-H{c['H']}.{c['HKV']}-D{c['D']}-DV{c['DV']}-{c['dtype']}-{c['map']}-w{c['window']}"
            f"-{c['kind']}{'-affine' if c['affine'] else ''}-c{c['window_scale']}-s{c['scale']}-h0{c['state']}")


def inputs(c: dict, requires_grad=False):
    """q, k, v, alpha, the map and the carried-in state of a case, deterministic in its seed."""
    g = torch.Generator().manual_seed(c["seed"])
    B, T, H, HKV, D, DV = (c[x] for x in ("B", "T", "H", "HKV", "D", "DV"))
    dt = DT[c["dtype"]]
    q, k = torch.randn(B, T, H, D, generator=g).to(dt), torch.randn(B, T, HKV, D, generator=g).to(dt)
    v = torch.randn(B, T, HKV, DV, generator=g).to(dt)
    alpha = torch.randn(H, generator=g)
    fm = _map(c["map"], D, H, c["seed"])
    state = None
    if c["state"] == "pair":
        kk = fm.features(torch.randn(B, 5, HKV, D, generator=g), "key").detach()
        vv = torch.randn(B, 5, HKV, DV, generator=g)
        state = (torch.einsum("bthm,bthv->bhmv", kk, vv), kk.sum(1))
    elif c["state"] is not None:  # a prefix of P tokens run through the torch path
        P = c["state"]
        qp, kp = torch.randn(B, P, H, D, generator=g).to(dt), torch.randn(B, P, HKV, D, generator=g).to(dt)
        vp = torch.randn(B, P, HKV, DV, generator=g).to(dt)
        with torch.no_grad():
            _, state = hy.hybrid_attention_torch(qp, kp, vp, fm, alpha, **_kw(c))
    if requires_grad:
        for x in (q, k, v, alpha):
            x.requires_grad_()
    return q, k, v, alpha, fm, state


def _kw(c: dict) -> dict:
    return dict(window=c["window"], kind=c["kind"], affine=c["affine"], window_scale=c["window_scale"],
                scale=c["scale"])


def _api_kw(c: dict, alpha) -> dict:
    return dict(window=c["window"], window_mix=alpha, window_kind=c["kind"], window_affine=c["affine"],
                window_scale=c["window_scale"], scale=c["scale"])


def _map64(fm):
    return copy.deepcopy(fm).to("cpu", torch.float64) if fm.learnable else fm


def bound_of(o, den, n_abs, d_abs):
    """testing's normalized-output bound: u (N + |o| Dn) / |den| moves num / den."""
    return (n_abs + o.abs() * d_abs[..., None]) / den.abs()[..., None]


def check_forward(c, o, q, k, v, alpha, fm, state, name="o"):
    """o within TOL x bound of the float64 reference; -> the reference's final state and its bound."""
    kw = _kw(c)
    with torch.no_grad():
        ref, st_ref, _, den = hy.hybrid_attention_reference(q, k, v, _map64(fm), alpha, initial_state=state, **kw)
        _, st_abs, n_abs, d_abs = hy.hybrid_attention_reference(q, k, v, _map64(fm), alpha, initial_state=state,
                                                                absolute=True, **kw)
    assert o.dtype == q.dtype and o.shape == ref.shape
    assert_within(name, o, ref, bound_of(ref, den, n_abs, d_abs), TOL[c["dtype"]])
    return st_ref, st_abs


def check_state(c, got, st_ref, st_abs):
    for name in ("S", "z"):
        x = getattr(got, name)
        assert x.dtype == torch.float32
        assert_within(name, x, getattr(st_ref, name), getattr(st_abs, name), TOL[c["dtype"]])
    for name in ("k", "v", "pos"):  # copies of the inputs and a count: exact
        assert torch.equal(getattr(got, name), getattr(st_ref, name)), name


@settings(max_examples=max(8, settings.default.max_examples // 2))
@given(c=hcases(dtypes=("float32", "bfloat16", "float16")))
def test_torch_path_matches_reference(c):
    note(hid(c))
    q, k, v, alpha, fm, state = inputs(c)
    o, st_ = lx.linear_attention(q, k, v, feature_map=fm, initial_state=state, return_state=True,
                                 **_api_kw(c, alpha))
    check_state(c, st_, *check_forward(c, o, q, k, v, alpha, fm, state))


@settings(max_examples=max(6, settings.default.max_examples // 3))
@given(c=hcases(t_values=(1, 16, 17, 33, 50)))
def test_torch_path_gradients_match_reference(c):
    """dq, dk, dv, dalpha and a learnable map's parameters of sum(o do) + sum(S dS) + sum(z dz), against float64
    autograd of the reference; the bound is the gradient of the magnitudes' loss (testing.grad_bound's way)."""
    note(hid(c))
    check_grads(c, *inputs(c, requires_grad=True))


def on_device(device, q, k, v, alpha, fm, state):
    """A case's inputs (CPU tensors, a map, a state) moved to ``device`` for a call, leaves staying leaves (a learnable
    map is copied there; CPU: the same objects)."""
    device = torch.device(device)
    if device == q.device:
        return q, k, v, alpha, fm, state
    mv = lambda x: x.detach().to(device).requires_grad_(x.requires_grad)  # noqa: E731
    if state is not None:
        state = hy.WindowState(*map(mv, state)) if isinstance(state, hy.WindowState) else tuple(map(mv, state))
    return (*map(mv, (q, k, v, alpha)), copy.deepcopy(fm).to(device) if fm.learnable else fm, state)


def check_grads(c, q, k, v, alpha, fm, state, device=None, **call):
    """The call's gradients within GTOL x bound of float64 autograd through the reference (``call``: more
    arguments of the call, e.g. its backend). A pair state whose tensors require grad is differentiated too.
    ``device``: the call runs there (the inputs are moved; its gradients come back to be checked on the CPU)."""
    pair = isinstance(state, tuple) and not isinstance(state, hy.WindowState) and state[0].requires_grad
    dq_, dk_, dv_, da_, dfm, dstate = on_device(device or q.device, q, k, v, alpha, fm, state)
    o, st_ = lx.linear_attention(dq_, dk_, dv_, feature_map=dfm, initial_state=dstate, return_state=True,
                                 **_api_kw(c, da_), **call)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    do, dS, dz = (torch.randn(x.shape, generator=g) for x in (o, st_.S, st_.z))
    leaves = [dq_, dk_, dv_, da_] + map_params(dfm) + (list(dstate) if pair else [])
    names = ["q", "k", "v", "alpha"] + ([f"map.{n}" for n, _ in fm.named_parameters()] if fm.learnable else []) \
        + (["S0", "z0"] if pair else [])
    loss = (o.float() * do.to(o.device)).sum() + (st_.S * dS.to(o.device)).sum() + (st_.z * dz.to(o.device)).sum()
    got = [x.cpu() for x in torch.autograd.grad(loss, leaves)]

    fm64 = _map64(fm)
    with torch.no_grad():
        for p64, p in zip(map_params(fm64), map_params(fm)):
            p64.copy_(p)
    # (a pair state stays float32, as the call's checks want it; the reference takes it to float64 differentiably)
    state64 = tuple(x.detach().clone().requires_grad_() for x in state) if pair else None
    l64 = [x.detach().double().requires_grad_() for x in (q, k, v, alpha)] + map_params(fm64) + \
        (list(state64) if pair else [])
    state = state64 if pair else state
    kw = _kw(c)
    ref, st_ref, _, den = hy.hybrid_attention_reference(*l64[:3], fm64, l64[3], initial_state=state, **kw)
    want = torch.autograd.grad((ref * do.double()).sum() + (st_ref.S * dS.double()).sum()
                               + (st_ref.z * dz.double()).sum(), l64)
    bounds = [0] * len(l64)
    for part in ("softmax", "linear"):  # the parts' gradients add in magnitude (their signs can differ)
        _, st_abs, n_abs, d_abs = hy.hybrid_attention_reference(*l64[:3], fm64, l64[3], initial_state=state,
                                                                absolute=part, **kw)
        loss = (bound_of(ref.detach(), den.detach(), n_abs, d_abs) * do.double().abs()).sum()
        if part == "linear":
            loss = loss + (st_abs.S * dS.double().abs()).sum() + (st_abs.z * dz.double().abs()).sum()
        grads = torch.autograd.grad(loss, l64, allow_unused=True)
        bounds = [b + (x.abs() if x is not None else 0) for b, x in zip(bounds, grads)]
    for name, gt, w, b in zip(names, got, want, bounds):
        assert not torch.isnan(gt).any(), name
        assert_within(f"d{name}", gt, w, b, GTOL[c["dtype"]])


# ---- LoLCATs' own code, transcribed (HazyResearch/lolcats 375df84, src/model/linear_attention/
# linear_window_attention_tk.py lines 25-84; ``.float()`` made ``.to(dtype)`` so that it runs in float64 here)

def lolcats_get_masks(window_size: int, q_len: int, k_len: int, device):
    kwargs = {'device': device, 'dtype': int}
    l = window_size  # noqa: E741
    m = math.ceil(max(q_len, k_len) / window_size)
    mask = torch.block_diag(*[torch.ones((l, l), )] * m)
    mask += torch.roll(mask, -l, -1)
    if mask.shape[0] > q_len:
        mask = mask[-q_len:]
    if mask.shape[1] > k_len:
        mask = mask[:, -k_len:]
    mask = mask[None, None, ...]
    return torch.tril(mask).to(**kwargs), torch.tril(1 - mask).to(**kwargs)


def lolcats_hybrid_attention_quadratic(q, k, f_q, f_k, v, window_factor, linear_factor, window_size, kv_state=None,
                                       k_state=None, eps=1e-12, mask_value=-1e8, dtype=torch.float64):
    mask_window, mask_linear = lolcats_get_masks(window_size, q.shape[-2], k.shape[-2], q.device)
    a_sm = torch.einsum('bhmd,bhnd->bhmn', q.to(dtype), k.to(dtype)) * (k.shape[-1] ** -0.5)
    a_sm = a_sm.masked_fill(~mask_window.bool(), mask_value)
    a_sm_max = torch.amax(a_sm, dim=-1, keepdim=True)
    a_sm = window_factor * torch.exp(a_sm - a_sm_max)
    sum_sm = a_sm.sum(dim=-1, keepdim=True)
    a_ln = torch.einsum('bhmd,bhnd->bhmn', f_q.to(dtype), f_k.to(dtype))
    a_ln = linear_factor * a_ln.masked_fill(~mask_linear.bool(), 0)
    sum_ln = a_ln.sum(dim=-1, keepdim=True)
    y = torch.einsum('bhmn,bhnd->bhmd', a_sm + a_ln, v.to(dtype))
    if kv_state is not None:
        y += linear_factor * torch.einsum('bhld,bhdf->bhlf', f_q.to(dtype), kv_state.to(dtype))
        sum_ln += linear_factor * torch.einsum('bhld,bhnd->bhl', f_q.to(dtype), k_state.to(dtype))[..., None]
    return y / (sum_sm + sum_ln)


def lolcats_decode(q, k, v, f_q_fn, f_k_fn, window_factor, linear_factor, window_size, dtype=torch.float64):
    """LoLCATs' decode path token by token from an empty cache (lines 180-195 and the cache's
    ``update_for_decoding``, lines 316-342): softmax over the cache of the last ``window_size`` keys, linear
    attention over the keys folded out of it. q [B, H, T, D] -> y [B, H, T, DV]."""
    B, H, T, D = q.shape
    k_cache, v_cache = k[:, :, :0], v[:, :, :0]
    kv_state = torch.zeros(B, H, f_k_fn(k[:, :, :1]).shape[-1], v.shape[-1], dtype=dtype)
    k_state = torch.zeros(B, H, 1, kv_state.shape[2], dtype=dtype)
    ys = []
    for t in range(T):
        keys, values = k[:, :, t:t + 1], v[:, :, t:t + 1]
        if k_cache.shape[-2] < window_size:
            k_cache, v_cache = torch.cat([k_cache, keys], dim=-2), torch.cat([v_cache, values], dim=-2)
        else:
            k_st = f_k_fn(k_cache[:, :, :1, :])
            kv_state = kv_state + torch.einsum('bhlf,bhld->bhfd', k_st.to(dtype), v_cache[:, :, :1, :].to(dtype))
            k_state = k_state + k_st
            k_cache = torch.cat([k_cache[:, :, 1:, :], keys], dim=-2)
            v_cache = torch.cat([v_cache[:, :, 1:, :], values], dim=-2)
        qt = q[:, :, t:t + 1]
        f_q = f_q_fn(qt)
        a_sm = torch.einsum('bhmd,bhnd->bhmn', qt.to(dtype), k_cache.to(dtype)) * (k.shape[-1] ** -0.5)
        a_sm_max = torch.amax(a_sm, dim=-1, keepdim=True)
        a_sm = window_factor * torch.exp(a_sm - a_sm_max)
        sum_sm = a_sm.sum(dim=-1, keepdim=True)
        y = (torch.einsum('bhmn,bhnd->bhmd', a_sm, v_cache.to(dtype))
             + linear_factor * torch.einsum('bhlf,bhfd->bhld', f_q.to(dtype), kv_state.to(dtype)))
        sum_ln = linear_factor * torch.einsum('bhld,bhnd->bhl', f_q.to(dtype), k_state.to(dtype))[..., None]
        ys.append(y / (sum_sm + sum_ln))
    return torch.cat(ys, 2)


def _lolcats_case(T, window, affine, seed, state=None, kind="terraced", m="hedgehog"):
    return dict(B=2, T=T, H=2, HKV=2, D=8, DV=5, dtype="float32", map=m, window=window, kind=kind, affine=affine,
                window_scale=None, scale=1.0, state=state, seed=seed)


@pytest.mark.parametrize("T,window,affine,state,backend", [
    (T, w, affine, state, "auto") for T, w in [(32, 16), (48, 16), (64, 16), (64, 32), (96, 32)]
    for affine in (False, True) for state in (None, "pair")] + [(64, 16, False, "pair", "triton"),
                                                                (96, 32, True, None, "triton")])
def test_lolcats_quadratic(T, window, affine, state, backend):
    """T a multiple of w (where LoLCATs' cropped mask is causal) and T > w (its mask helper is degenerate at
    T = w): the float64 reference equals LoLCATs' function (to float64 rounding), the torch path (and in two cases
    the fused kernels) within its bound of it."""
    c = _lolcats_case(T, window, affine, seed=T + window, state=state)
    q, k, v, alpha, fm, st0 = inputs(c)
    wf = torch.sigmoid(alpha.double())[None, :, None, None]
    lf = 1 - wf if affine else 1
    tr = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, D] -> LoLCATs' [B, H, T, D]
    f_q, f_k = fm.features(q.double(), "query"), fm.features(k.double(), "key")
    kv_state = k_state = None
    if st0 is not None:
        kv_state, k_state = st0[0].double(), st0[1].double()[:, :, None]
    with torch.no_grad():
        y = tr(lolcats_hybrid_attention_quadratic(tr(q), tr(k), tr(f_q), tr(f_k), tr(v), wf, lf, window,
                                                  kv_state, k_state))
        ref, *_ = hy.hybrid_attention_reference(q, k, v, _map64(fm), alpha, initial_state=st0, **_kw(c))
    torch.testing.assert_close(ref, y, rtol=1e-10, atol=1e-12)
    o = lx.linear_attention(q, k, v, feature_map=fm, initial_state=st0, backend=backend, **_api_kw(c, alpha))
    check_forward(c, o, q, k, v, alpha, fm, st0)
    # the reference's gradients (q, k, v, alpha) are LoLCATs' function's, through float64 autograd
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, alpha)]
    fm64 = _map64(fm)
    wf = torch.sigmoid(leaves[3])[None, :, None, None]
    y = tr(lolcats_hybrid_attention_quadratic(tr(leaves[0]), tr(leaves[1]), tr(fm64.features(leaves[0], "query")),
                                              tr(fm64.features(leaves[1], "key")), tr(leaves[2]), wf,
                                              1 - wf if affine else 1, window, kv_state, k_state))
    ref, *_ = hy.hybrid_attention_reference(*leaves[:3], fm64, leaves[3], initial_state=st0, **_kw(c))
    do = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, a, b in zip("q k v alpha".split(), torch.autograd.grad((y * do).sum(), leaves),
                          torch.autograd.grad((ref * do).sum(), leaves)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=f"d{name}")


def test_lolcats_mask_differs_where_documented():
    """LoLCATs' mask helper at T = w wraps its single block onto itself (every earlier token also in the linear
    mask), and at T not a multiple of w crops a mask built for the next multiple: the reference follows the
    formula instead. (If these artifacts ever vanish from the transcription, the module doc is wrong.)"""
    sm, ln = lolcats_get_masks(16, 16, 16, "cpu")
    below = torch.ones(16, 16, dtype=torch.bool).tril(-1)
    assert bool((sm.bool() & ln.bool())[0, 0][below].all())  # both masks at once below the diagonal
    sm, _ = lolcats_get_masks(16, 40, 40, "cpu")  # blocks at -8, 8, 24 instead of 0, 16, 32
    ours, _ = hy.window_masks(torch.arange(40), torch.arange(40), 16, "terraced")
    assert not torch.equal(sm[0, 0].bool(), ours)


@pytest.mark.parametrize("affine", [False, True])
def test_sliding_matches_lolcats_decode(affine):
    """The sliding window is LoLCATs' decode: softmax over the last w keys, linear over those folded out."""
    c = _lolcats_case(45, 16, affine, seed=7, kind="sliding")
    q, k, v, alpha, fm, _ = inputs(c)
    wf = torch.sigmoid(alpha.double())[None, :, None, None]
    lf = 1 - wf if affine else 1
    tr = lambda x: x.transpose(1, 2)  # noqa: E731
    fmq = lambda x: tr(fm.features(tr(x).double(), "query"))  # noqa: E731
    fmk = lambda x: tr(fm.features(tr(x).double(), "key"))  # noqa: E731
    with torch.no_grad():
        y = tr(lolcats_decode(tr(q), tr(k), tr(v), fmq, fmk, wf, lf, 16))
        ref, *_ = hy.hybrid_attention_reference(q, k, v, _map64(fm), alpha, **_kw(c))
    torch.testing.assert_close(ref, y, rtol=1e-10, atol=1e-12)


# ---- reductions to softmax attention


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("kind,T", [("terraced", 32), ("terraced", 27), ("sliding", 16), ("sliding", 9)])
def test_window_covering_sequence_is_softmax_attention(kind, T, backend):
    """No token outside the window (terraced: T <= 2w; sliding: T <= w): exact causal softmax attention, whatever
    alpha, against SDPA (float64), grouped heads."""
    c = dict(B=2, T=T, H=4, HKV=2, D=8, DV=6, dtype="float32", map="elu", window=16, kind=kind, affine=False,
             window_scale=None, scale=1.0, state=None, seed=T)
    q, k, v, alpha, fm, _ = inputs(c)
    o = lx.linear_attention(q, k, v, feature_map=fm, backend=backend, **_api_kw(c, alpha))
    want = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    with torch.no_grad():
        ref, _, _, den = hy.hybrid_attention_reference(q, k, v, fm, alpha, **_kw(c))
        _, _, n_abs, d_abs = hy.hybrid_attention_reference(q, k, v, fm, alpha, absolute=True, **_kw(c))
    torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12)
    assert_within("o", o, want, bound_of(want, den, n_abs, d_abs), TOL["float32"])


def test_sliding_with_vanishing_linear_part_is_sliding_window_softmax():
    """g = 1 - sigmoid(40) ~ 4e-18: the sliding hybrid is softmax over the last w tokens, SDPA with that mask."""
    c = dict(B=1, T=70, H=2, HKV=2, D=8, DV=6, dtype="float32", map="elu", window=16, kind="sliding", affine=True,
             window_scale=None, scale=1.0, state=None, seed=1)
    q, k, v, _, fm, _ = inputs(c)
    alpha = torch.full((2,), 40.0)
    o = lx.linear_attention(q, k, v, feature_map=fm, **_api_kw(c, alpha))
    i = torch.arange(70)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 16)
    want = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)),
                                          attn_mask=mask).transpose(1, 2)
    with torch.no_grad():
        _, _, n_abs, d_abs = hy.hybrid_attention_reference(q, k, v, fm, alpha, absolute=True, **_kw(c))
        _, _, _, den = hy.hybrid_attention_reference(q, k, v, fm, alpha, **_kw(c))
    assert_within("o", o, want, bound_of(want, den, n_abs, d_abs), TOL["float32"])


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("kind", hy.KINDS)
def test_large_scores_do_not_overflow(kind, backend):
    """Scores around +-1e3 (exp overflows float32 past 88 and float64 past 709): the exact row max keeps every
    softmax term <= f, the output is finite and within its bound of the float64 reference, and the balance with
    the linear part is the formula's (the linear part is not rescaled)."""
    c = dict(B=1, T=50, H=2, HKV=1, D=16, DV=4, dtype="float32", map="elu", window=16, kind=kind, affine=True,
             window_scale=None, scale=1.0, state=None, seed=11)
    q, k, v, alpha, fm, _ = inputs(c)
    q, k = q * 20.0, k * 20.0  # c q.k = 400 q'.k' / 4: |scores| up to ~1.5e3
    with torch.no_grad():
        s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / 4
    assert s.abs().max() > 1e3
    o = lx.linear_attention(q, k, v, feature_map=fm, backend=backend, **_api_kw(c, alpha))
    assert torch.isfinite(o).all()
    check_forward(c, o, q, k, v, alpha, fm, None)
    alpha.requires_grad_()
    o = lx.linear_attention(q, k, v, feature_map=fm, backend=backend, **_api_kw(c, alpha))
    assert torch.isfinite(torch.autograd.grad(o.sum(), alpha)[0]).all()


# ---- decode


@settings(max_examples=max(6, settings.default.max_examples // 4))
@given(c=hcases(t_values=(1, 17, 40), state=None), split=st.integers(0, 40), inplace=st.booleans())
def test_prefill_then_steps_equal_one_call(c, split, inplace):
    """A prefill of the first tokens (return_state), then the rest one by one through the step (its ring buffer
    updated in place, or a copy): the outputs are within the bound of the reference and the final state equals
    one call's (the buffer exactly)."""
    note(hid(c))
    prefill_then_steps(c, split, inplace)


def prefill_then_steps(c, split, inplace, backend="auto"):
    q, k, v, alpha, fm, state = inputs(c)
    kw = dict(_api_kw(c, alpha), backend=backend)
    n = min(split, c["T"])
    o1, st_ = lx.linear_attention(q[:, :n], k[:, :n], v[:, :n], feature_map=fm, initial_state=state,
                                  return_state=True, **kw)
    outs = [o1]
    for t in range(n, c["T"]):
        if inplace:
            outs.append(lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], st_, feature_map=fm, **kw)[:, None])
        else:
            o_t, st_ = lx.linear_attention_step(q[:, t], k[:, t], v[:, t], st_, feature_map=fm, **kw)
            outs.append(o_t[:, None])
    o = torch.cat(outs, 1)
    check_state(c, st_, *check_forward(c, o, q, k, v, alpha, fm, state))
    o_full, st_full = lx.linear_attention(q, k, v, feature_map=fm, initial_state=state, return_state=True,
                                          **dict(kw, backend="torch"))
    torch.testing.assert_close(o, o_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_.S, st_full.S, rtol=1e-5, atol=1e-5)


def test_step_from_empty_state_updates_in_place():
    c = _lolcats_case(40, 16, False, seed=5, kind="terraced", m="elu")
    q, k, v, alpha, fm, _ = inputs(c)
    st_ = hy.empty_window_state(2, 2, 8, 8, 5, 16, "terraced")
    ptrs = [x.data_ptr() for x in st_]
    o = torch.stack([lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], st_, feature_map=fm,
                                               **_api_kw(c, alpha)) for t in range(40)], 1)
    assert [x.data_ptr() for x in st_] == ptrs and int(st_.pos[0]) == 40
    check_forward(c, o, q, k, v, alpha, fm, None)


def test_packed_sequences_and_rows_at_different_positions():
    """cu_seqlens: each sequence its own call (states per sequence, at different positions); then a batched step
    from those states, rows at different positions, equals each sequence's own longer call."""
    c = dict(B=1, T=60, H=4, HKV=2, D=8, DV=5, dtype="float32", map="hedgehog", window=16, kind="terraced",
             affine=False, window_scale=None, scale=1.0, state=None, seed=2)
    q, k, v, alpha, fm, _ = inputs(c)
    cu = torch.tensor([0, 21, 21, 60])
    for kind in hy.KINDS:
        c["kind"] = kind
        kw = _api_kw(c, alpha)
        o, st_ = lx.linear_attention(q, k, v, feature_map=fm, cu_seqlens=cu, return_state=True, **kw)
        assert st_.pos.tolist() == [21, 0, 39]
        for a, b in ((0, 21), (21, 60)):
            check_forward(c, o[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], alpha, fm, None)
        # one more token per sequence, batched
        g = torch.Generator().manual_seed(9)
        qn, kn, vn = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 5,
                                                                                                    generator=g)
        o_step = lx.linear_attention_step_(qn, kn, vn, st_, feature_map=fm, **kw)
        for n, (a, b) in enumerate(((0, 21), (21, 21), (21, 60))):
            qq, kk, vv = (torch.cat([x[:, a:b], y[n:n + 1, None]], 1) for x, y in ((q, qn), (k, kn), (v, vn)))
            want = lx.linear_attention(qq, kk, vv, feature_map=fm, **kw)[:, -1]
            torch.testing.assert_close(o_step[n:n + 1], want, rtol=1e-5, atol=1e-6)


# ---- the module


def test_module_window():
    torch.manual_seed(0)
    attn = lx.nn.LinearAttention(32, 4, num_kv_heads=2, window=16, window_kind="sliding")
    assert torch.allclose(torch.sigmoid(attn.window_mix.detach()), torch.full((4,), 0.1))  # LoLCATs' init
    x = torch.randn(2, 40, 32)
    y, st_ = attn(x[:, :25], return_state=True)
    steps = []
    for t in range(25, 40):
        y_t, st_ = attn.step(x[:, t], st_)
        steps.append(y_t)
    full = attn(x)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 25:], rtol=1e-5, atol=1e-6)
    st2 = attn.init_state(2)
    y2 = torch.stack([attn.step(x[:, t], st2, inplace=True)[0] for t in range(40)], 1)
    torch.testing.assert_close(y2, full, rtol=1e-5, atol=1e-6)
    full.square().sum().backward()
    assert attn.window_mix.grad is not None and attn.window_mix.grad.abs().sum() > 0


# ---- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=8), "multiple of 16"), (dict(window=24), "multiple of 16"), (dict(window=2048), "multiple of 16"),
    (dict(window=0), "multiple of 16"), (dict(window=16, window_kind="banded"), "window_kind"),
    (dict(window=16, window_mix=torch.zeros(3)), r"shape \[H\]"),
    (dict(window=16, causal=False), "causal"), (dict(window=16, normalize=False), "normalize"),
    (dict(window=16, initial_state=(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8))), "initial_state S"),
    (dict(window=16, initial_state=hy.empty_window_state(1, 2, 8, 8, 5, 32, "terraced")), "state.k"),
])
def test_bad_input_raises(kwargs, match):
    q, k, v = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 5)
    with pytest.raises(ValueError, match=match):
        lx.linear_attention(q, k, v, **kwargs)


def test_bad_step_input_raises():
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="D up to 32"):
        lx.linear_attention_step(q.repeat(1, 1, 5), k.repeat(1, 1, 5), v, None, window=16, backend="triton",
                                 feature_map=lx.feature_maps.taylor(40))
    with pytest.raises(ValueError, match="state.k"):
        lx.linear_attention_step_(q, k, v, hy.empty_window_state(1, 2, 8, 8, 5, 16, "sliding"), window=16)
    with pytest.raises(TypeError, match="preallocated"):
        lx.linear_attention_step_(q, k, v, None, window=16)
    with pytest.raises(TypeError, match="updates a WindowState"):
        lx.linear_attention_step_(q, k, v, (torch.zeros(1, 2, 8, 5), torch.zeros(1, 2, 8)), window=16)
    st_ = hy.empty_window_state(1, 2, 8, 8, 5, 16, "terraced")
    with pytest.raises(ValueError, match="contiguous"):
        lx.linear_attention_step_(q, k, v, st_._replace(S=st_.S.transpose(2, 3).contiguous().transpose(2, 3)),
                                  window=16)
    with pytest.raises(ValueError, match=r"shape \[H\]"):
        lx.linear_attention_step(q, k, v, None, window=16, window_mix=torch.zeros(5))


def test_bench_runs_tiny(capsys, tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import hybrid as bench_hybrid

    threads = torch.get_num_threads()
    try:
        bench_hybrid.main(["--T", "64,96", "--H", "1", "--D", "16", "--window", "16", "--repeat", "1", "--quad-max-T",
                           "64", "--threads", "1", "--json", str(tmp_path / "rows.json")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "hybrid (chunked)" in out and "sdpa sliding" in out and "not run" in out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["ms"] > 0 for r in rows if r["way"] != "lolcats quadratic" or r["T"] == 64)


# ---- shapes: the largest windows, empty calls, packed continuation, no T x T tensor


@pytest.mark.parametrize("window,T", [(256, 530), (1024, 1100)])
def test_large_windows(window, T):
    c = dict(B=1, T=T, H=2, HKV=1, D=4, DV=3, dtype="float32", map="elu", window=window, kind="terraced",
             affine=False, window_scale=None, scale=1.0, state=None, seed=T)
    for kind in hy.KINDS:
        c["kind"] = kind
        q, k, v, alpha, fm, _ = inputs(c)
        o, st_ = lx.linear_attention(q, k, v, feature_map=fm, return_state=True, **_api_kw(c, alpha))
        check_state(c, st_, *check_forward(c, o, q, k, v, alpha, fm, None))


@pytest.mark.parametrize("state", [None, "pair", 23])
def test_empty_call_passes_state_through(state):
    c = dict(_lolcats_case(0, 16, False, seed=4, state=state, m="elu"), B=2)
    q, k, v, alpha, fm, st0 = inputs(c)
    o, st_ = lx.linear_attention(q, k, v, feature_map=fm, initial_state=st0, return_state=True, **_api_kw(c, alpha))
    assert o.shape == (2, 0, 2, 5)
    if st0 is None:
        assert (st_.S == 0).all() and (st_.pos == 0).all()
    elif isinstance(st0, hy.WindowState):
        assert all(torch.equal(a, b) for a, b in zip(st_, st0))
    # a copy: an in-place step on the returned state leaves the initial state alone
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(st_, st0 or ()))


def test_packed_call_continues_packed_states():
    """A packed call from the states of an earlier packed call equals one packed call over the joined sequences."""
    c = dict(B=1, T=90, H=2, HKV=2, D=8, DV=5, dtype="float32", map="relu", window=16, kind="terraced",
             affine=True, window_scale=None, scale=1.0, state=None, seed=8)
    q, k, v, alpha, fm, _ = inputs(c)
    first, second = [(0, 10), (10, 40), (40, 40)], [(40, 55), (55, 55), (55, 90)]  # sequence n: first[n] + second[n]
    cu = lambda parts: torch.tensor([0] + [b - parts[0][0] for _, b in parts])  # noqa: E731
    sl = lambda x, parts: x[:, parts[0][0]:parts[-1][1]]  # noqa: E731
    for kind in hy.KINDS:
        kw = dict(_api_kw(c, alpha), window_kind=kind)
        o1, st1 = lx.linear_attention(*(sl(x, first) for x in (q, k, v)), feature_map=fm, cu_seqlens=cu(first),
                                      return_state=True, **kw)
        o2, st2 = lx.linear_attention(*(sl(x, second) for x in (q, k, v)), feature_map=fm, cu_seqlens=cu(second),
                                      initial_state=st1, return_state=True, **kw)
        for n in range(3):
            idx = list(range(*first[n])) + list(range(*second[n]))
            o, st_ = lx.linear_attention(q[:, idx], k[:, idx], v[:, idx], feature_map=fm, return_state=True, **kw)
            got = torch.cat([o1[:, first[n][0]:first[n][1]], o2[:, second[n][0] - 40:second[n][1] - 40]], 1)
            torch.testing.assert_close(got, o, rtol=1e-5, atol=1e-6)
            assert torch.equal(st2.k[n], st_.k[0]) and int(st2.pos[n]) == len(idx)


def test_no_quadratic_tensor():
    """Forward + backward at T = 1024, w = 16: no tensor allocated holds T x T elements per head (the largest is
    the chunks' [w, 2w] score tiles, T x 2w per head)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    B, T, H, D, w = 1, 1024, 2, 8, 16
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    alpha = torch.zeros(H, requires_grad=True)
    with Largest():
        o = lx.linear_attention(q, k, v, window=w, window_mix=alpha)
        torch.autograd.grad(o.sum(), (q, k, v, alpha))
    assert Largest.numel <= B * H * T * 2 * w < T * T


@pytest.mark.parametrize("family", ["favor", "fourier"])
@pytest.mark.parametrize("kind", hy.KINDS)
def test_random_feature_maps(family, kind):
    """Random-feature maps: FAVOR+'s positive features, and random Fourier's signed ones on inputs that keep each
    phi(q)^T phi(k) >= 1/2 (lintx_triton.testing.positive_den_inputs); outputs and gradients with their bounds."""
    fm = lx.feature_maps.RANDOM_FAMILIES[family](8, 12, 3)
    c = dict(B=2, T=53, H=2, HKV=1, D=8, DV=4, dtype="float32", map="elu", window=16, kind=kind, affine=True,
             window_scale=None, scale=0.5, state=None, seed=21)
    q, k, v, alpha, _, _ = inputs(c)
    if family == "fourier":
        from lintx_triton.testing import _positive_den

        q, k = _positive_den(fm, q), _positive_den(fm, k)
    o = lx.linear_attention(q, k, v, feature_map=fm, **_api_kw(c, alpha))
    check_forward(c, o, q, k, v, alpha, fm, None)
    check_grads(c, *(x.requires_grad_() for x in (q, k, v, alpha)), fm, None)


def test_non_contiguous_inputs():
    c = _lolcats_case(37, 16, True, seed=12, kind="sliding", m="elu")
    q, k, v, alpha, fm, _ = inputs(c)
    nc = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  ([B, H, T, D] storage)
    assert not nc(q).is_contiguous()
    kw = _api_kw(c, alpha)
    o, st_ = lx.linear_attention(nc(q), nc(k), nc(v), feature_map=fm, return_state=True, **kw)
    check_forward(c, o, q, k, v, alpha, fm, None)
    o_t = lx.linear_attention_step_(nc(q)[:, -1].transpose(0, 1).contiguous().transpose(0, 1), k[:, -1], v[:, -1],
                                    st_, feature_map=fm, **kw)
    q2, k2, v2 = (torch.cat([x, x[:, -1:]], 1) for x in (q, k, v))
    torch.testing.assert_close(o_t, lx.linear_attention(q2, k2, v2, feature_map=fm, **kw)[:, -1], rtol=1e-5,
                               atol=1e-6)
