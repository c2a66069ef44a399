"""The torch.library registrations: opcheck on every op, torch.compile without graph breaks or per-length recompiles.

The opchecks take ``kernel_device`` (on a GPU: the fake implementations against the compiled kernels' outputs);
the torch.compile tests compare a compiled call with the same op run eagerly, on the CPU (the values are the
reference tests' business).
"""

import pytest
import torch

import lintx_triton as lx


def _inputs(B=1, T=19, H=2, D=8, DV=12, dtype=torch.float32, requires_grad=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, generator=g).to(dtype).to(device).requires_grad_(requires_grad) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g).to(dtype).to(device).requires_grad_(requires_grad)
    return q, k, v


def test_forward_autograd_reads_the_schema_by_name():
    """The forward op's autograd context names its inputs with one tuple (ops.custom._FwdArgs): it must be the
    schema's argument list, in order."""
    from lintx_triton.ops import custom

    schema = torch.ops.lintx.linear_attention_fwd.default._schema
    assert custom._FwdArgs._fields == tuple(a.name for a in schema.arguments)


FWD_CASES = {
    "elu-causal-norm": (True, True, False),
    "elu-causal-raw-h0": (True, False, True),
    "elu-full-norm": (False, True, False),
    "elu-causal-norm-h0": (True, True, True),
}


@pytest.mark.parametrize("case", list(FWD_CASES), ids=list(FWD_CASES))
def test_opcheck_forward(kernel_device, case):
    causal, normalize, h0 = FWD_CASES[case]
    q, k, v = _inputs(device=kernel_device)
    S0 = torch.rand(1, 2, 8, 12).to(kernel_device).requires_grad_() if h0 else None
    z0 = torch.rand(1, 2, 8).to(kernel_device).requires_grad_() if h0 else None
    torch.library.opcheck(
        torch.ops.lintx.linear_attention_fwd.default, (q, k, v, S0, z0, None, None, None, "elu", causal, normalize, 0.5, 1e-6)
    )


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state_grad", [True, False])
def test_opcheck_backward(kernel_device, normalize, with_state_grad):
    q, k, v = _inputs(requires_grad=False, device=kernel_device)
    o, den, S, z = torch.ops.lintx.linear_attention_fwd(q, k, v, None, None, None, None, None, "elu", True, normalize, 1.0,
                                                        1e-6)
    do = torch.randn_like(o)
    dS = torch.randn_like(S) if with_state_grad else None
    dz = torch.randn_like(z) if with_state_grad else None
    torch.library.opcheck(
        torch.ops.lintx.linear_attention_bwd.default,
        (do, dS, dz, q, k, v, o, den, None, None, None, None, None, "elu", True, normalize, 1.0, False),
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_projected_map(kernel_device, normalize):
    """The feature map's parameter tensor travels through the schema (forward and backward)."""
    fm = lx.feature_maps.favor(8, num_features=12, seed=0)
    q, k, v = _inputs(device=kernel_device)
    W = fm.kernel_params("query", q.device)
    torch.library.opcheck(torch.ops.lintx.linear_attention_fwd.default,
                          (q, k, v, None, None, W, W, None, fm.name, True, normalize, 1.0, 1e-6))
    with torch.no_grad():
        o, den, S, z = torch.ops.lintx.linear_attention_fwd(q, k, v, None, None, W, W, None, fm.name, True, normalize,
                                                            1.0, 1e-6)
    torch.library.opcheck(torch.ops.lintx.linear_attention_bwd.default,
                          (torch.randn_like(o), None, None, q.detach(), k.detach(), v.detach(), o, den, None, None, W,
                           W, None, fm.name, True, normalize, 1.0, False))
    q1, k1, v1 = (x[:, 0].detach() for x in (q, k, v))
    torch.library.opcheck(torch.ops.lintx.linear_attention_step.default,
                          (q1, k1, v1, S, z, W, W, fm.name, normalize, 1.0, 1e-6))


def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def test_compile_fullgraph_forward_backward():
    backend, graphs = _counting_backend()

    def f(q, k, v):
        o, (S, z) = lx.linear_attention(q, k, v, return_state=True)
        return o.square().sum() + S.sum() + z.sum()

    cf = torch.compile(f, backend=backend, fullgraph=True)
    q, k, v = _inputs()
    loss = cf(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(f(q2, k2, v2), (q2, k2, v2))
    torch.testing.assert_close(loss, f(q2, k2, v2))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    assert len(graphs) == 1


def test_compile_does_not_recompile_per_length():
    torch._dynamo.reset()
    backend, graphs = _counting_backend()
    cf = torch.compile(lambda q, k, v: lx.linear_attention(q, k, v), backend=backend, fullgraph=True)
    for T in (5, 9, 17, 33, 40):
        q, k, v = _inputs(T=T, requires_grad=False)
        torch.testing.assert_close(cf(q, k, v), lx.linear_attention(q, k, v))
    # one static graph for the first length, one dynamic graph for every length after it
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 5 lengths"


def test_compile_with_inductor():
    """The default backend (inductor) around the opaque op, forward and backward."""
    def f(q, k, v):
        return lx.linear_attention(q * 0.5, k, v).sum()

    q, k, v = _inputs(T=11)
    cf = torch.compile(f, fullgraph=True)
    loss = cf(q, k, v)
    g = torch.autograd.grad(loss, (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    w = torch.autograd.grad(f(q2, k2, v2), (q2, k2, v2))
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)
