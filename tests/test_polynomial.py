"""Polynomial feature maps (Based's Taylor map, full and compressed; ReBased's learnable one) through the kernels,
which walk phi in blocks of features (M = 273 at D = 16: nine blocks of 32), against the float64 reference of
lintx_triton.testing; and the maps against the papers' formulas. ReBased is also drawn by test_learnable's
properties (a learnable family)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import case_id, cases, check_forward, check_grads, check_state, decode_steps, forward_and_grads, \
    make_inputs
from lintx_triton import testing
from test_feature_maps import _Allocations

POLY = tuple(lx.feature_maps.POLYNOMIAL_FAMILIES)
BLOCKED = lx.feature_maps.BLOCKED_FAMILIES  # the polynomial families and ReBased


def _based_taylor_exp(x: torch.Tensor) -> torch.Tensor:
    """Based's ``TaylorExp.forward`` transcribed (HazyResearch/based 32c1bd4,
    based/models/mixers/linear_attention.py:62-72), input_dim = x.shape[-1]."""
    d = x.shape[-1]
    r2, rd = math.sqrt(2), math.sqrt(d)
    rrd = math.sqrt(rd)
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / r2
    return torch.cat([x[..., :1] ** 0, x / rrd, x2 / rd], dim=-1)


@given(D=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_taylor_is_based_map_and_its_kernel(D, seed):
    """phi is Based's TaylorExp exactly (the full form), and both forms give phi(q)^T phi(k) = 1 + s + s^2 / 2,
    s = q.k / sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(5, D, generator=g, dtype=torch.float64) for _ in range(2))
    full, comp = lx.feature_maps.taylor(D), lx.feature_maps.taylor(D, compressed=True)
    assert full.feature_dim(D) == 1 + D + D * D and comp.feature_dim(D) == 1 + D + D * (D + 1) // 2
    torch.testing.assert_close(full.reference(q), _based_taylor_exp(q), rtol=8 * torch.finfo(torch.float64).eps, atol=0)
    s = (q * k).sum(-1) / math.sqrt(D)
    want = 1 + s + s * s / 2
    scale = 1 + s.abs() + s * s  # the terms' magnitude: the rounding of a sum is relative to it
    for fm in (full, comp):
        got = (fm.reference(q) * fm.reference(k)).sum(-1)
        assert ((got - want).abs() <= 64 * torch.finfo(torch.float64).eps * scale * (1 + D)).all(), fm.name


