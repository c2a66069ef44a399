"""Built-in learnable maps (lintx_triton.feature_maps.hedgehog): Hedgehog as LoLCATs and FLA write it, and T2R.

(a) ``fm.features`` against the authors' code transcribed literally (LoLCATs' [B, H, L, D] einsum, FLA's
nn.Linear), in float64; (b) the kernels' phi_proj / phi_proj_vjp (interpreter) against the float64 reference:
outputs, states, dq / dk / dv and dW / db, within lintx_triton.testing's error bounds; (c) inits, the
identity init's reduction to the parameter-free map, nn.Module behaviour, errors.
"""

import copy

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import nn

import lintx_triton as lx
from helpers import EPS_VALUES, GTOL, call_kwargs, case_id, check_forward, check_grads, check_state, decode_steps, \
    forward_and_grads, make_inputs
from lintx_triton.feature_maps.hedgehog import LOLCATS_EPS, HedgehogFeatureMap, T2RFeatureMap, hedgehog, t2r
from lintx_triton.reference import linear_attention_reference
from lintx_triton.testing import _loss, _output_bound, assert_within

fmaps = lx.feature_maps
F64 = torch.float64
# every example runs the interpreter forward and backward: a quarter of the profile's examples
FEW = settings(max_examples=max(8, settings.default.max_examples // 4), deadline=None)
# Two float64 evaluations of one formula by different operation orders (einsum vs matmul, cat then softmax vs
# softmax then cat) differ by a few units of 2^-52 of the terms summed (|x| |W| ~ 10 here): 1e-12 is ~50 ulps
# of such a term, and a wrong formula (a missing factor 2, one softmax for two) is off by > 1e-2.
EXACT = dict(rtol=1e-12, atol=1e-12)


# ---- the authors' code, transcribed (their names, their layouts)

def lolcats_feature_map(x, layer, bias=0.0, eps=LOLCATS_EPS):
    """HazyResearch/lolcats src/model/feature_map.py: FeatureMap.forward (line 73) = SoftmaxDim (lines 126-129) of
    FeatureMapMLP.forward (line 251); x [B, H, L, D], layer [H, D, F], bias (1, H, 1, 1) there (line 217; per
    feature [1, H, 1, F] here: the shape the authors commented out)."""
    _x = torch.einsum('hdf,bhld->bhlf', layer, x) + bias
    return torch.cat([
        torch.softmax(_x, dim=-1), torch.softmax(-_x, dim=-1)
    ], dim=-1).clamp(min=eps)


class FlaHedgehogFeatureMap(nn.Module):
    """fla-org/flash-linear-attention fla/modules/feature_map.py lines 50-74 (the output width D generalized to
    F = M / 2)."""

    def __init__(self, head_dim, feature_dim=None):
        super().__init__()
        self.layer = nn.Linear(head_dim, feature_dim or head_dim)
        self.init_weights_()

    def init_weights_(self):
        nn.init.eye_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    def forward(self, x):
        x = self.layer(x)  # b, h, l, d
        y = 2 * x
        return torch.cat([y, -y], dim=-1).softmax(-1)


class FlaT2RFeatureMap(nn.Module):
    """fla/modules/feature_map.py lines 77-105."""

    def __init__(self, head_dim, dot_dim=None, bias=False):
        super().__init__()
        self.layer = nn.Linear(head_dim, dot_dim or head_dim, bias=bias)

    def forward(self, x):
        return self.layer(x).relu()


def _randomize(fm, seed, spread=1.5):
    """Parameters drawn so that x W + b spreads over a few units (the softmaxes far from uniform, relu's kink
    crossed): W ~ N(0, spread^2 / D), b ~ N(0, 1/4); the draws are fp32 values, so float64 copies are exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fm.named_parameters():
            scale = spread / fm.head_dim ** 0.5 if name.endswith("weight") else 0.5
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return fm


def _make(kind, D, M, **kw):
    if kind == "t2r":
        return t2r(D, M, **kw)
    return hedgehog(D, M, variant=kind, bias=True, **kw)


# ---- (a) the authors' formulas

@settings(max_examples=30, deadline=None)
@given(D=st.sampled_from([1, 3, 5, 12]), F=st.sampled_from([1, 3, 7, 10]), H=st.integers(1, 3),
       per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_lolcats_features_match_lolcats_code(D, F, H, per_head, seed):
    fm = _randomize(hedgehog(D, 2 * F, heads=H if per_head else 1, variant="lolcats", bias=True, tied=False), seed)
    x = torch.randn(2, 9, H, D, generator=torch.Generator().manual_seed(seed), dtype=F64)  # ours: [B, T, H, D]
    for side, p in (("query", fm.query), ("key", fm.key)):
        layer = p.weight.detach().double().expand(H, D, F)  # theirs: one W per head, [H, D, F]
        bias = p.bias.detach().double().expand(H, F)[None, :, None, :]
        want = lolcats_feature_map(x.transpose(1, 2), layer, bias).transpose(1, 2)
        torch.testing.assert_close(fm.features(x, side), want, **EXACT)


def test_lolcats_scalar_bias_cancels():
    # LoLCATs' bias is one scalar per head (feature_map.py:217): it cancels in both softmaxes, so bias=False is
    # the same map
    fm = _randomize(hedgehog(6, 8, heads=3, variant="lolcats", bias=False), 1)
    assert fm.query.bias is None and [n for n, _ in fm.named_parameters()] == ["query.weight"]
    x = torch.randn(2, 5, 3, 6, dtype=F64)
    scalar = torch.randn(1, 3, 1, 1, dtype=F64) * 3
    want = lolcats_feature_map(x.transpose(1, 2), fm.query.weight.detach().double(), scalar).transpose(1, 2)
    torch.testing.assert_close(fm.features(x), want, **EXACT)


@settings(max_examples=30, deadline=None)
@given(D=st.sampled_from([1, 3, 5, 12]), F=st.sampled_from([1, 3, 7, 10]), H=st.integers(1, 3),
       per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_fla_features_match_fla_code(D, F, H, per_head, seed):
    HW = H if per_head else 1
    fm = _randomize(hedgehog(D, 2 * F, heads=HW, variant="fla"), seed)
    x = torch.randn(2, 9, H, D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    theirs = [FlaHedgehogFeatureMap(D, F).double() for _ in range(HW)]  # FLA's is shared: one per head here
    with torch.no_grad():
        for h, m in enumerate(theirs):
            m.layer.weight.copy_(fm.query.weight[h].T)  # nn.Linear's weight is [out, in]
            m.layer.bias.copy_(fm.query.bias[h])
    want = torch.stack([theirs[h % HW](x[:, :, h]) for h in range(H)], 2)
    torch.testing.assert_close(fm.features(x, "query"), want, **EXACT)


@settings(max_examples=30, deadline=None)
@given(D=st.sampled_from([1, 3, 5, 12]), M=st.sampled_from([1, 3, 7, 10]), H=st.integers(1, 3),
       per_head=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_t2r_features_match_fla_code(D, M, H, per_head, bias, seed):
    HW = H if per_head else 1
    fm = _randomize(t2r(D, M, heads=HW, bias=bias), seed)
    x = torch.randn(2, 9, H, D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    theirs = [FlaT2RFeatureMap(D, M, bias=bias).double() for _ in range(HW)]
    with torch.no_grad():
        for h, m in enumerate(theirs):
            m.layer.weight.copy_(fm.query.weight[h].T)
            if bias:
                m.layer.bias.copy_(fm.query.bias[h])
    want = torch.stack([theirs[h % HW](x[:, :, h]) for h in range(H)], 2)
    torch.testing.assert_close(fm.features(x, "key"), want, **EXACT)


# ---- (b) the kernels against the float64 reference
# (in the interpreter on CPU tensors, also on a GPU: no kernel_device, since make_inputs and the references run
# these maps on the CPU, and moving a map's parameters for the op alone would leave its gradients elsewhere)

@st.composite
def learnable_cases(draw, t_values=(1, 7, 16, 17, 33, 40), causal=None):
    """(case, map): a freshly built learnable map with drawn parameters and a call for it. D and M are rarely
    powers of two; heads shared (HW = 1) or per head, tied or not, grouped keys (HKV < H) with an untied
    per-head map; B H <= 4 and T <= 40 (the interpreter is slow)."""
    kind = draw(st.sampled_from(["lolcats", "fla", "t2r"]))
    D = draw(st.sampled_from([3, 5, 12, 16]))
    M = draw(st.sampled_from([6, 10, 12, 20] + ([7] if kind == "t2r" else [])))
    B, H = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (1, 4)]))
    HKV = draw(st.sampled_from([h for h in (1, 2, H) if H % h == 0]))
    per_head = draw(st.booleans())
    tied = draw(st.booleans()) if not per_head or HKV == H else False
    heads = dict(heads=H if per_head else 1, tied=tied)
    if not tied:
        heads["key_heads"] = HKV if per_head else 1
    fm = _randomize(_make(kind, D, M, **heads), draw(st.integers(0, 2**16)))
    c = dict(
        B=B, T=draw(st.sampled_from(t_values)), H=H, HKV=HKV, D=D, DV=draw(st.sampled_from([1, 3, 8])),
        dtype=draw(st.sampled_from(["float32", "float32", "float16", "bfloat16"])), feature_map=fm.name,
        causal=draw(st.booleans()) if causal is None else causal, normalize=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 0.5])), seed=draw(st.integers(0, 2**16)),
    )
    c["initial_state"] = c["causal"] and draw(st.booleans())
    c["eps"] = draw(st.sampled_from(EPS_VALUES))  # drawn last: the other draws stay as they were
    return c, fm


def _note(c, fm):
    note(f"{case_id(c)}-HKV{c['HKV']} {fm!r}")
    fmaps.register(fm)  # the reference looks the map up by name: this example's map


@FEW
@given(cm=learnable_cases(), path=st.sampled_from(["chunked", "fused"]))
def test_kernels_match_reference(cm, path):
    c, fm = cm
    _note(c, fm)
    inputs = make_inputs(c, requires_grad=True)
    seen = []

    def call(*args, **kw):  # the forward of forward_and_grads, kept to check o and the state too
        with lx.config.override(path=path, chunk=16):
            seen.append(lx.linear_attention(*args, **kw))
        return seen[-1]

    got, want, bounds, names = forward_and_grads(c, "triton", inputs=inputs, call=call)
    (o, state_T), (q, k, v, state) = seen[0], inputs
    check_forward(c, o, q, k, v, state)
    check_state(c, state_T, q, k, v, state)
    check_grads(c, got, want, bounds, names)


@FEW
@given(cm=learnable_cases(t_values=(1, 5, 9), causal=True), inplace=st.booleans())
def test_decode_steps_match_reference(cm, inplace):
    c, fm = cm
    _note(c, fm)
    q, k, v, state = make_inputs(c)
    o, final = decode_steps(c, q, k, v, state, backend="triton", inplace=inplace)
    check_forward(c, o, q, k, v, state)
    check_state(c, final, q, k, v, state)


def _param_grads(c, fm):
    """dL/d(parameters) of L = sum(o do) + sum(S_T dS) + sum(z_T dz) through the kernels, the float64 reference's
    (a float64 copy of the map) and the bound of each (testing.grad_bound's construction, with respect to the
    parameters): -> names, got, want, bounds."""
    q, k, v, state = make_inputs(c, requires_grad=True)
    if state is not None:  # a leaf: S_0 built by the map must not pass the map's gradient back through it
        state = tuple(x.detach().requires_grad_() for x in state)
    kw = call_kwargs(c)
    o, (S, z) = lx.linear_attention(q, k, v, feature_map=fm, initial_state=state, backend="triton",
                                    return_state=True, **kw)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    do = torch.randn(o.shape, generator=g).to(o.dtype).float()
    dS, dz = torch.randn(S.shape, generator=g), torch.randn(z.shape, generator=g)
    names, params = zip(*fm.named_parameters())
    got = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum() + (z * dz).sum(), params)

    fm64 = copy.deepcopy(fm).double()  # the same values (fp32 -> float64 is exact), its own leaves
    params64 = [p for _, p in fm64.named_parameters()]
    x64 = [x.detach().double() for x in (q, k, v)]
    st64 = tuple(x.detach().double() for x in state) if state is not None else None
    o64, (S64, z64), _, den = linear_attention_reference(*x64, fm64, initial_state=st64, **kw)
    want = torch.autograd.grad(_loss(o64, S64, z64, do, dS, dz, absolute=False), params64)
    _, (S_abs, z_abs), n_abs, d_abs = linear_attention_reference(*x64, fm64, initial_state=st64, absolute=True,
                                                                 **kw)
    out = _output_bound(c, o64.detach(), den.detach(), n_abs, d_abs)
    bounds = torch.autograd.grad(_loss(out, S_abs, z_abs, do, dS, dz, absolute=True), params64)
    return names, got, want, [b.abs() for b in bounds]


@FEW
@given(cm=learnable_cases(t_values=(1, 7, 17, 33)))
def test_parameter_gradients_match_reference(cm):
    c, fm = cm
    _note(c, fm)
    for name, g, w, b in zip(*_param_grads(c, fm)):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert_within(f"d{name}", g, w, b, GTOL[c["dtype"]])


# ---- (c) inits, module behaviour, errors

def test_defaults_follow_the_authors():
    lol, fla, tr = hedgehog(12), hedgehog(12, variant="fla"), t2r(12)
    assert (lol.name, fla.name, tr.name) == ("hedgehog_lolcats_d12_m24", "hedgehog_fla_d12_m24", "t2r_d12_m12")
    assert fmaps.get(lol.name) is lol and fmaps.get(tr.name) is tr  # registered
    assert lol.positive and fla.positive and not tr.positive
    # LoLCATs' configs: kaiming_uniform_ of [H, D, F] (fan_in D F), no bias
    assert lol.init == "kaiming" and lol.query.bias is None and lol.query.weight.shape == (1, 12, 12)
    assert 0 < lol.query.weight.abs().max() <= (6 / (12 * 12)) ** 0.5
    # FLA: identity weight, zero bias
    assert fla.init == "identity"
    torch.testing.assert_close(fla.query.weight[0], torch.eye(12), rtol=0, atol=0)
    torch.testing.assert_close(fla.query.bias, torch.zeros(1, 12), rtol=0, atol=0)
    # T2R: nn.Linear's U(+-1/sqrt(D)) for W and b
    for p in (tr.query.weight, tr.query.bias):
        assert 0 < p.abs().max() <= 12 ** -0.5 and p.abs().min() < 12 ** -0.5
    assert tr.query.bias.shape == (1, 12)


def test_kaiming_init_spreads_over_its_bound():
    fm = hedgehog(64, 256, heads=4)  # [4, 64, 128] draws: U(-b, b), b = sqrt(6 / (64 * 128))
    W, bound = fm.query.weight.detach(), (6 / (64 * 128)) ** 0.5
    assert W.abs().max() <= bound and W.abs().max() > 0.99 * bound
    assert abs(W.std().item() - bound / 3 ** 0.5) < 0.02 * bound


@pytest.mark.parametrize("variant", ["lolcats", "fla"])
@pytest.mark.parametrize("D,F", [(6, 6), (6, 9), (6, 4)])
def test_identity_init_is_the_parameter_free_map(variant, D, F):
    # identity W (eye_: the first min(D, F) coordinates, zero past D) and zero b: Hedgehog's exponential map on x
    fm = hedgehog(D, 2 * F, heads=2, variant=variant, init="identity", bias=True).double()
    x = torch.randn(3, 7, 2, D, dtype=F64) * 2
    e = torch.nn.functional.pad(x, (0, max(F - D, 0)))[..., :F]
    if variant == "lolcats":
        want = torch.cat([e.softmax(-1), (-e).softmax(-1)], -1).clamp(min=LOLCATS_EPS)
        halves = fm.features(x).unflatten(-1, (2, F)).sum(-1)
        torch.testing.assert_close(halves, torch.ones_like(halves), **EXACT)  # each half a distribution
    else:
        want = torch.cat([2 * e, -2 * e], -1).softmax(-1)
        torch.testing.assert_close(fm.features(x).sum(-1), torch.ones(3, 7, 2, dtype=F64), **EXACT)
    torch.testing.assert_close(fm.features(x), want, **EXACT)
    # "spiky": the largest coordinate of x gets the largest first-half feature; the largest feature of a
    # softmax (LoLCATs': of each half; FLA's: of all) grows as x does
    f1, f3 = (fm.features(s * x) for s in (1.0, 3.0))
    if F <= D:
        assert torch.equal(f1[..., :F].argmax(-1), x[..., :F].argmax(-1))
    group = F if variant == "lolcats" else 2 * F
    assert bool((f3[..., :group].amax(-1) >= f1[..., :group].amax(-1)).all())


def test_untied_key_parameters_start_as_a_copy():
    fm = hedgehog(5, 8, heads=3, tied=False)  # LoLCATs' copy.deepcopy of the query map
    assert not fm.tied and fm.key.weight.data_ptr() != fm.query.weight.data_ptr()
    torch.testing.assert_close(fm.key.weight, fm.query.weight, rtol=0, atol=0)
    grouped = hedgehog(5, 8, heads=4, tied=False, key_heads=2)
    assert grouped.key.weight.shape == (2, 5, 4) and grouped.heads_of("key") == 2


@pytest.mark.parametrize("kind", ["lolcats", "fla", "t2r"])
def test_module_behaviour(kind):
    fm = _randomize(_make(kind, 5, 6, heads=2, tied=False), 3)
    F = 3 if kind != "t2r" else 6
    assert [(n, tuple(p.shape)) for n, p in fm.named_parameters()] == [
        ("query.weight", (2, 5, F)), ("query.bias", (2, F)), ("key.weight", (2, 5, F)), ("key.bias", (2, F))]
    # the kernels' [HW, D + 1, M] fp32: [W, -W] over [b, -b] for Hedgehog
    p = fm.kernel_params("query", "cpu")
    W, b = fm.query.weight, fm.query.bias
    want = torch.cat([W, b[:, None]], 1) if kind == "t2r" else torch.cat([torch.cat([W, -W], -1),
                                                                          torch.cat([b, -b], -1)[:, None]], 1)
    assert p.dtype == torch.float32 and p.shape == (2, 6, 6)
    torch.testing.assert_close(p, want, rtol=0, atol=0)
    # state_dict round trip into a fresh map of the same kind
    fresh = _make(kind, 5, 6, heads=2, tied=False)
    fresh.load_state_dict(fm.state_dict())
    x = torch.randn(2, 4, 2, 5)
    for side in ("query", "key"):
        torch.testing.assert_close(fresh.features(x, side), fm.features(x, side), rtol=0, atol=0)
    # .to(float64): float64 parameters, float64 features equal to the float32 map's on the same values
    fm64 = copy.deepcopy(fm).to(F64)
    assert all(p.dtype == F64 for p in fm64.parameters())
    torch.testing.assert_close(fm64.features(x.double(), "key"), fm.features(x.double(), "key"), **EXACT)
    assert fm64.kernel_params("key", "cpu").dtype == torch.float32


@pytest.mark.parametrize("kind", ["lolcats", "fla", "t2r"])
def test_a_training_step_moves_the_parameters(kind):
    # the parameters are trained through the kernels: one SGD step on a regression loss lowers it
    fm = _randomize(_make(kind, 6, 10, heads=2), 0, spread=0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, d, generator=g) for d in (6, 6, 3))
    target = torch.randn(1, 12, 2, 3, generator=g)
    opt = torch.optim.SGD(fm.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = (lx.linear_attention(q, k, v, feature_map=fm, backend="triton") - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_errors():
    with pytest.raises(ValueError, match="must be even for hedgehog.*got 7"):
        hedgehog(4, 7)
    with pytest.raises(ValueError, match=r"variant must be one of \('lolcats', 'fla'\), got 'hazy'"):
        hedgehog(4, 8, variant="hazy")
    with pytest.raises(ValueError, match=r"init must be one of \('kaiming', 'identity'\), got 'zeros'"):
        hedgehog(4, 8, init="zeros")
    with pytest.raises(ValueError, match="D must be a positive int, got 0"):
        hedgehog(0)
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        t2r(4, 0)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        t2r(4, 4, heads=0)
    fm = hedgehog(4, 8, heads=3)
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="has 3 query heads: it must have 1 \\(shared\\) or the 2"):
        lx.linear_attention(q, q, q, feature_map=fm)
    with pytest.raises(ValueError, match="projects head vectors of width D = 4, got D = 5"):
        lx.linear_attention(torch.randn(1, 5, 3, 5), torch.randn(1, 5, 3, 5), torch.randn(1, 5, 3, 2),
                            feature_map=fm)


def test_classes_are_learnable_maps():
    assert isinstance(hedgehog(4, 8), HedgehogFeatureMap) and isinstance(t2r(4), T2RFeatureMap)
    assert all(isinstance(m, fmaps.LearnableFeatureMap) and m.learnable for m in (hedgehog(4, 8), t2r(4)))
