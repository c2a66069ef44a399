"""LoLCATs' hybrid (``window=``) through the fused Triton kernels (``backend="triton"``): outputs, states and every
gradient against the float64 quadratic reference (tests/test_hybrid.py's bounds), both forward paths, packed
sequences, rows at different positions, opcheck, torch.compile, the decode step. In the CPU interpreter here
(conftest), compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import lintx_triton as lx
from lintx_triton import hybrid as hy
from lintx_triton.config import override

from test_hybrid import (_api_kw, check_forward, check_grads, check_state, hcases, hid, inputs, on_device,
                         prefill_then_steps)

PATHS = ("fused", "chunked")


def _leaf_pair(state):
    """A pair state (S0, z0) whose tensors require grad (their gradients are checked too)."""
    return tuple(x.detach().clone().requires_grad_() for x in state) if isinstance(state, tuple) and \
        not isinstance(state, hy.WindowState) else state


@settings(max_examples=max(4, settings.default.max_examples // 6))
@given(c=hcases(dtypes=("float32", "bfloat16"), t_values=(1, 17, 33, 48, 70)), path=st.sampled_from(PATHS),
       chunk=st.sampled_from((16, 32)))
def test_triton_matches_reference(kernel_device, c, path, chunk):
    """o and the state after the call within TOL x bound of the float64 reference, on either forward path (compiled
    on a GPU: the call's inputs moved there, its results checked on the CPU)."""
    note(hid(c) + f"-{path}-BT{chunk}")
    q, k, v, alpha, fm, state = inputs(c)
    dq, dk, dv, da, dfm, dstate = on_device(kernel_device, q, k, v, alpha, fm, state)
    with override(path=path, chunk=chunk):
        o, st_ = lx.linear_attention(dq, dk, dv, feature_map=dfm, initial_state=dstate, return_state=True,
                                     backend="triton", **_api_kw(c, da))
    check_state(c, hy.WindowState(*(x.cpu() for x in st_)),
                *check_forward(c, o.cpu(), q, k, v, alpha, fm, state))


# an explicit case: the sliding window past two windows' length with g = 1 - f and a pair state (the state's
# gradient read a chunk early, or g dropped from its sums, survived the ci profile's draws: bench/MUTATION.md)
GRAD_EXAMPLE = dict(B=1, T=50, H=2, HKV=1, D=8, DV=3, dtype="float32", map="elu", window=16, kind="sliding",
                    affine=True, window_scale=None, scale=1.0, state="pair", seed=3)


@settings(max_examples=max(3, settings.default.max_examples // 13))
@given(c=hcases(t_values=(1, 17, 33, 50)))
@example(c=GRAD_EXAMPLE)
def test_triton_gradients_match_reference(kernel_device, c):
    """dq, dk, dv, dalpha, a learnable map's parameters and a pair state's (S0, z0) against float64 autograd of the
    reference, through the returned state too."""
    note(hid(c))
    q, k, v, alpha, fm, state = inputs(c, requires_grad=True)
    check_grads(c, q, k, v, alpha, fm, _leaf_pair(state), device=kernel_device, backend="triton")


@pytest.mark.parametrize("kind", hy.KINDS)
def test_packed_and_rows_apart(kind):
    """Packed sequences (grouped heads, a learnable map) continue their own states, and batch rows at different
    positions each continue theirs: each sequence within its bound of the reference run on it alone."""
    c = dict(B=1, T=60, H=4, HKV=2, D=8, DV=5, dtype="float32", map="hedgehog", window=16, kind=kind, affine=True,
             window_scale=None, scale=1.0, state=None, seed=7)
    q, k, v, alpha, fm, _ = inputs(c)
    cu = torch.tensor([0, 9, 40, 40, 60], dtype=torch.int32)
    o, st_ = lx.linear_attention(q, k, v, feature_map=fm, cu_seqlens=cu, return_state=True, backend="triton",
                                 **_api_kw(c, alpha))
    bounds = cu.tolist()
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        cn = dict(c, T=e - s)
        st_ref, st_abs = check_forward(cn, o[:, s:e], q[:, s:e], k[:, s:e], v[:, s:e], alpha, fm, None, name=f"o{n}")
        check_state(cn, hy.WindowState(*(x[n:n + 1] for x in st_)), st_ref, st_abs)
    # the four states (positions 9, 31, 0, 20) as four batch rows, 23 tokens more each
    g = torch.Generator().manual_seed(3)
    q2, k2 = torch.randn(4, 23, 4, 8, generator=g), torch.randn(4, 23, 2, 8, generator=g)
    v2 = torch.randn(4, 23, 2, 5, generator=g)
    o2, st2 = lx.linear_attention(q2, k2, v2, feature_map=fm, initial_state=st_, return_state=True, backend="triton",
                                  **_api_kw(c, alpha))
    c2 = dict(c, B=1, T=23)
    for b in range(4):
        row = lambda x: x[b:b + 1]  # noqa: E731
        st_ref, st_abs = check_forward(c2, row(o2), row(q2), row(k2), row(v2), alpha, fm,
                                       hy.WindowState(*map(row, st_)), name=f"o[{b}]")
        check_state(c2, hy.WindowState(*map(row, st2)), st_ref, st_abs)


def test_paths_agree_and_chunk_divides_window():
    """The fused and chunked forwards agree to rounding, and a window that is not a power of two (48) runs with
    chunks that tile it (BT = 16)."""
    c = dict(B=2, T=70, H=2, HKV=1, D=8, DV=8, dtype="float32", map="elu", window=48, kind="sliding", affine=False,
             window_scale=0.3, scale=0.5, state=None, seed=11)
    q, k, v, alpha, fm, _ = inputs(c)
    outs = []
    for path in PATHS:
        with override(path=path, chunk=64):
            outs.append(lx.linear_attention(q, k, v, feature_map=fm, backend="triton", **_api_kw(c, alpha)))
    check_forward(c, outs[0], q, k, v, alpha, fm, None)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile():
    """torch.library.opcheck of the forward and backward ops; torch.compile(fullgraph=True) of a forward and
    backward through them is one graph and gives the eager gradients."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 20, 2, 8, generator=g), torch.randn(1, 20, 2, 8, generator=g)
    v, mix = torch.randn(1, 20, 2, 4, generator=g), torch.randn(2, generator=g)
    S0, z0 = torch.rand(1, 2, 8, 4, generator=g), torch.rand(1, 2, 8, generator=g)
    flags = dict(feature_map="elu", window=16, sliding=True, affine=False, scale=1.0, qk_scale=0.35)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mix.requires_grad_(), S0.requires_grad_(),
            z0.requires_grad_(), None, None, None)
    torch.library.opcheck(torch.ops.lintx.hybrid_attention_fwd.default, args, flags)
    o, L, m, idx = torch.ops.lintx.hybrid_attention_fwd(*args, **flags)
    torch.library.opcheck(torch.ops.lintx.hybrid_attention_bwd.default,
                          (torch.randn_like(o), *(x.detach() for x in (q, k, v, o, L, m, idx, mix, S0, z0)), None,
                           None, None), dict(flags, map_grads=False))

    def f(q, k, v, mix):
        return lx.linear_attention(q, k, v, window=16, window_mix=mix, window_kind="terraced", backend="triton")

    eager = torch.autograd.grad(f(q, k, v, mix).square().sum(), (q, k, v, mix))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, mix).square().sum(), (q, k, v, mix))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family,kind", [("taylor", "sliding"), ("rebased", "terraced")])
def test_polynomial_maps(kernel_device, family, kind):
    """Based's pairing (a Taylor map's linear attention with a sliding window) and ReBased: the kernels walk the
    map's feature blocks (M = 1 + D + D^2 = 43 at D = 6: two blocks); outputs, the state and every gradient (and
    ReBased's gamma, beta) within their bounds of the float64 reference."""
    c = dict(B=1, T=37, H=2, HKV=1, D=6, DV=5, dtype="float32", map="elu", window=16, kind=kind, affine=False,
             window_scale=None, scale=1.0, state=None, seed=13)
    q, k, v, alpha, _, _ = inputs(c, requires_grad=True)
    fm = lx.feature_maps.taylor(6) if family == "taylor" else lx.feature_maps.rebased(6, heads=1)
    assert fm.feature_dim(6) > 32  # more than one block of features
    check_grads(c, q, k, v, alpha, fm, None, device=kernel_device, backend="triton")
    q, k, v, alpha = (x.detach() for x in (q, k, v, alpha))
    dq, dk, dv, da, dfm, _ = on_device(kernel_device, q, k, v, alpha, fm, None)
    with torch.no_grad():
        o, st_ = lx.linear_attention(dq, dk, dv, feature_map=dfm, return_state=True, backend="triton",
                                     **_api_kw(c, da))
    check_state(c, hy.WindowState(*(x.cpu() for x in st_)), *check_forward(c, o.cpu(), q, k, v, alpha, fm, None))
    # the decode step, a block of features at a time: 20 steps (a terraced block's fold among them) as the torch step
    a = hy.empty_window_state(1, 1, fm.feature_dim(6), 6, 5, 16, kind, device=kernel_device)
    b = hy.empty_window_state(1, 1, fm.feature_dim(6), 6, 5, 16, kind)
    with torch.no_grad():
        for t in range(20):
            o_a = lx.linear_attention_step_(dq[:, t], dk[:, t], dv[:, t], a, backend="triton", feature_map=dfm,
                                            **_api_kw(c, da))
            o_b = lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], b, backend="torch", feature_map=fm,
                                            **_api_kw(c, alpha))
            torch.testing.assert_close(o_a.cpu(), o_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.S.cpu(), b.S, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.k.cpu(), b.k)



