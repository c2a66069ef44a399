"""The RNN form: decode steps against the reference and the chunked op; in-place; the module; the ops."""

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import case_id, cases, check_forward, check_state, decode_steps, make_inputs

T_SHORT = (1, 2, 5, 9)


@given(c=cases(causal=True, t_values=T_SHORT), backend=st.sampled_from(["triton", "torch"]), inplace=st.booleans())
def test_steps_match_reference(c, backend, inplace):
    """T steps (from an initial state or none) meet the same error bounds as the chunked op."""
    note(case_id(c))
    q, k, v, state = make_inputs(c)
    o, st_ = decode_steps(c, q, k, v, state, backend, inplace)
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("normalize", [True, False])
def test_prefill_then_steps_equals_one_call(backend, normalize):
    c = dict(B=2, T=23, H=2, D=12, DV=20, dtype="float32", feature_map="elu", causal=True, normalize=normalize,
             initial_state=False, scale=0.5, seed=4)
    q, k, v, _ = make_inputs(c)
    kw = dict(normalize=normalize, scale=0.5, backend=backend)
    o_all, (S, z) = lx.linear_attention(q, k, v, return_state=True, **kw)
    o_pre, state = lx.linear_attention(q[:, :17], k[:, :17], v[:, :17], return_state=True, **kw)
    outs = [o_pre]
    for t in range(17, 23):
        o_t, state = lx.linear_attention_step(q[:, t], k[:, t], v[:, t], state, **kw)
        outs.append(o_t[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[1], z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_equals_functional(backend):
    c = dict(B=2, T=4, H=3, D=8, DV=8, dtype="bfloat16", feature_map="relu", causal=True, normalize=True,
             initial_state=True, scale=1.0, seed=9)
    q, k, v, state = make_inputs(c)
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


def test_inplace_needs_a_contiguous_state():
    with pytest.raises(ValueError, match="contiguous"):
        lx.linear_attention_step_(q1, q1, v1, (torch.zeros(2, 3, 6, 8).transpose(-1, -2), z_ok.clone()))
    with pytest.raises(TypeError, match="preallocated state"):
        lx.linear_attention_step_(q1, q1, v1, None)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("feature_map,kv_heads", [("elu", None), ("relu", None), ("elu", 1), ("favor", 3)])
def test_module_forward_and_step_agree(backend, feature_map, kv_heads):
    torch.manual_seed(0)
    if feature_map == "favor":
        feature_map = lx.feature_maps.favor(4, num_features=10, seed=0)
    attn = lx.nn.LinearAttention(24, 6 if kv_heads == 3 else 3, feature_map=feature_map, backend=backend,
                                 value_dim=5, num_kv_heads=kv_heads)
    x = torch.randn(2, 11, 24)
    y = attn(x)
    y_pre, state = attn(x[:, :6], return_state=True)
    ys = [y_pre]
    for t in range(6, 11):
        y_t, state = attn.step(x[:, t], state)
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-5, atol=1e-5)
    S, z = attn.init_state(2)
    ys2 = [attn.step(x[:, t], (S, z), inplace=True)[0] for t in range(11)]
    torch.testing.assert_close(torch.stack(ys2, 1), y, rtol=1e-5, atol=1e-5)
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
