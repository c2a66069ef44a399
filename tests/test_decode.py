"""The RNN form: decode steps against the reference and the chunked op; in-place; the module; the ops."""

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import EPS_VALUES, TOL, case_id, cases, check_forward, check_state, decode_steps, forward_bound, \
    make_inputs, on
from lintx_triton.testing import assert_within

T_SHORT = (1, 2, 5, 9)


@given(c=cases(causal=True, t_values=T_SHORT, eps_values=EPS_VALUES), backend=st.sampled_from(["triton", "torch"]),
       inplace=st.booleans())
def test_steps_match_reference(kernel_device, c, backend, inplace):
    """T steps (from an initial state or none) meet the same error bounds as the chunked op."""
    note(case_id(c))
    q, k, v, state = make_inputs(c, device=on(kernel_device, backend))
    o, st_ = decode_steps(c, q, k, v, state, backend, inplace)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("normalize", [True, False])
def test_prefill_then_steps_equals_one_call(kernel_device, backend, normalize):
    c = dict(B=2, T=23, H=2, D=12, DV=20, dtype="float32", feature_map="elu", causal=True, normalize=normalize,
             initial_state=False, scale=0.5, eps=1e-3, seed=4)
    q, k, v, _ = make_inputs(c, device=on(kernel_device, backend))
    kw = dict(normalize=normalize, scale=0.5, eps=1e-3, backend=backend)
    o_all, (S, z) = lx.linear_attention(q, k, v, return_state=True, **kw)
    o_pre, state = lx.linear_attention(q[:, :17], k[:, :17], v[:, :17], return_state=True, **kw)
    outs = [o_pre]
    for t in range(17, 23):
        o_t, state = lx.linear_attention_step(q[:, t], k[:, t], v[:, t], state, **kw)
        outs.append(o_t[:, None])
    check_forward(c, torch.cat(outs, 1), q, k, v, None, name="prefill + steps o")
    check_state(c, state, q, k, v, None)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[1], z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_equals_functional(kernel_device, backend):
    c = dict(B=2, T=4, H=3, D=8, DV=8, dtype="bfloat16", feature_map="relu", causal=True, normalize=True,
             initial_state=True, scale=1.0, seed=9)
    q, k, v, state = make_inputs(c, device=on(kernel_device, backend))
    o1, (S1, z1) = decode_steps(c, q, k, v, state, backend, inplace=False)
    o2, (S2, z2) = decode_steps(c, q, k, v, state, backend, inplace=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(S1, S2, rtol=0, atol=0)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


q1, v1 = torch.randn(2, 3, 8), torch.randn(2, 3, 6)
S_ok, z_ok = torch.zeros(2, 3, 8, 6), torch.zeros(2, 3, 8)
BAD = {
    "rank": (dict(q=torch.randn(2, 1, 3, 8)), ValueError, r"q must have 3 dimensions \[B, H, D\]"),
    "k-shape": (dict(k=torch.randn(2, 3, 7)), ValueError, r"k must be \[B, HKV, D\] with B, D of q"),
    "v-heads": (dict(v=torch.randn(2, 2, 6)), ValueError, r"v must be \[B, HKV, DV\] with B, HKV of k"),
    "kv-heads": (dict(k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 6)), ValueError, r"multiple of k and v's heads"),
    "dtype": (dict(v=v1.double()), TypeError, r"v must be float32, float16 or bfloat16"),
    "device": (dict(v=torch.empty(2, 3, 6, device="meta")), ValueError, r"one device"),
    "S-shape": (dict(state=(torch.zeros(2, 3, 8, 5), z_ok)), ValueError, r"state S must have shape \[2, 3, 8, 6\]"),
    "z-dtype": (dict(state=(S_ok, z_ok.half())), TypeError, r"state z must be float32"),
    "not-pair": (dict(state=S_ok), TypeError, r"state must be a pair"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_step_input(name, inplace):
    changes, exc, pattern = BAD[name]
    args = dict(q=q1, k=q1, v=v1, state=(S_ok.clone(), z_ok.clone()))
    args.update(changes)
    fn = lx.linear_attention_step_ if inplace else lx.linear_attention_step
    with pytest.raises(exc, match=pattern):
        fn(args["q"], args["k"], args["v"], args["state"])


# what only the cache key tells apart from a good step with the same tensors: the map, eps, scale's type, the backend
KEYWORD_BAD = {
    "map-M": (dict(feature_map=lx.feature_maps.favor(8, num_features=10, seed=0)), ValueError,
              r"state S must have shape \[2, 3, 10, 6\]"),
    "eps-negative": (dict(eps=-1.0), ValueError, r"eps must be a real number >= 0"),
    "eps-unhashable": (dict(eps=[1e-6]), ValueError, r"eps must be a real number >= 0"),
    "scale-bool": (dict(scale=True), TypeError, r"scale must be a real number"),
    "backend": (dict(backend="cuda"), ValueError, r"backend must be one of"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(BAD) + list(KEYWORD_BAD), ids=list(BAD) + list(KEYWORD_BAD))
def test_bad_step_input_after_a_good_one(name, inplace):
    """The checks a decode step skips once its arguments' key was seen still run for any change of the key: bad
    input after good input raises as it does first, and nothing of the state moves."""
    changes, exc, pattern = {**BAD, **KEYWORD_BAD}[name]
    fn = lx.linear_attention_step_ if inplace else lx.linear_attention_step
    good = dict(q=q1, k=q1, v=v1, state=(S_ok.clone(), z_ok.clone()))
    kw = dict(feature_map="elu", eps=1e-6, scale=1.0, backend="torch")
    for _ in range(2):  # the second good call is answered from the cache
        fn(good["q"], good["k"], good["v"], good["state"], **kw)
    args = dict(good, state=(S_ok.clone(), z_ok.clone()))
    args.update({a: b for a, b in changes.items() if a in args})
    kw.update({a: b for a, b in changes.items() if a not in args})
    state_before = [t.clone() for t in args["state"]] if isinstance(args["state"], tuple) else None
    with pytest.raises(exc, match=pattern):
        fn(args["q"], args["k"], args["v"], args["state"], **kw)
    if state_before is not None:
        for t, t0 in zip(args["state"], state_before):
            torch.testing.assert_close(t, t0, rtol=0, atol=0)


def test_step_checks_run_once_per_key(monkeypatch):
    """A repeated decode step skips _check_step; a new shape, dtype, map or contiguity runs it again; the cache is
    cleared when full."""
    from lintx_triton import api

    calls = []
    check = api._check_step
    monkeypatch.setattr(api, "_check_step", lambda *a: (calls.append(a[0].shape), check(*a))[1])
    monkeypatch.setattr(api, "_STEP_KEYS", {})
    monkeypatch.setattr(api, "_STEP_KEYS_MAX", 3)
    S, z = S_ok.clone(), z_ok.clone()
    for _ in range(3):
        lx.linear_attention_step_(q1, q1, v1, (S, z), backend="torch")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="contiguous"):  # the same shapes, a non-contiguous S
        lx.linear_attention_step_(q1, q1, v1, (torch.zeros(2, 3, 6, 8).transpose(-1, -2), z), backend="torch")
    lx.linear_attention_step(q1, q1, v1, (S, z), backend="torch")  # functional: another key
    lx.linear_attention_step_(q1[:1], q1[:1], v1[:1], (S[:1], z[:1]), backend="torch")  # B = 1
    assert len(calls) == 4 and len(api._STEP_KEYS) == 3
    lx.linear_attention_step_(q1, q1, v1, (S, z), feature_map="relu", backend="torch")
    assert len(calls) == 5 and len(api._STEP_KEYS) == 1  # the fourth key cleared the three before it
    lx.linear_attention_step_(q1.half(), q1.half(), v1.half(), (S, z), feature_map="relu", backend="torch")
    assert len(calls) == 6


def test_inplace_needs_a_contiguous_state():
    with pytest.raises(ValueError, match="contiguous"):
        lx.linear_attention_step_(q1, q1, v1, (torch.zeros(2, 3, 6, 8).transpose(-1, -2), z_ok.clone()))
    with pytest.raises(TypeError, match="preallocated state"):
        lx.linear_attention_step_(q1, q1, v1, None)


# nn.LinearAttention(24, 3, value_dim=5) with these changes; "favor" is a FAVOR+ map of head_dim 4 (6 heads)
MODULES = {
    "elu": dict(),
    "relu-mqa-eps": dict(feature_map="relu", num_kv_heads=1, eps=0.5),
    "favor-gqa": dict(feature_map="favor", num_heads=6, num_kv_heads=3),
    "raw-head_dim": dict(normalize=False, head_dim=5),
    "full": dict(causal=False),
    "full-raw-gqa-eps": dict(causal=False, normalize=False, num_heads=6, num_kv_heads=2, eps=0.5),
}


def _module_reference(attn, x, T):
    """The float64 reference of ``attn`` on the first T tokens of x: y and the bound of its rounding error, the
    attention's (testing.forward_bound) carried through out_proj, whose own rounding (H DV + 1 terms, far fewer
    than TOL / 2^-24) its terms |o| |W| + |b| cover; and the case of the attention, with q, k, v."""
    q, k, v = (t.detach() for t in attn._qkv(x[:, :T]))
    fm = lx.feature_maps.resolve(attn.feature_map)
    B, _, H, D = q.shape
    c = dict(B=B, T=T, H=H, HKV=attn.num_kv_heads, D=D, DV=attn.value_dim, dtype="float32", feature_map=fm.name,
             causal=attn.causal, normalize=attn.normalize, initial_state=False, scale=1.0, eps=attn.eps, seed=0)
    o, bound = forward_bound(c, q, k, v, None)
    W, b = (p.detach().cpu().double() for p in (attn.out_proj.weight, attn.out_proj.bias))
    o, bound = (t.reshape(B, T, H * attn.value_dim) for t in (o, bound))
    return o @ W.T + b, (bound + o.abs()) @ W.abs().T + b.abs(), (c, q, k, v)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_matches_reference(kernel_device, backend, name):
    """forward(), forward(return_state=True) and step() (functional and in-place) against the float64 reference
    of the module's own projections: causal or not, normalized or not, grouped heads, a head_dim, an eps."""
    torch.manual_seed(0)
    kw = dict(dict(num_heads=3, value_dim=5), **MODULES[name])
    if kw.get("feature_map") == "favor":
        kw["feature_map"] = lx.feature_maps.favor(4, num_features=10, seed=0)
    dev = on(kernel_device, backend)
    attn = lx.nn.LinearAttention(24, backend=backend, **kw).to(dev)
    T, P = 9, 5  # tokens, of which the prefill
    x = torch.randn(2, T, 24).to(dev)
    y = attn(x)
    y_ref, bound, (c, q, k, v) = _module_reference(attn, x, T)
    tol = TOL["float32"]
    assert_within("y", y, y_ref, bound, tol)
    y_pre, state = attn(x[:, :P], return_state=True)
    yp_ref, bound_p, (cp, qp, kp, vp) = _module_reference(attn, x, P)  # non-causal: P tokens attend to P
    assert_within("prefill y", y_pre, yp_ref, bound_p, tol)
    check_state(cp, state, qp, kp, vp, None)
    if attn.causal:
        ys = [y_pre]
        for t in range(P, T):
            y_t, state = attn.step(x[:, t], state)
            ys.append(y_t[:, None])
        assert_within("prefill + steps y", torch.cat(ys, 1), y_ref, bound, tol)
        check_state(c, state, q, k, v, None)
        S, z = attn.init_state(2)
        ys2 = [attn.step(x[:, t], (S, z), inplace=True)[0] for t in range(T)]
        assert_within("in-place steps y", torch.stack(ys2, 1), y_ref, bound, tol)
        check_state(c, (S, z), q, k, v, None)
    y.sum().backward()  # forward() trains
    assert attn.q_proj.weight.grad is not None


def test_module_errors():
    with pytest.raises(ValueError, match="not divisible"):
        lx.nn.LinearAttention(10, 3)
    with pytest.raises(ValueError, match="causal=False"):
        lx.nn.LinearAttention(8, 2, causal=False).step(torch.randn(1, 8))


def test_opcheck_step_ops():
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 6)
    S, z = torch.rand(2, 3, 8, 6), torch.rand(2, 3, 8)
    torch.library.opcheck(torch.ops.lintx.linear_attention_step.default, (q, k, v, S, z, None, None, "elu", True, 1.0, 1e-6))
    torch.library.opcheck(torch.ops.lintx.linear_attention_step.default, (q, k, v, None, None, None, None, "relu", False, 0.5, 1e-6))
    torch.library.opcheck(torch.ops.lintx.linear_attention_step_.default, (q, k, v, S, z, None, None, "elu", True, 1.0, 1e-6))


def test_compiled_inplace_decode_loop():
    """A decode loop of in-place steps compiles with no graph break and matches eager."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def decode(q, k, v, S, z):
        outs = []
        for t in range(q.shape[1]):
            outs.append(lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], (S, z)))
        return torch.stack(outs, 1)

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g) for _ in range(3))
    S1, z1, S2, z2 = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8)
    o_c = torch.compile(decode, backend=backend, fullgraph=True)(q, k, v, S1, z1)
    o_e = decode(q, k, v, S2, z2)
    torch.testing.assert_close(o_c, o_e)
    torch.testing.assert_close(S1, S2)
    torch.testing.assert_close(z1, z2)
    assert len(graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_loop():
    dev = "cuda"
    q, k, v = (torch.randn(4, 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    S, z = torch.zeros(4, 8, 64, 64, device=dev), torch.zeros(4, 8, 64, device=dev)
    lx.linear_attention_step_(q, k, v, (S, z))  # compile outside the capture
    S.zero_()
    z.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = lx.linear_attention_step_(q, k, v, (S, z))
    for _ in range(3):
        graph.replay()
    o_ref, state = lx.linear_attention_step(q, k, v, None)
    for _ in range(2):
        o_ref, state = lx.linear_attention_step(q, k, v, state)
    S_ref = state[0]
    torch.testing.assert_close(S, S_ref)
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)


def test_cpu_decode_benchmark_tiny(tmp_path):
    """bench/cpu_decode.py (issue #17's decode rows) at a tiny size, one small round: the code cannot rot; no time is
    gated."""
    import json

    from click import testing as click_testing

    from bench import cpu_decode

    out = tmp_path / "decode.json"
    res = click_testing.CliRunner().invoke(
        cpu_decode.main, ["--B", "1,3", "--heads", "2", "--dim", "8", "--rounds", "2", "--calls", "2", "--modes",
                          "no_grad,inference", "--backend", "torch", "--json", str(out)],
        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["B"], r["mode"]) for r in rows] == [(1, "no_grad"), (1, "inference"), (3, "no_grad"), (3, "inference")]
    assert all(r[k] > 0 for r in rows for k in ("floor_state", "floor_module_gemm", "step_", "module_fused_qkv",
                                                "floor_module_cold", "step_cold", "module_cold"))


@pytest.mark.parametrize("normalize", [True, False])
def test_torch_step_gradients_equal_the_chunked_path(normalize):
    """linear_attention_step on the torch backend stays differentiable: its gradients with respect to q, k, v and
    the state equal those of a one-token linear_attention from that state (the chunked path, autograd's own)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 6, generator=g)
    S, z = torch.rand(2, 2, 8, 6, generator=g), torch.rand(2, 2, 8, generator=g)
    w = torch.randn(2, 4, 6, generator=g)
    kw = dict(normalize=normalize, scale=0.5, eps=1e-3, backend="torch")
    grads = []
    for one_call in (False, True):
        xs = [t.clone().requires_grad_() for t in (q, k, v, S, z)]
        if one_call:
            o, (S1, z1) = lx.linear_attention(*(t[:, None] for t in xs[:3]), initial_state=tuple(xs[3:]),
                                              return_state=True, **kw)
            o = o[:, 0]
        else:
            o, (S1, z1) = lx.linear_attention_step(*xs[:3], tuple(xs[3:]), **kw)
        ((o * w).sum() + S1.square().sum() + z1.sum()).backward()
        grads.append([t.grad for t in xs])
    for name, a, b in zip("q k v S z".split(), *grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")