@settings(max_examples=max(3, settings.default.max_examples // 10))
@given(c=hcases(t_values=(17, 40), state=None), split=st.integers(0, 40), inplace=st.booleans())
@example(c=dict(GRAD_EXAMPLE, T=40, kind="terraced", state=None), split=3, inplace=True)  # two terraced folds
def test_prefill_then_triton_steps(c, split, inplace):
    """A Triton prefill, then the rest through the Triton decode step (in place, or on a copy): outputs within the
    reference's bound, and the state equal to one call's (the ring buffer exactly)."""
    note(hid(c))
    prefill_then_steps(c, split, inplace, backend="triton")


def test_triton_step_decides_on_the_device():
    """The decode step reads nothing on the host: a terraced block's fold (w tokens at once) and the slots it
    empties happen inside the kernel, so the same launches serve every position (CUDA-graph safe). Here: 40 steps
    from an empty state, each row at its own position, the state's tensors updated where they lie."""
    g = torch.Generator().manual_seed(2)
    B, H, HKV, D, DV, w = 3, 2, 1, 8, 4, 16
    q, k = torch.randn(B, 40, H, D, generator=g), torch.randn(B, 40, HKV, D, generator=g)
    v, alpha = torch.randn(B, 40, HKV, DV, generator=g), torch.randn(H, generator=g)
    st_ = hy.empty_window_state(B, HKV, D, D, DV, w, "terraced")
    st_.pos.copy_(torch.tensor([0, 5, 16]))  # rows at positions 0, 5, 16 of sequences whose earlier tokens were 0
    ref = hy.WindowState(*(x.clone() for x in st_))
    ptrs = [x.data_ptr() for x in st_]
    kw = dict(window=w, window_mix=alpha, window_kind="terraced")
    for t in range(40):
        o = lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], st_, backend="triton", **kw)
        o_ref = lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], ref, backend="torch", **kw)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
    assert [x.data_ptr() for x in st_] == ptrs and st_.pos.tolist() == [40, 45, 56]
    torch.testing.assert_close(st_.S, ref.S, rtol=1e-5, atol=1e-5)
    assert torch.equal(st_.k, ref.k) and torch.equal(st_.v, ref.v)


