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
from helpers import CHUNKS, EPS_VALUES, call_kwargs, case_id, cases, check_forward, check_grads, check_state, config, \
    forward_and_grads, grad_bound, make_inputs, native_off, reference_grads
from lintx_triton.testing import ensure_map


def _grads(c, backend, path="chunked", chunk=16, final_state_grad=True, device="cpu"):
    with config(path=path, bwd_chunk=chunk):
        return forward_and_grads(c, backend, device=device, final_state_grad=final_state_grad)


@given(c=cases(eps_values=EPS_VALUES), chunk=st.sampled_from(CHUNKS), final_state_grad=st.booleans())
def test_triton_gradients(kernel_device, c, chunk, final_state_grad):
    assume(not (c["feature_map"] == "identity" and c["normalize"]))
    note(case_id(c))
    got, want, bounds, names = _grads(c, "triton", chunk=chunk, final_state_grad=final_state_grad,
                                      device=kernel_device)
    check_grads(c, got, want, bounds, names)


@given(c=cases(eps_values=EPS_VALUES))
def test_torch_backend_gradients(c):
    assume(not (c["feature_map"] == "identity" and c["normalize"]))
    note(case_id(c))
    got, want, bounds, names = _grads(c, "torch")
    check_grads(c, got, want, bounds, names)


@given(c=cases(maps=("elu", "relu", "identity", *lx.feature_maps.LEARNABLE_FAMILIES), dtypes=("float32",),
               eps_values=EPS_VALUES, t_values=(1, 7, 16, 33, 61, 100), positive_den=True),
       chunk=st.sampled_from([1, 5, 16, 64]), kv_heads=st.sampled_from([None, 1]), final_state_grad=st.booleans())
def test_torch_chunked_backward_at_several_chunks(c, chunk, kv_heads, final_state_grad):
    """The PyTorch path's hand-written chunked backward (reference._ChunkedCausal; on a CPU with the native code
    off) at chunks shorter than T: several chunks, a partial last one, grouped-query heads, learnable maps'
    parameters, against float64."""
    from lintx_triton.reference import linear_attention_torch

    assume(not (c["feature_map"] == "identity" and c["normalize"]))
    if kv_heads is not None and "map" not in c:  # a learnable map's W is drawn for its own key heads
        c = dict(c, HKV=kv_heads)
    note(f"{case_id(c)}-HKV{c.get('HKV', c['H'])}-chunk{chunk}")

    def call(q, k, v, *, feature_map, initial_state, return_state, backend, cu_seqlens, **kw):
        return linear_attention_torch(q, k, v, feature_map, initial_state=initial_state, chunk=chunk, **kw)

    q, k, v, state = make_inputs(c)
    with native_off():
        o, st_ = call(q, k, v, feature_map=ensure_map(c), initial_state=state, return_state=True, backend="torch",
                      cu_seqlens=None, **call_kwargs(c))
        got, want, bounds, names = forward_and_grads(c, "torch", final_state_grad=final_state_grad, call=call)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)
    check_grads(c, got, want, bounds, names)


def test_torch_chunked_path_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the PyTorch path's autograd.Function (no strided out= inside it, no
    graph break), several chunks and a partial last one, with the eager gradients."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        o, (S, z) = lx.linear_attention(q, k, v, backend="torch", return_state=True)
        return o.square().sum() + S.sum() + z.sum()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 150, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    got = torch.autograd.grad(torch.compile(f, backend=backend, fullgraph=True)(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1


def test_torch_path_state_can_be_updated_in_place():
    """The final state the PyTorch path returns is its own tensor (as before the custom Function), so it may be
    updated in place while o's graph is kept: no view-of-a-custom-Function error, o's gradients unchanged."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    o, (S, z) = lx.linear_attention(q, k, v, backend="torch", return_state=True)
    want = torch.autograd.grad(o.sum(), (q, k, v), retain_graph=True)
    S.add_(1.0)
    z.add_(1.0)
    for a, b in zip(torch.autograd.grad(o.sum(), (q, k, v)), want):
        torch.testing.assert_close(a, b)


def test_gradient_only_through_output(kernel_device):
    """No gradient reaches the final state: the backward gets dS = dz = None."""
    c = dict(B=1, T=19, H=2, D=8, DV=8, dtype="float32", feature_map="elu", causal=True, normalize=True,
             initial_state=True, scale=1.0, seed=5)
    q, k, v, state = make_inputs(c, requires_grad=True, device=kernel_device)
    o = lx.linear_attention(q, k, v, initial_state=state, backend="triton")
    leaves = [q, k, v, *state]
    got = torch.autograd.grad(o.sum(), leaves)
    do = torch.ones(o.shape)  # the loss o.sum(); no term of the final state
    want, bounds = reference_grads(c, leaves, do), grad_bound(c, leaves, do)
    check_grads(c, got, want, bounds, ["q", "k", "v", "S_0", "z_0"])


@pytest.mark.parametrize("causal", [True, False])
def test_reference_gradcheck_and_torch_backend_values(causal):
    """The float64 reference's autograd gradients are its derivatives (finite differences: what every gradient
    check trusts), and the PyTorch path's output and gradients on those inputs are within the bounds."""
    from lintx_triton import feature_maps
    from lintx_triton.reference import linear_attention_reference, linear_attention_torch

    c = dict(B=1, T=7, H=1, D=3, DV=3, dtype="float32", feature_map="elu", causal=causal, normalize=True,
             initial_state=False, scale=0.5, eps=1e-3, seed=0)
    kw = dict(causal=causal, scale=0.5, eps=1e-3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 1, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fm = feature_maps.get("elu")
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention_reference(q, k, v, fm, **kw)[0], (q, k, v))
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o, (S, z) = linear_attention_torch(*leaves, fm, **kw)
    check_forward(c, o, *leaves, None)
    do = torch.randn(o.shape, generator=g, dtype=torch.float32)
    got = torch.autograd.grad((o * do).sum(), leaves)
    check_grads(c, got, reference_grads(c, leaves, do), grad_bound(c, leaves, do), ["q", "k", "v"])


@pytest.mark.parametrize(
    "dtype, normalize",
    # unnormalized float16 is left out: its output a^T S itself exceeds fp16's range
    [("float16", True), ("bfloat16", True), ("float32", True), ("bfloat16", False), ("float32", False)],
)
def test_long_prefix_keeps_fp16_in_range(kernel_device, dtype, normalize):
    """A state as a ~10^6-token prefix leaves: S and den far outside fp16's range (max 65504).

    Products take do (not do / den, which would underflow) and states divided by their largest
    magnitude, so float16 stays finite and accurate where a naive cast would give inf or 0.
    """
    c = dict(B=1, T=23, H=2, D=16, DV=24, dtype=dtype, feature_map="elu", causal=True, normalize=normalize,
             initial_state=True, scale=1.0, seed=11)
    q, k, v, state = make_inputs(c, device=kernel_device)
    state = tuple((x * 2e5).requires_grad_() for x in state)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, (S, z) = lx.linear_attention(q, k, v, initial_state=state, normalize=normalize, return_state=True,
                                    backend="triton")
    assert S.abs().max() > 1e6 and torch.isfinite(o).all()
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(o.dtype).float()
    leaves = [q, k, v, *state]
    got = torch.autograd.grad((o.float() * do.to(o.device)).sum(), leaves)
    want, bounds = reference_grads(c, leaves, do), grad_bound(c, leaves, do)  # z_0 is unused unnormalized: 0
    check_grads(c, got, want, bounds, ["q", "k", "v", "S_0", "z_0"])
