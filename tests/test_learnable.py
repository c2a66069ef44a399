"""Learnable feature maps through the kernels: per-head or shared W, tied or untied, their gradients dW, db
summed in the backward kernels, against float64 autograd of the reference (lintx_triton.testing's bounds).

The maps' own formulas (Hedgehog's two variants, T2R) against the authors' code are in test_learnable_maps.py.
"""

from __future__ import annotations

import json
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import EPS_VALUES, call_kwargs, cases, check_forward, check_grads, check_state, decode_steps, \
    forward_and_grads, make_inputs
from lintx_triton import testing
from test_feature_maps import _Allocations

LEARNABLE = tuple(lx.feature_maps.LEARNABLE_FAMILIES)
# The Triton calls here stay in the interpreter on CPU tensors, also on a GPU (no kernel_device): testing's
# learnable maps are cached CPU modules that make_inputs, signed_map and the references run on CPU tensors, so
# their parameters cannot move to the GPU for the op alone; the compiled learnable path is `lintx fuzz`'s.
# a packed, grouped call: 3 sequences (one empty), H = 4 query heads on HKV = 2 kv heads
PACKED = dict(B=1, T=29, H=4, HKV=2, D=8, DV=5, dtype="float32", causal=True, normalize=True, initial_state=False,
              scale=0.5, seed=3, eps=1e-3)


# a fifth of the profile's examples (ci: 8 of 40; ReBased joined the families): each runs the forward twice
# and the backward (~3 s on 2 cores); tests/test_learnable_maps.py draws these maps through the kernels too
@settings(max_examples=max(6, settings.default.max_examples // 5))
@given(c=cases(maps=LEARNABLE, t_values=(1, 7, 17, 33), d_values=(1, 4, 13, 16), positive_den=True,
               eps_values=EPS_VALUES), path=st.sampled_from(["chunked", "fused"]))
# LoLCATs' two softmaxes with padding columns (M = 12 in a 16-wide tile), per head, untied: a (planted) second
# half that let the padding into its sum was caught by the tuner's test, not by the profile's draws
@example(c=dict(B=1, T=33, H=2, D=8, DV=3, dtype="float32", feature_map="hedgehog_lolcats_d8_m12", causal=True,
                normalize=True, initial_state=True, scale=0.5, seed=7,
                map=dict(family="hedgehog", D=8, M=12, seed=5, heads=2, key_heads=1)), path="fused")
def test_forward_and_parameter_grads(c, path):
    """o, S_T and every gradient (q, k, v, the initial state, W and b of each side) on the Triton path, its
    forward fused or chunked."""
    q, k, v, state = make_inputs(c)
    fm = testing.ensure_map(c)
    with lx.config.override(path=path):
        o, st_ = lx.linear_attention(q, k, v, feature_map=fm, initial_state=state, backend="triton",
                                     return_state=True, **call_kwargs(c))
        got, want, bounds, names = forward_and_grads(c, "triton")
    check_forward(c, o, q, k, v, state)
    check_state(c, st_, q, k, v, state)
    assert any(n.startswith("map.") for n in names), names
    check_grads(c, got, want, bounds, names)


@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(c=cases(maps=LEARNABLE, dtypes=("float32",), t_values=(1, 2, 7, 17), d_values=(1, 2, 4, 13),
               positive_den=True, eps_values=EPS_VALUES))
def test_gradient_bounds_cover_the_exact_gradients(c):
    """Each gradient's bound sums magnitudes of the terms its exact value sums, so |exact| <= bound, the
    parameters' included (their bounds once differentiated the held-fixed o and den too: 58x too small)."""
    _, leaves, (do, dS, dz) = testing.op_grads(c, "torch")
    want = testing.reference_grads(c, leaves, do, dS, dz)
    bounds = testing.grad_bound(c, leaves, do, dS, dz)
    for w, b in zip(want, bounds):
        assert (w.abs() <= b * (1 + 1e-9) + 1e-300).all()


def _learnable_case(family, heads, key_heads, M=6, **kw):
    c = dict(PACKED, **kw)
    spec = dict(family=family, D=c["D"], M=M, seed=1, heads=heads, key_heads=key_heads)
    fm = testing._build_map(spec)
    return dict(c, feature_map=fm.name, map=spec)


@pytest.mark.parametrize("family,heads,key_heads", [("hedgehog", 4, 2), ("t2r", 1, 1), ("hedgehog_fla", 4, 1),
                                                    ("t2r", 1, 2)], ids=["hedgehog-W4.k2", "t2r-W1.k1",
                                                                         "hedgehog_fla-W4.k1", "t2r-W1.k2"])
def test_packed_grouped_untied(family, heads, key_heads):
    """Three packed sequences (one empty), grouped heads (untied: key maps per kv head), gradients of every
    parameter against the reference run sequence by sequence."""
    c = _learnable_case(family, heads, key_heads)
    cu = torch.tensor([0, 11, 11, 29])
    q, k, v, _ = make_inputs(c, requires_grad=True)
    o = lx.linear_attention(q, k, v, feature_map=testing.ensure_map(c), cu_seqlens=cu, backend="triton",
                            **call_kwargs(c))
    check_forward(c, o, q, k, v, None, cu_seqlens=cu)
    got, want, bounds, names = forward_and_grads(c, "triton", inputs=(q, k, v, None), cu_seqlens=cu)
    check_grads(c, got, want, bounds, names)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wide_map_parameter_grads(dtype):
    """M = 132 (a 256-wide feature tile): dW is then a gradient product of the kernels' other kind (_mm_dw)."""
    c = dict(_learnable_case("t2r", 2, None, M=132, B=1, T=17, H=2, HKV=2, D=4, DV=3), dtype=dtype)
    got, want, bounds, names = forward_and_grads(c, "triton")
    check_grads(c, got, want, bounds, names)


def test_tied_per_head_map_needs_as_many_kv_heads():
    fm = lx.feature_maps.t2r(8, 6, heads=4)
    q, k = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="tied=False"):
        lx.linear_attention(q, k, k, feature_map=fm)
    with pytest.raises(ValueError, match="3 query heads"):
        lx.linear_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], feature_map=fm)