@given(D=st.integers(2, 20), heads=st.sampled_from([1, 3]), compressed=st.booleans(), seed=st.integers(0, 2**16))
def test_rebased_is_its_papers_kernel(D, heads, compressed, seed):
    """y = gamma LayerNorm(x) + beta as torch's layer_norm computes it, and phi(q)^T phi(k) = (y_q . y_k)^2 / D:
    the scores of corl-team/rebased's model (LayerNorm, then parallel_rebased's (q.k / sqrt(d))^2)."""
    g = torch.Generator().manual_seed(seed)
    fm = lx.feature_maps.rebased(D, heads=heads, compressed=compressed)
    with torch.no_grad():
        fm.query.weight.copy_(1 + torch.randn(heads, D, generator=g))
        fm.query.bias.copy_(torch.randn(heads, D, generator=g))
    q, k = (torch.randn(4, heads, D, generator=g, dtype=torch.float64) for _ in range(2))
    gamma, beta = fm.query.weight.double(), fm.query.bias.double()
    y = [torch.stack([torch.nn.functional.layer_norm(x[:, h], (D,), gamma[h], beta[h], eps=1e-5)
                      for h in range(heads)], 1) for x in (q, k)]
    want = (y[0] * y[1]).sum(-1) ** 2 / D
    got = (fm.features(q, "query") * fm.features(k, "key")).sum(-1)
    # the rounding of y = gamma n + beta is relative to |gamma n| + |beta|, not to |y| (they cancel where y is
    # small: D = 2, seed 349 failed a bound built from |y|): the bound is built from the terms before the sum
    m = [gamma.abs() * torch.stack([torch.nn.functional.layer_norm(x[:, h], (D,), eps=1e-5) for h in range(heads)],
                                   1).abs() + beta.abs() for x in (q, k)]
    scale = (m[0] * m[1]).sum(-1) ** 2 / D
    assert ((got - want).abs() <= 64 * torch.finfo(torch.float64).eps * scale * D).all()
    assert fm.feature_dim(D) == (D * (D + 1) // 2 if compressed else D * D)


# a twentieth of the profile's examples (ci: 2 of 40, ~10 s each on 2 cores, beside the explicit D = 16 case,
# nine feature blocks through every kernel in the interpreter; the thorough profile: 15); test_learnable's
# properties draw ReBased, lintx fuzz all three
@settings(max_examples=max(2, settings.default.max_examples // 20))
@given(c=cases(maps=POLY, t_values=(1, 7, 17, 33), d_values=(1, 4, 8, 12), dv_values=(1, 8, 24, 40),
               eps_values=testing.EPS_VALUES),
       path=st.sampled_from(["chunked", "fused"]))
# Based's D = 16 (M = 273: nine feature blocks, the last 17 wide), fused from an initial state, grouped heads
@example(c=dict(B=1, T=19, H=2, HKV=1, D=16, DV=40, dtype="float32", feature_map="taylor_d16", causal=True,
                normalize=True, initial_state=True, scale=0.25, seed=7, map=dict(family="taylor", D=16)),
         path="fused")
def test_forward_state_and_grads(kernel_device, c, path):
    """o, S_T and every gradient (q, k, v, the initial state) on the Triton path, forward fused or chunked."""
    note(case_id(c))
    q, k, v, state = make_inputs(c, device=kernel_device)
    fm = testing.ensure_map(c)
    with lx.config.override(path=path):
        o, st_ = lx.linear_attention(q, k, v, feature_map=fm, initial_state=state, backend="triton",
                                     return_state=True, **testing.call_kwargs(c))
        got, want, bounds, names = forward_and_grads(c, "triton", device=kernel_device)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)
    check_grads(c, got, want, bounds, names)


@pytest.mark.parametrize("family,D", [("taylor", 10), ("taylor_c", 8), ("rebased", 8)],
                         ids=["taylor-D10", "taylor_c-D8", "rebased-D8-W4.k2"])
def test_packed_grouped(kernel_device, family, D):
    """Three packed sequences (one empty) on grouped heads (M = 111: four feature blocks of 32, the last 15 wide;
    M = 45: two, the last 13 wide; ReBased M = 64, untied, gamma and beta per head): outputs and gradients
    (gamma's and beta's too) against the reference run sequence by sequence."""
    c = dict(B=1, T=21, H=4, HKV=2, D=D, DV=5, dtype="float32", causal=True, normalize=True, initial_state=False,
             scale=0.5, seed=3, map=dict(family=family, D=D))
    if family == "rebased":
        c["map"].update(M=D * D, seed=1, heads=4, key_heads=2)
    c["feature_map"] = testing.ensure_map(c).name
    cu = torch.tensor([0, 8, 8, 21], device=kernel_device)
    q, k, v, _ = make_inputs(c, requires_grad=True, device=kernel_device)
    o = lx.linear_attention(q, k, v, feature_map=testing.ensure_map(c), cu_seqlens=cu, backend="triton",
                            normalize=True, scale=0.5)
    check_forward(c, o, q, k, v, None, cu_seqlens=cu)
    got, want, bounds, names = forward_and_grads(c, "triton", inputs=(q, k, v, None), cu_seqlens=cu)
    check_grads(c, got, want, bounds, names)


@settings(max_examples=max(4, settings.default.max_examples // 8))
@given(c=cases(maps=BLOCKED, causal=True, t_values=(1, 5, 9), d_values=(4, 12), dv_values=(3, 40)),
       inplace=st.booleans())
def test_decode_and_state_api(kernel_device, c, inplace):
    """Token by token through the decode kernel (in place or not), and the state alone: the same as the
    reference."""
    note(case_id(c))
    q, k, v, state = make_inputs(c, device=kernel_device)
    with torch.no_grad():
        od, (Sd, zd) = decode_steps(c, q, k, v, state, backend="triton", inplace=inplace)
    check_forward(c, od, q, k, v, state)
    check_state(c, (Sd, zd), q, k, v, state)
    S2, z2 = lx.linear_attention_state(k, v, feature_map=testing.ensure_map(c), initial_state=state,
                                       backend="triton")
    check_state(c, (S2, z2), q, k, v, state)


def test_state_gradients(kernel_device):
    """dk, dv of the state alone (the (dk, dv) kernel's non-causal, unnormalized form) at D = 16 against float64
    autograd of the map, within GTOL of bounds built from absolute values: |dv| <= |phi(k)| |dS|, and for dk the
    gradient of sum_f G_f |phi_f(k)| with G = |v| |dS|^T + |dz| (each of Taylor's features is a product of
    |y_i|, so that gradient's magnitude sums the magnitudes of dk's terms)."""
    fm = lx.feature_maps.taylor(16)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 19, 3, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 19, 3, 6, generator=g, dtype=torch.float64)
    dS, dz = torch.randn(2, 3, 273, 6, generator=g), torch.randn(2, 3, 273, generator=g)
    kt, vt = (x.float().to(kernel_device).requires_grad_() for x in (k, v))
    S, z = lx.linear_attention_state(kt, vt, feature_map=fm, backend="triton")
    got = torch.autograd.grad((S * dS.to(S.device)).sum() + (z * dz.to(z.device)).sum(), (kt, vt))
    k64, v64 = k.clone().requires_grad_(), v.clone().requires_grad_()
    b = fm.reference(k64)  # [B, T, H, M]
    want = torch.autograd.grad(torch.einsum("bthm,bthv,bhmv->", b, v64, dS.double())
                               + torch.einsum("bthm,bhm->", b, dz.double()), (k64, v64))
    G = torch.einsum("bthv,bhmv->bthm", v.abs(), dS.double().abs()) + dz.double().abs()[:, None]
    ka = k.clone().requires_grad_()
    bound_k = torch.autograd.grad((G * fm.reference(ka).abs()).sum(), ka)[0].abs()
    bound_v = torch.einsum("bthm,bhmv->bthv", fm.reference(k).abs(), dS.double().abs())
    for name, a, w, bound in (("dk", got[0], want[0], bound_k), ("dv", got[1], want[1], bound_v)):
        testing.assert_within(name, a.cpu(), w, bound, testing.GTOL["float32"])


def test_no_phi_buffer_in_forward_or_backward():
    """D = 8, M = 73 (three feature blocks): forward + backward allocate nothing of B*T*H*M elements (the torch
    backend, which stores phi, is the control)."""
    B, T, H, D, DV = 1, 128, 2, 8, 4
    fm = lx.feature_maps.taylor(D)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, D, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g, requires_grad=True)
    phi_numel = B * T * H * fm.feature_dim(D)
    for backend, expect in (("triton", False), ("torch", True)):
        with _Allocations() as probe:
            o = lx.linear_attention(q, k, v, feature_map=fm, backend=backend)
            grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        assert all(x is not None for x in grads)
        assert (max(probe.sizes) >= phi_numel) == expect, (backend, max(probe.sizes), phi_numel)


def test_opcheck():
    """The schemas with a blocked map (no parameters: fq, fk None), forward, backward and the state ops."""
    fm = lx.feature_maps.taylor(6)  # M = 43: two feature blocks
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 6, generator=g, requires_grad=True) for _ in range(3))
    args = (None, fm.name, True, True, 0.5, 1e-6)
    torch.library.opcheck(torch.ops.lintx.linear_attention_fwd.default, (q, k, v, None, None, None, None) + args)
    with torch.no_grad():
        o, den, S, z = torch.ops.lintx.linear_attention_fwd(q, k, v, None, None, None, None, *args)
    torch.library.opcheck(torch.ops.lintx.linear_attention_bwd.default,
                          (torch.randn_like(o), None, None, q.detach(), k.detach(), v.detach(), o, den, None, None,
                           None, None, None, fm.name, True, True, 0.5, False))
    torch.library.opcheck(torch.ops.lintx.linear_attention_state.default, (k, v, None, None, None, None, fm.name))
    torch.library.opcheck(torch.ops.lintx.linear_attention_state_bwd.default,
                          (torch.randn_like(S), torch.randn_like(z), k.detach(), v.detach(), None, None, fm.name,
                           False))


