"""Forward properties: every backend and path against the float64 reference."""

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import CHUNKS, EPS_VALUES, case_id, cases, check_forward, check_state, config, make_inputs, native_off, on, \
    run


def _case(**changes):
    c = dict(B=2, T=33, H=2, D=8, DV=8, dtype="float32", feature_map="elu", causal=True, normalize=True,
             initial_state=False, scale=0.5, seed=11, eps=1e-3)
    return dict(c, **changes)


@given(c=cases(eps_values=EPS_VALUES), path=st.sampled_from(["chunked", "fused"]), chunk=st.sampled_from(CHUNKS))
# the two cases the draws reach rarely (bench/MUTATION.md, "Holes"), whatever the seed draws: several value blocks
# in the chunked scan (DV = 80 > BV, which is at most 64 on every device; 3 chunks of 16; z scanned by the first
# block only), and the chunked forward from an initial state
@example(c=_case(DV=80), path="chunked", chunk=16)
@example(c=_case(T=17, DV=5, initial_state=True), path="chunked", chunk=16)
def test_triton_forward_matches_reference(kernel_device, c, path, chunk):
    note(case_id(c))
    q, k, v, state = make_inputs(c, device=kernel_device)
    with config(path=path, chunk=chunk):
        o, st_ = run(c, q, k, v, state, backend="triton", return_state=True)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)


@given(c=cases(eps_values=EPS_VALUES))
def test_torch_backend_matches_reference(c):
    note(case_id(c))
    q, k, v, state = make_inputs(c)
    o, st_ = run(c, q, k, v, state, backend="torch", return_state=True)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_inputs(kernel_device, backend, causal):
    c = dict(B=2, T=21, H=3, D=16, DV=24, dtype="float32", feature_map="elu", causal=causal, normalize=True,
             initial_state=False, scale=1.0, seed=3)
    q, k, v, _ = make_inputs(c, device=on(kernel_device, backend))
    # [B, H, T, D] storage viewed as [B, T, H, D]; and a strided slice of a wider v
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    kn = torch.stack([k, torch.zeros_like(k)], dim=-1).flatten(-2)[..., ::2]
    vn = torch.cat([v, torch.zeros_like(v)], dim=-1)[..., : c["DV"]]
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    o = run(c, qn, kn, vn, None, backend=backend)
    check_forward(c, o, q, k, v, None)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("return_state", [False, True])
def test_empty_sequence(kernel_device, backend, return_state):
    q = torch.randn(2, 0, 3, 8, device=on(kernel_device, backend))
    v = torch.randn(2, 0, 3, 5, device=q.device)
    out = lx.linear_attention(q, q, v, backend=backend, return_state=return_state)
    o = out[0] if return_state else out
    assert o.shape == (2, 0, 3, 5) and o.dtype == q.dtype
    if return_state:
        S, z = out[1]
        assert S.shape == (2, 3, 8, 5) and z.shape == (2, 3, 8)
        assert (S == 0).all() and (z == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_sequence_passes_state_through(kernel_device, backend):
    dev = on(kernel_device, backend)
    q = torch.randn(1, 0, 2, 4, device=dev)
    v = torch.randn(1, 0, 2, 3, device=dev)
    S0, z0 = torch.rand(1, 2, 4, 3, device=dev), torch.rand(1, 2, 4, device=dev)
    _, (S, z) = lx.linear_attention(q, q, v, initial_state=(S0, z0), return_state=True, backend=backend)
    torch.testing.assert_close(S, S0)
    torch.testing.assert_close(z, z0)


def test_auto_backend_on_cpu(monkeypatch):
    """auto: Triton under the interpreter, the PyTorch path on CPU otherwise; both give the same output."""
    c = dict(B=1, T=9, H=2, D=8, DV=8, dtype="float32", feature_map="elu", causal=True, normalize=True,
             initial_state=False, scale=1.0, seed=0)
    q, k, v, _ = make_inputs(c)
    o_interp = lx.linear_attention(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    o_cpu = lx.linear_attention(q, k, v)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        lx.linear_attention(q, k, v, backend="triton")
    torch.testing.assert_close(o_interp, o_cpu, rtol=1e-5, atol=1e-5)


def test_cpu_inference_workspace_is_not_aliased():
    """The chunked torch path's inference forward (the CPU's path with the native code off, and every path where
    it cannot run) carves its chunked buffers from a per-thread workspace kept between calls: what it returns (o
    and the final state) must not live there, so a second call leaves the first's results as they were;
    clear_workspace() frees it and the next call is the same, and the call with autograd (fresh buffers) matches
    it exactly."""
    from lintx_triton.reference import _WORKSPACE, clear_workspace

    g = torch.Generator().manual_seed(0)
    x1 = [torch.randn(2, 70, 2, 16, generator=g) for _ in range(3)]
    x2 = [torch.randn(2, 70, 2, 16, generator=g) for _ in range(3)]
    with native_off():
        with torch.no_grad():
            o1, (S1, z1) = lx.linear_attention(*x1, feature_map="relu", backend="torch", return_state=True)
            kept = [t.clone() for t in (o1, S1, z1)]
            assert _WORKSPACE.buf  # the inference path used the workspace
            o2, _ = lx.linear_attention(*x2, feature_map="relu", backend="torch", return_state=True)
            for a, b in zip((o1, S1, z1), kept):
                assert torch.equal(a, b)
            clear_workspace()
            assert not _WORKSPACE.buf
            torch.testing.assert_close(lx.linear_attention(*x2, feature_map="relu", backend="torch"), o2, rtol=0,
                                       atol=0)
        o3 = lx.linear_attention(*(t.requires_grad_() for t in x2), feature_map="relu", backend="torch")  # fresh
        torch.testing.assert_close(o3.detach(), o2, rtol=0, atol=0)