def test_parameters_on_another_device_are_an_error():
    fm = lx.feature_maps.t2r(8, 6).to("meta")
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"\.to\(\)"):
        lx.linear_attention(q, q, q, feature_map=fm, backend="triton")


def test_no_phi_buffer_in_forward_or_backward():
    """Hedgehog at M = 2D, per head, untied: forward + backward, dW and db included, allocate nothing of
    B*T*H*M elements; the torch backend (which stores phi) is the control."""
    B, T, H, D, DV = 1, 512, 2, 8, 4
    fm = lx.feature_maps.hedgehog(D, 2 * D, heads=H, tied=False)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, D, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g, requires_grad=True)
    phi_numel = B * T * H * fm.num_features
    for backend, expect in (("triton", False), ("torch", True)):
        with _Allocations() as probe:
            o = lx.linear_attention(q, k, v, feature_map=fm, backend=backend)
            grads = torch.autograd.grad(o.square().sum(), (q, k, v, *fm.parameters()))
        assert len(grads) == 5 and all(x is not None for x in grads)
        assert (max(probe.sizes) >= phi_numel) == expect, (backend, max(probe.sizes), phi_numel)


def test_parameter_grads_of_two_runs_agree():
    """dW, db are summed with fp32 atomics (chunks and batch rows in any order on a GPU): two runs agree within
    fp32 rounding of the terms they sum, |dW1 - dW2| <= 8 eps_fp32 x the gradient's bound (the interpreter runs
    the programs in one order: there they are equal)."""
    c = _learnable_case("hedgehog", 4, 2, T=33)
    runs = [forward_and_grads(c, "triton") for _ in range(2)]
    (g1, _, bounds, names), (g2, _, _, _) = runs
    for name, a, b, bound in zip(names, g1, g2, bounds):
        if name.startswith("map."):
            eps = torch.finfo(torch.float32).eps
            assert ((a - b).abs().double() <= 8 * eps * bound + 1e-30).all(), name


