"""Packed variable-length sequences (cu_seqlens) and grouped-query heads, against the float64 reference applied per
sequence.

Every packed call holds at least two non-empty sequences (a kernel that reads another sequence's rows, state or
gradient then fails), and explicit examples run the Triton path of every kernel family on packed sequences with
grouped heads whatever the seed draws: forward causal (chunked, fused) and non-causal, backward causal and
non-causal, the state alone forward and backward, and decode (B = 2 sequences).
"""

import pytest
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lintx_triton as lx
from helpers import CHUNKS, EPS_VALUES, call_kwargs, config, make_inputs, on
from lintx_triton.testing import check_forward, check_grads, check_state, decode_steps, forward_and_grads, grad_bound, \
    reference_grads

FEW = settings(max_examples=max(8, settings.default.max_examples // 3), deadline=None)
LENS = (0, 1, 2, 5, 15, 16, 17, 33)


@st.composite
def packed_cases(draw, varlen=True):
    HKV = draw(st.sampled_from([1, 2, 3]))
    G = draw(st.sampled_from([1, 2, 3]))
    # at least two sequences with tokens
    lens = draw(st.lists(st.sampled_from(LENS), min_size=2, max_size=4).filter(lambda x: sum(n > 0 for n in x) >= 2)) \
        if varlen else None
    causal = draw(st.booleans())
    fmap = draw(st.sampled_from(["elu", "relu", "favor"]))
    D = draw(st.sampled_from([4, 13, 16]))
    if fmap == "favor":
        fmap = lx.feature_maps.favor(D, num_features=draw(st.sampled_from([6, 20])), seed=draw(st.integers(0, 9))).name
    return dict(
        B=1 if varlen else draw(st.integers(1, 2)),
        T=sum(lens) if varlen else draw(st.sampled_from([1, 7, 17, 33])),
        lens=lens, H=HKV * G, HKV=HKV, D=D, DV=draw(st.sampled_from([1, 5, 16])),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])), feature_map=fmap, causal=causal,
        normalize=draw(st.booleans()), initial_state=causal and draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 0.5])), seed=draw(st.integers(0, 2**16)),
        path=draw(st.sampled_from(["chunked", "fused"])), chunk=draw(st.sampled_from(CHUNKS)),
        eps=draw(st.sampled_from(EPS_VALUES)),
    )


def _example(**changes):
    """An explicit packed case: 3 sequences (one empty), grouped heads (G = 2), float32; T follows the lens."""
    c = dict(B=1, T=0, lens=[5, 0, 17], H=4, HKV=2, D=13, DV=5, dtype="float32", feature_map="elu", causal=True,
             normalize=True, initial_state=True, scale=0.5, seed=7, path="chunked", chunk=16, eps=1e-3)
    c.update(changes)
    if c["lens"] is not None:
        c["T"] = sum(c["lens"])
    return c


# the Triton path of each kernel family on packed sequences with grouped heads, whatever the seed draws
FORWARD_EXAMPLES = [_example(), _example(path="fused", initial_state=False, lens=[17, 1, 16]),
                    _example(causal=False, initial_state=False, lens=[16, 5, 0, 2])]
BACKWARD_EXAMPLES = [_example(), _example(causal=False, initial_state=False, lens=[5, 17])]


def _examples(cases, **args):
    def deco(f):
        for c in reversed(cases):
            f = example(c=c, **args)(f)
        return f
    return deco


def _id(c):
    eps = "" if c.get("eps", 1e-6) == 1e-6 else f"-eps{c['eps']}"
    return (f"B{c['B']}-T{c['T']}-lens{c['lens']}-H{c['H']}-HKV{c['HKV']}-D{c['D']}-DV{c['DV']}-{c['dtype']}-"
            f"{c['feature_map']}-{'causal' if c['causal'] else 'full'}-{'norm' if c['normalize'] else 'raw'}"
            f"{'-h0' if c['initial_state'] else ''}-{c['path']}-chunk{c.get('chunk')}{eps}")