def test_gpu_scripts_run_tiny(tmp_path):
    """What a GPU run executes for the hybrid, at the interpreter's sizes: bench/sanitize_case.py's hybrid cases
    (outputs, state, every gradient, prefill + steps, packed) pass, and bench/hybrid.py --triton checks the fused
    kernels against float64 before it times them."""
    import json
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import hybrid as bench_hybrid
    from bench import sanitize_case

    assert sanitize_case._hybrid_variants(torch.device("cpu"), ["fp32"], small=True) == 0
    threads = torch.get_num_threads()
    try:
        bench_hybrid.main(["--T", "32", "--H", "1", "--D", "16", "--window", "16", "--repeat", "1", "--chunked-repeat",
                           "1", "--triton", "--threads", "1", "--json", str(tmp_path / "rows.json")])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert rows[0]["way"] == "hybrid (triton)" and rows[0]["ms"] > 0


def test_sm90_no_spills_where_there_were():
    """bench/hybrid_resources.py compiles the hybrid's kernels for sm_90 on this CPU (in a subprocess: the
    interpreter patches triton.language in this one): at D = 64 (elu, bf16) the (dk, dv) kernel at BT = 32 and the
    decode step (32 slots a block, 8 warps), which spilled at BT = 64 and at 64 slots with 4 warps, keep no stack
    (bench/COMPILE_REPORT.md has every kernel)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "hybrid_resources.py"), "--maps", "elu", "--dims", "64",
                          "--stages", "hybrid bwd dk dv", "hybrid decode step"], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()]
    assert sorted(r[3] for r in rows) == ["hybrid bwd dk dv", "hybrid decode step"]
    for r in rows:
        assert r[8] == "0" and r[9] == "0/0", r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", hy.KINDS)
def test_cuda_graph_decode_loop(kind):
    """A captured step replayed across a terraced block's end (w = 16: the fold of 16 tokens happens at one of the
    replays) equals the same steps run eagerly: the kernel decides everything on the device."""
    dev, w = "cuda", 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, 3, 4, 32, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    alpha = torch.randn(4, generator=g).to(dev)
    kw = dict(window=w, window_mix=alpha, window_kind=kind, backend="triton")
    st_, ref = (hy.empty_window_state(3, 4, 32, 32, 32, w, kind, torch.bfloat16, dev) for _ in range(2))
    q_in, k_in, v_in = q[0].clone(), k[0].clone(), v[0].clone()
    lx.linear_attention_step_(q_in, k_in, v_in, st_, **kw)  # compile outside the capture
    for x in st_:
        x.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = lx.linear_attention_step_(q_in, k_in, v_in, st_, **kw)
    for x in st_:  # the capture ran the step once: start again
        x.zero_()
    for t in range(20):
        q_in.copy_(q[t]), k_in.copy_(k[t]), v_in.copy_(v[t])
        graph.replay()
        o_ref = lx.linear_attention_step_(q[t], k[t], v[t], ref, **kw)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert int(st_.pos[0]) == 20
    torch.testing.assert_close(st_.S, ref.S, rtol=0, atol=0)


def test_no_quadratic_allocation(monkeypatch):
    """Forward + backward through the kernels at T = 256, w = 16: every tensor the launchers allocate is O(T) per
    head (outputs, row statistics, gradients) or the chunk states [T / BT, M, DV]: none near T x T."""
    sizes = []

    def recording(fn):
        def alloc(*a, **k):
            t = fn(*a, **k)
            sizes.append(t.numel())
            return t
        return alloc

    for name in ("empty", "zeros", "empty_like", "zeros_like", "full"):
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))
    B, T, H, D, w = 1, 256, 1, 8, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_() for _ in range(3))
    alpha = torch.zeros(H, requires_grad=True)
    o = lx.linear_attention(q, k, v, window=w, window_mix=alpha, window_kind="sliding", backend="triton")
    torch.autograd.grad(o.sum(), (q, k, v, alpha))
    assert sizes and max(sizes) <= 2 * T * D < T * T // 8, max(sizes)