@pytest.mark.parametrize("inplace", [False, True])
def test_decode_and_state_api(inplace):
    """The decode step and the state alone with a per-head, untied map: the same as the parallel forward."""
    c = _learnable_case("hedgehog_fla", 4, 2, T=9, B=2)  # B = 2: a wrong head index in decode shows
    q, k, v, _ = make_inputs(c)
    fm = testing.ensure_map(c)
    o, (S, z) = lx.linear_attention(q, k, v, feature_map=fm, backend="triton", return_state=True, **call_kwargs(c))
    with torch.no_grad():
        od, (Sd, zd) = decode_steps(c, q, k, v, None, backend="triton", inplace=inplace)
    check_forward(c, od, q, k, v, None)
    check_state(c, (Sd, zd), q, k, v, None)
    S2, z2 = lx.linear_attention_state(k, v, feature_map=fm, backend="triton")
    check_state(c, (S2, z2), q, k, v, None)
    dS = torch.randn(S2.shape)
    got = torch.autograd.grad((S2 * dS).sum() + z2.sum(), list(fm.parameters()), allow_unused=True)
    ref = torch.autograd.grad((lx.linear_attention_state(k, v, feature_map=fm, backend="torch")[0] * dS).sum()
                              + lx.linear_attention_state(k, v, feature_map=fm, backend="torch")[1].sum(),
                              list(fm.parameters()), allow_unused=True)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)  # the query set gets no gradient from the keys' state
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opcheck_with_parameter_grads():
    """fq, fk through the schemas, forward and backward, with map_grads on."""
    fm = lx.feature_maps.t2r(8, 6, heads=2, tied=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    fq, fk = (fm.kernel_params(s, "cpu").detach().requires_grad_() for s in ("query", "key"))
    torch.library.opcheck(torch.ops.lintx.linear_attention_fwd.default,
                          (q, k, v, None, None, fq, fk, None, fm.name, True, True, 1.0, 1e-6))
    with torch.no_grad():
        o, den, S, z = torch.ops.lintx.linear_attention_fwd(q, k, v, None, None, fq, fk, None, fm.name, True, True,
                                                            1.0, 1e-6)
    torch.library.opcheck(torch.ops.lintx.linear_attention_bwd.default,
                          (torch.randn_like(o), None, None, q.detach(), k.detach(), v.detach(), o, den, None, None,
                           fq.detach(), fk.detach(), None, fm.name, True, True, 1.0, True))
    torch.library.opcheck(torch.ops.lintx.linear_attention_state.default, (k, v, None, None, fk, None, fm.name))
    torch.library.opcheck(torch.ops.lintx.linear_attention_state_bwd.default,
                          (torch.randn_like(S), torch.randn_like(z), k.detach(), v.detach(), fk.detach(), None,
                           fm.name, True))


def test_compile_fullgraph_forward_and_parameter_grads():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fm = lx.feature_maps.hedgehog(8, 12, heads=2)

    def f(q, k, v):
        return lx.linear_attention(q, k, v, feature_map=fm, backend="triton").square().sum()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    params = list(fm.parameters())
    got = torch.autograd.grad(torch.compile(f, backend=backend, fullgraph=True)(q, k, v), [q, *params])
    want = torch.autograd.grad(f(q, k, v), [q, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1


def test_module_registers_the_maps():
    qm, km = lx.feature_maps.hedgehog(16, 32, heads=4), lx.feature_maps.hedgehog(16, 32, heads=2)
    m = lx.nn.LinearAttention(64, 4, query_map=qm, key_map=km, num_kv_heads=2)
    names = {n for n, _ in m.named_parameters()}
    assert {"feature_map.query.weight", "feature_map.key.weight"} <= names
    x = torch.randn(2, 9, 64)
    m(x).sum().backward()
    assert qm.query.weight.grad.shape == (4, 16, 16) and km.query.weight.grad.shape == (2, 16, 16)
    assert km.query.weight.grad.abs().sum() > 0
    m2 = lx.nn.LinearAttention(64, 4, feature_map=lx.feature_maps.t2r(16, 24, heads=4))
    assert "feature_map.query.bias" in m2.state_dict()
    y, state = m2(x[:, :8], return_state=True)
    y_last, _ = m2.step(x[:, 8], state)
    torch.testing.assert_close(y_last, m2(x)[:, 8], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="both"):
        lx.nn.LinearAttention(64, 4, query_map=qm)
    with pytest.raises(ValueError, match="same kind"):
        lx.nn.LinearAttention(64, 4, query_map=qm, key_map=lx.feature_maps.t2r(16, 32, heads=2))


# ---- context parallelism: each rank's dW is its shard's share; their sum is the single-process dW

def _cp_worker(rank, world, store, out):
    torch.set_num_threads(1)
    report = {"crash": None, "ok": False}
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        torch.manual_seed(0)  # the same map and sequence on every rank
        fm = lx.feature_maps.t2r(8, 6, heads=2, tied=False)
        q, k, v = (torch.randn(1, 21, 2, 8) for _ in range(3))
        sl = slice(rank * 21 // world, (rank + 1) * 21 // world)
        mine = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
        o = lx.distributed.linear_attention(*mine, feature_map=fm, backend="triton")
        grads = torch.autograd.grad(o.square().sum(), list(fm.parameters()))
        flat = torch.cat([x.reshape(-1) for x in grads])
        dist.all_reduce(flat)
        one = lx.linear_attention(q, k, v, feature_map=fm, backend="triton")
        want = torch.cat([x.reshape(-1) for x in torch.autograd.grad(one.square().sum(), list(fm.parameters()))])
        torch.testing.assert_close(flat, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o, one[:, sl], rtol=1e-5, atol=1e-5)
        report["ok"] = True
        dist.destroy_process_group()
    except BaseException:
        report["crash"] = f"rank {rank}:\n{traceback.format_exc()}"
    with open(out, "w") as f:
        json.dump(report, f)


def test_context_parallel_parameter_grads(tmp_path):
    world = 2
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_cp_worker, args=(r, world, str(tmp_path / "store"), str(tmp_path / f"r{r}.json")))
             for r in range(world)]
    for p in procs:
        p.start()
    t0 = time.time()
    for p in procs:
        p.join(timeout=max(1.0, 180 - (time.time() - t0)))
        if p.is_alive():
            p.kill()
    reports = [json.loads((tmp_path / f"r{r}.json").read_text()) if (tmp_path / f"r{r}.json").exists()
               else {"crash": f"rank {r}: no report", "ok": False} for r in range(world)]
    assert all(r["ok"] for r in reports), "\n".join(r["crash"] or "" for r in reports)