def _inputs(c, requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(c["seed"])
    dt = getattr(torch, c["dtype"])
    B, T, H, HKV, D, DV = c["B"], c["T"], c["H"], c["HKV"], c["D"], c["DV"]
    q = torch.randn(B, T, H, D, generator=g).to(dt)
    k = torch.randn(B, T, HKV, D, generator=g).to(dt)
    v = torch.randn(B, T, HKV, DV, generator=g).to(dt)
    N = len(c["lens"]) if c["lens"] is not None else B
    M = lx.feature_maps.get(c["feature_map"]).feature_dim(D)
    state = None
    if c["initial_state"]:
        state = (torch.rand(N, HKV, M, DV, generator=g), torch.rand(N, HKV, M, generator=g))
    q, k, v = (x.to(device) for x in (q, k, v))
    state = tuple(x.to(device) for x in state) if state is not None else None
    cu = None
    if c["lens"] is not None:
        cu = torch.tensor([0] + c["lens"]).cumsum(0).to(torch.int32).to(device)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        state = tuple(x.requires_grad_() for x in state) if state else None
    return q, k, v, state, cu


def _configured(c):
    """lx.linear_attention with the case's config pinned for the forward (the backward runs outside it)."""
    def call(*args, **kwargs):
        chunk = c.get("chunk", 16)
        with config(path=c["path"], chunk=chunk, bwd_chunk=chunk):
            return lx.linear_attention(*args, **kwargs)

    return call


def _run(c, q, k, v, state, cu, backend):
    kw = dict(call_kwargs(c), feature_map=c["feature_map"])
    return _configured(c)(q, k, v, initial_state=state, return_state=True, cu_seqlens=cu, backend=backend, **kw)


@FEW
@given(c=packed_cases(), backend=st.sampled_from(["triton", "torch"]))
@_examples(FORWARD_EXAMPLES, backend="triton")
def test_packed_forward_matches_per_sequence_reference(kernel_device, c, backend):
    note(_id(c))
    q, k, v, state, cu = _inputs(c, device=on(kernel_device, backend))
    o, (S, z) = _run(c, q, k, v, state, cu, backend)
    assert S.shape[:2] == (len(c["lens"]), c["HKV"])
    check_state(c, (S, z), q, k, v, state, cu_seqlens=cu)  # each sequence against its own reference
    check_forward(c, o, q, k, v, state, cu_seqlens=cu)


@FEW
@given(c=packed_cases(varlen=False))
def test_grouped_heads_forward(kernel_device, c):
    note(_id(c))
    q, k, v, state, _ = _inputs(c, device=kernel_device)
    o, (S, z) = _run(c, q, k, v, state, None, "triton")
    check_forward(c, o, q, k, v, state)
    check_state(c, (S, z), q, k, v, state)


def _grads(c, backend, device):
    q, k, v, state, cu = _inputs(c, requires_grad=True, device=on(device, backend))
    # each packed sequence's gradients against its own reference
    check_grads(c, *forward_and_grads(c, backend, inputs=(q, k, v, state), cu_seqlens=cu, call=_configured(c)))


@FEW
@given(c=packed_cases(), backend=st.sampled_from(["triton", "torch"]))
@_examples(BACKWARD_EXAMPLES, backend="triton")
def test_packed_gradients(kernel_device, c, backend):
    note(_id(c))
    _grads(c, backend, kernel_device)


@FEW
@given(c=packed_cases(varlen=False))
def test_grouped_heads_gradients_sum_over_the_group(kernel_device, c):
    note(_id(c))
    _grads(c, "triton", kernel_device)


@given(c=packed_cases(varlen=False), inplace=st.booleans())
@example(c=_example(lens=None, B=2, T=7, normalize=False), inplace=True)
@example(c=_example(lens=None, B=2, T=7), inplace=False)
@FEW
def test_grouped_heads_decode(kernel_device, c, inplace):
    c = dict(c, causal=True, T=min(c["T"], 7))
    note(_id(c))
    q, k, v, state, _ = _inputs(c, device=kernel_device)
    o, (S, z) = decode_steps(c, q, k, v, state, backend="triton", inplace=inplace)
    check_forward(c, o, q, k, v, state)
    check_state(c, (S, z), q, k, v, state)


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), .tolist(), bool(tensor)
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_packed_launch_reads_nothing_back(kernel_device):
    """No host synchronisation on the Triton path: no tensor value is read on the host, forward or backward; the
    output and gradients of that call (check_seqlens=False) are the per-sequence reference's."""
    c = dict(B=1, T=21, H=4, HKV=2, D=8, DV=5, dtype="float32", feature_map="elu", causal=True, normalize=True,
             initial_state=False, scale=1.0, seed=0)
    cu = torch.tensor([0, 3, 3, 20, 21], dtype=torch.int32, device=kernel_device)
    q, k, v, _ = make_inputs(c, requires_grad=True, device=kernel_device)
    do = torch.randn(1, 21, 4, 5, generator=torch.Generator().manual_seed(1))
    do_dev = do.to(kernel_device)
    with _HostReads() as probe:
        o = lx.linear_attention(q, k, v, cu_seqlens=cu, check_seqlens=False, backend="triton")
        got = torch.autograd.grad((o * do_dev).sum(), (q, k, v))
    assert probe.reads == 0
    check_forward(c, o, q, k, v, None, cu_seqlens=cu)
    leaves = [q, k, v]
    check_grads(c, got, reference_grads(c, leaves, do, cu_seqlens=cu), grad_bound(c, leaves, do, cu_seqlens=cu),
                ["q", "k", "v"])
    with _HostReads() as probe:  # the control: the value check reads cu back
        lx.linear_attention(q, k, v, cu_seqlens=cu, backend="triton")
    assert probe.reads > 0


