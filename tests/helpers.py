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
# Gradients: normwise relative error against float64 autograd, or (for ill-conditioned cases, where the
# exact gradient is tiny next to the terms that cancel in it) within NAIVE_FUDGE times the error of the
# equations evaluated naively in the inputs' precision (FlexAttention's `_check_equal` idea).
GTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
NAIVE_FUDGE = 8.0
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


def assert_grads_close(c: dict, got, want, naive, names):
    """``want``: float64 gradients; ``naive``: the same equations differentiated in the inputs' dtype."""
    tol = GTOL[c["dtype"]]
    for name, g, w, n in zip(names, got, want, naive):
        assert g is not None, f"no gradient for {name}"
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        err = (g.double() - w).norm().item()
        ref = w.norm().item()
        naive_err = (n.double() - w).norm().item()
        assert err <= max(tol * ref, NAIVE_FUDGE * naive_err) + 1e-12, (
            f"d{name}: normwise error {err:.3e} (relative {err / max(ref, 1e-30):.3e} > {tol}, "
            f"and > {NAIVE_FUDGE} x the naive {c['dtype']} evaluation's {naive_err:.3e})"
        )


def run(c, q, k, v, state, backend, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, backend=backend, return_state=return_state, **kwargs(c))