def test_rebased_module():
    """The module registers gamma and beta and trains them, and its decode step continues a prefill."""
    g = torch.Generator().manual_seed(0)
    # (the schemas with a learnable map's parameters and their gradients: test_learnable's opcheck, the same ops;
    # a blocked map's: test_opcheck)
    m = lx.nn.LinearAttention(32, 4, feature_map=lx.feature_maps.rebased(8, heads=4))
    assert {"feature_map.query.weight", "feature_map.query.bias"} <= {n for n, _ in m.named_parameters()}
    x = torch.randn(2, 9, 32, generator=g)
    m(x).square().sum().backward()
    assert m.feature_map.query.weight.grad.abs().sum() > 0 and m.feature_map.query.bias.grad.abs().sum() > 0
    with torch.no_grad():
        y, state = m(x[:, :8], return_state=True)
        y_last, _ = m.step(x[:, 8], state)
        torch.testing.assert_close(y_last, m(x)[:, 8], atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_forward_and_backward():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fm = lx.feature_maps.taylor(16, compressed=True)

    def f(q, k, v):
        return lx.linear_attention(q, k, v, feature_map=fm, backend="triton").square().sum()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    got = torch.autograd.grad(torch.compile(f, backend=backend, fullgraph=True)(q, k, v), [q, k, v])
    want = torch.autograd.grad(f(q, k, v), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1


def test_limits_and_bad_input():
    fm = lx.feature_maps.taylor(16)
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="built for head vectors of width 16"):
        lx.linear_attention(q, q, q, feature_map=fm)
    wide = lx.feature_maps.taylor(40)  # M = 1641: the torch backend takes it, the kernels do not
    x = torch.randn(1, 3, 1, 40)
    with pytest.raises(ValueError, match="blocked map"):
        lx.linear_attention(x, x, x, feature_map=wide, backend="triton")
    o = lx.linear_attention(x.double().float(), x, x, feature_map=wide, backend="torch")
    assert o.shape == (1, 3, 1, 40)
    with pytest.raises(ValueError, match="positive int"):
        lx.feature_maps.taylor(0)
    with pytest.raises(ValueError, match="one-line Triton expression"):
        lx.feature_maps.PolynomialFeatureMap("bad_poly", 4, pre="")


def test_user_polynomial_map(kernel_device):
    """A user's own map of the family: the quadratic part alone of a scaled input (ReBased's kernel without its
    normalization: phi(q)^T phi(k) = (q.k / 4)^2), compressed, through the kernels against the reference."""
    fm = lx.feature_maps.PolynomialFeatureMap("square_d8", 8, quadratic=0.25, compressed=True, pre="x * 0.5",
                                              pre_vjp="g * 0.5", reference_pre=lambda x: x * 0.5)
    qq, kk = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close((fm.reference(qq) * fm.reference(kk)).sum(-1), ((qq * kk).sum(-1) / 4) ** 2 / 16)
    c = dict(B=1, T=20, H=2, D=8, DV=6, dtype="float32", feature_map=lx.feature_maps.register(fm).name, causal=True,
             normalize=False, initial_state=True, scale=1.0, seed=5)
    q, k, v, state = make_inputs(c, device=kernel_device)
    o, st_ = lx.linear_attention(q, k, v, feature_map=fm, initial_state=state, backend="triton", normalize=False,
                                 return_state=True)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)
    got, want, bounds, names = forward_and_grads(c, "triton", device=kernel_device)
    check_grads(c, got, want, bounds, names)