def test_packed_compiles_fullgraph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, cu):
        o, (S, z) = lx.linear_attention(q, k, v, cu_seqlens=cu, return_state=True)
        return o.square().sum() + S.sum()

    cu = torch.tensor([0, 5, 5, 13], dtype=torch.int64)
    q, k, v = (torch.randn(1, 13, 2, 8, requires_grad=True) for _ in range(3))
    loss = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, cu)
    got = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(f(q, k, v, cu), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_equals_separate_calls(kernel_device, backend):
    """The packed call is the separate calls, bit for bit up to rounding, including empty sequences."""
    lens = [4, 0, 19, 1]
    dev = on(kernel_device, backend)
    cu = torch.tensor([0] + lens).cumsum(0).to(dev)
    q, k, v = (x.to(dev) for x in (torch.randn(1, 24, 3, 8), torch.randn(1, 24, 3, 8), torch.randn(1, 24, 3, 6)))
    o, (S, z) = lx.linear_attention(q, k, v, cu_seqlens=cu, return_state=True, backend=backend)
    s = 0
    for n, L in enumerate(lens):
        o_n, (Sn, zn) = lx.linear_attention(q[:, s:s + L], k[:, s:s + L], v[:, s:s + L], return_state=True,
                                            backend=backend)
        torch.testing.assert_close(o[:, s:s + L], o_n, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S[n:n + 1], Sn, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z[n:n + 1], zn, atol=1e-5, rtol=1e-5)
        s += L


@FEW
@given(c=packed_cases(), varlen=st.booleans(), backend=st.sampled_from(["triton", "torch"]))
@example(c=_example(), varlen=True, backend="triton")
@example(c=_example(initial_state=False, lens=[16, 0, 5, 33], HKV=1, H=3), varlen=True, backend="triton")
def test_state_alone_matches_reference(kernel_device, c, varlen, backend):
    """lx.linear_attention_state: the final state and its gradients (dk, dv, dS_0, dz_0), per sequence."""
    c = dict(c, causal=True)
    if not varlen:
        c = dict(c, lens=None, B=2, T=c["T"] % 20 + 1)
    note(_id(c))
    q, k, v, state, cu = _inputs(c, requires_grad=True, device=on(kernel_device, backend))
    S, z = lx.linear_attention_state(k, v, feature_map=c["feature_map"], initial_state=state, cu_seqlens=cu,
                                     backend=backend)
    g = torch.Generator().manual_seed(c["seed"] + 2)
    dS, dz = torch.randn(S.shape, generator=g), torch.randn(z.shape, generator=g)
    leaves = [k, v] + (list(state) if state else [])
    got = torch.autograd.grad((S * dS.to(S.device)).sum() + (z * dz.to(z.device)).sum(), leaves)
    check_state(c, (S, z), q, k, v, state, cu_seqlens=cu)
    # gradients: the float64 reference's state alone (no output term), each sequence on its own
    raw, full = dict(c, normalize=False), [q, k, v] + (list(state) if state else [])
    want = reference_grads(raw, full, None, dS, dz, cu_seqlens=cu)[1:]
    bounds = grad_bound(raw, full, None, dS, dz, cu_seqlens=cu)[1:]
    check_grads(c, got, want, bounds, ["k", "v", "S_0", "z_0"][: len(leaves)])


def test_state_ops_opcheck():
    cu = torch.tensor([0, 4, 4, 11])
    k, v = torch.randn(1, 11, 2, 8, requires_grad=True), torch.randn(1, 11, 2, 5, requires_grad=True)
    S0, z0 = torch.rand(3, 2, 8, 5, requires_grad=True), torch.rand(3, 2, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.lintx.linear_attention_state.default, (k, v, S0, z0, None, cu, "elu"))
    torch.library.opcheck(torch.ops.lintx.linear_attention_state.default, (k[:1, :5], v[:1, :5], None, None, None,
                                                                           None, "relu"))
    torch.library.opcheck(torch.ops.lintx.linear_attention_state_bwd.default,
                          (torch.randn(3, 2, 8, 5), torch.randn(3, 2, 8), k.detach(), v.detach(), None, cu, "elu", False))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_without_sequences(kernel_device, backend):
    """cu_seqlens = [0]: no sequence, no token; empty output and states [0, HKV, ...], forward and backward."""
    dev = on(kernel_device, backend)
    q = torch.randn(1, 0, 4, 8, device=dev, requires_grad=True)
    k, v = torch.randn(1, 0, 2, 8, device=dev, requires_grad=True), torch.randn(1, 0, 2, 5, device=dev,
                                                                                requires_grad=True)
    cu = torch.tensor([0], dtype=torch.int32, device=dev)
    o, (S, z) = lx.linear_attention(q, k, v, cu_seqlens=cu, return_state=True, backend=backend)
    assert o.shape == (1, 0, 4, 5) and S.shape == (0, 2, 8, 5) and z.shape == (0, 2, 8)
    assert lx.linear_attention_state(k, v, cu_seqlens=cu, backend=backend)[0].shape == (0, 2, 8, 5)
    assert [g.shape for g in torch.autograd.grad(o.sum(), (q, k, v))] == [q.shape, k.shape, v.shape]
