"""Gradients of q, k, v and the initial state against float64 autograd through the reference.

Each element is held to a bound scaled by the magnitudes of the terms its exact value sums
(lintx_triton.testing.grad_bound). The bound is first order: it holds while rounding moves the normalizer by a
small fraction of itself. identity + normalize breaks that (its normalizer, a signed sum, passes
through 0: the README says to use it unnormalized), so its gradients are not drawn here; its forward
is tested, and relu, whose normalizer can be exactly eps, is drawn normalized.
"""

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import case_id, cases, check_grads, forward_and_grads, grad_bound, make_inputs, reference_grads


def _grads(c, backend, path="chunked", chunk=16, final_state_grad=True):
    with lx.config.override(path=path, bwd_chunk=chunk):
        return forward_and_grads(c, backend, final_state_grad=final_state_grad)


@given(c=cases(), chunk=st.sampled_from([16, 32]), final_state_grad=st.booleans())
def test_triton_gradients(c, chunk, final_state_grad):
    assume(not (c["feature_map"] == "identity" and c["normalize"]))
    note(case_id(c))
    got, want, bounds, names = _grads(c, "triton", chunk=chunk, final_state_grad=final_state_grad)
    check_grads(c, got, want, bounds, names)


@given(c=cases())
def test_torch_backend_gradients(c):
    assume(not (c["feature_map"] == "identity" and c["normalize"]))
    note(case_id(c))
    got, want, bounds, names = _grads(c, "torch")
    check_grads(c, got, want, bounds, names)


def test_gradient_only_through_output():
    """No gradient reaches the final state: the backward gets dS = dz = None."""
    c = dict(B=1, T=19, H=2, D=8, DV=8, dtype="float32", feature_map="elu", causal=True, normalize=True,
             initial_state=True, scale=1.0, seed=5)
    q, k, v, state = make_inputs(c, requires_grad=True)
    o = lx.linear_attention(q, k, v, initial_state=state, backend="triton")
    leaves = [q, k, v, *state]
    got = torch.autograd.grad(o.sum(), leaves)
    do = torch.ones(o.shape)  # the loss o.sum(); no term of the final state
    want, bounds = reference_grads(c, leaves, do), grad_bound(c, leaves, do)
    check_grads(c, got, want, bounds, ["q", "k", "v", "S_0", "z_0"])


def test_torch_gradcheck_float64_torch_backend():
    """The PyTorch path is differentiable in float64 too (finite differences)."""
    from lintx_triton import feature_maps
    from lintx_triton.reference import linear_attention_torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 1, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        # float64 in, fp32 inside: compare the reference instead, which is what the kernels are checked against
        from lintx_triton.reference import linear_attention_reference
        return linear_attention_reference(q, k, v, feature_maps.get("elu"))[0]

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert linear_attention_torch(q.float(), k.float(), v.float(), feature_maps.get("elu"))[0].shape == (1, 7, 1, 3)


@pytest.mark.parametrize(
    "dtype, normalize",
    # unnormalized float16 is left out: its output a^T S itself exceeds fp16's range
    [("float16", True), ("bfloat16", True), ("float32", True), ("bfloat16", False), ("float32", False)],
)
def test_long_prefix_keeps_fp16_in_range(dtype, normalize):
    """A state as a ~10^6-token prefix leaves: S and den far outside fp16's range (max 65504).

    Products take do (not do / den, which would underflow) and states divided by their largest
    magnitude, so float16 stays finite and accurate where a naive cast would give inf or 0.
    """
    c = dict(B=1, T=23, H=2, D=16, DV=24, dtype=dtype, feature_map="elu", causal=True, normalize=normalize,
             initial_state=True, scale=1.0, seed=11)
    q, k, v, state = make_inputs(c)
    state = tuple((x * 2e5).requires_grad_() for x in state)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, (S, z) = lx.linear_attention(q, k, v, initial_state=state, normalize=normalize, return_state=True,
                                    backend="triton")
    assert S.abs().max() > 1e6 and torch.isfinite(o).all()
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(o.dtype).float()
    leaves = [q, k, v, *state]
    got = torch.autograd.grad((o.float() * do).sum(), leaves)
    want, bounds = reference_grads(c, leaves, do), grad_bound(c, leaves, do)  # z_0 is unused unnormalized: 0
    check_grads(c, got, want, bounds, ["q", "k", "v", "S_0", "z_0"])
