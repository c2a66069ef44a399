"""Shared strategies, inputs and error bounds for the property tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import lintx_triton as lx
from lintx_triton import feature_maps
from lintx_triton.reference import linear_attention_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Forward: |o - ref| <= TOL * bound (see `forward_bound`). fp32 runs IEEE products; fp16 rounds the
# operands of each product to 11 bits; bf16 (upcast under the interpreter) rounds the output to 8 bits,
# and the interpreter's fp32 -> bf16 cast truncates (up to 2^-7 relative).
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 1.6e-2}
# Gradients: |g - ref| <= GTOL * bound elementwise, where the bound is the gradient of the magnitudes of
# the terms that are summed (`grad_bound`), so cancellation in an exact gradient cannot make it flaky.
GTOL = {"float32": 5e-5, "float16": 5e-3, "bfloat16": 2e-2}
# Sequence lengths around the interpreter's chunk sizes (16, 32) and some primes.
T_VALUES = [1, 2, 7, 15, 16, 17, 31, 32, 33, 47, 61]
D_VALUES = [1, 4, 8, 13, 16, 32, 48]
DV_VALUES = [1, 3, 8, 16, 24, 48, 80]


@st.composite
def cases(draw, maps=("elu", "relu", "identity"), dtypes=tuple(DTYPES), t_values=T_VALUES):
    causal = draw(st.booleans())
    return dict(
        B=draw(st.integers(1, 2)),
        T=draw(st.sampled_from(t_values)),
        H=draw(st.integers(1, 3)),
        D=draw(st.sampled_from(D_VALUES)),
        DV=draw(st.sampled_from(DV_VALUES)),
        dtype=draw(st.sampled_from(dtypes)),
        feature_map=draw(st.sampled_from(maps)),
        causal=causal,
        normalize=draw(st.booleans()),
        initial_state=causal and draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 0.125, 0.5])),
        seed=draw(st.integers(0, 2**16)),
    )


def case_id(c: dict) -> str:
    return (
        f"B{c['B']}-T{c['T']}-H{c['H']}-D{c['D']}-DV{c['DV']}-{c['dtype']}-{c['feature_map']}"
        f"-{'causal' if c['causal'] else 'full'}-{'norm' if c['normalize'] else 'raw'}"
        f"{'-h0' if c['initial_state'] else ''}-scale{c['scale']}"
    )


def make_inputs(c: dict, requires_grad: bool = False):
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, T, H, D, DV = c["B"], c["T"], c["H"], c["D"], c["DV"]
    q = torch.randn(B, T, H, D, generator=g).to(dt)
    k = torch.randn(B, T, H, D, generator=g).to(dt)
    v = torch.randn(B, T, H, DV, generator=g).to(dt)
    state = None
    if c["initial_state"]:
        M = feature_maps.get(c["feature_map"]).feature_dim(D)
        # a state as a previous segment of 5 tokens would leave it
        kk = feature_maps.get(c["feature_map"]).reference(torch.randn(B, 5, H, D, generator=g))
        vv = torch.randn(B, 5, H, DV, generator=g)
        state = (torch.einsum("bthm,bthv->bhmv", kk, vv).contiguous(), kk.sum(1).contiguous())
        assert state[0].shape == (B, H, M, DV)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        if state is not None:
            state = tuple(x.requires_grad_() for x in state)
    return q, k, v, state


def kwargs(c: dict) -> dict:
    return dict(feature_map=c["feature_map"], causal=c["causal"], normalize=c["normalize"], scale=c["scale"])


def reference(c: dict, q, k, v, state, absolute=False, dtype=torch.float64):
    return linear_attention_reference(
        q, k, v, feature_maps.get(c["feature_map"]), initial_state=state, absolute=absolute, dtype=dtype, **{
            key: val for key, val in kwargs(c).items() if key != "feature_map"
        }
    )


def forward_bound(c: dict, q, k, v, state):
    """Per-element scale of the rounding error of o.

    The reference on absolute values gives N = scale |a|^T (|S_0| + sum |b||v|^T) and
    Dn = scale |a|^T (|z_0| + sum |b|) + eps: what the kernels' sums add up in magnitude. For
    o = num / den, a relative error u on num and den moves o by u (N + |o| Dn) / |den|.
    """
    o, _, num, den = reference(c, q, k, v, state)
    _, _, n_abs, d_abs = reference(c, q, k, v, state, absolute=True)
    if not c["normalize"]:
        return o, n_abs
    return o, (n_abs + o.abs() * d_abs[..., None]) / den.abs()[..., None]


def assert_forward_close(c: dict, out: torch.Tensor, q, k, v, state, what="o"):
    ref, bound = forward_bound(c, q, k, v, state)
    assert out.dtype == q.dtype and out.shape == ref.shape
    err = (out.double() - ref).abs()
    tol = TOL[c["dtype"]]
    limit = tol * bound + 1e-30
    bad = ~(err <= limit)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst err {err.max().item():.3e}, "
        f"worst err/bound {(err / bound).max().item():.3e} > tol {tol}"
    )


def grad_bound(c: dict, leaves, do, dS, dz):
    """Per-element scale of the rounding error of each gradient.

    The float64 reference on absolute values, with |do|, |dS|, |dz|, differentiated: every term of every
    gradient enters with its magnitude, so the result bounds what the kernels' sums add up. For the
    normalized output o = num / den the loss is linearized as |do| (N + |o| Dn) / |den| (the magnitudes
    of d num and d den), with o and den held fixed.
    """
    leaves = [x.detach().double().requires_grad_() for x in leaves]
    state = tuple(leaves[3:]) if len(leaves) > 3 else None
    o, _, _, den = reference(c, *(x.detach() for x in leaves[:3]), tuple(x.detach() for x in state) if state else None)
    _, (S_abs, z_abs), n_abs, d_abs = reference(c, *leaves[:3], state, absolute=True)
    if c["normalize"]:
        out = (n_abs + o.abs() * d_abs[..., None]) / den.abs()[..., None]
    else:
        out = n_abs
    loss = (out * do.double().abs()).sum() + (S_abs * dS.double().abs()).sum() + (z_abs * dz.double().abs()).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [g.abs() if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def assert_grads_close(c: dict, got, want, bounds, names):
    tol = GTOL[c["dtype"]]
    for name, g, w, b in zip(names, got, want, bounds):
        assert g is not None, f"no gradient for {name}"
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        err = (g.double() - w).abs()
        fi = torch.finfo(g.dtype)
        # + the spacing of subnormals: a gradient below the smallest normal is stored with fewer bits
        bad = ~(err <= tol * b + fi.smallest_normal * fi.eps)
        assert not bad.any(), (
            f"d{name}: {int(bad.sum())} of {err.numel()} elements off; worst err {err.max().item():.3e}, "
            f"worst err/bound {(err / b).nan_to_num(posinf=float('inf')).max().item():.3e} > tol {tol}"
        )


def run(c, q, k, v, state, backend, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, backend=backend, return_state=return_state, **kwargs(c))
