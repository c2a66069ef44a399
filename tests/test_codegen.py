"""The generator: the feature map is spliced into the source, the cache is keyed, user maps get every kernel."""

import ast

import pytest
import torch
from hypothesis import given, note

import lintx_triton as lx
from lintx_triton import codegen, feature_maps
from lintx_triton.spec import KernelSpec
from helpers import assert_forward_close, case_id, cases, make_inputs

KERNELS = [
    "chunk_kernel_h", "chunk_scan_kernel", "chunk_fwd_kernel_o", "bwd_kernel_g", "chunk_bwd_kernel_dq",
    "chunk_bwd_kernel_dkv",
]


@pytest.mark.parametrize("name", ["elu", "relu", "identity"])
def test_emit_shows_the_fused_map(name):
    fm = feature_maps.get(name)
    src = lx.emit(feature_map=name, head_dim=48, value_dim=80, dtype=torch.float16)
    ast.parse(src)  # valid Python
    assert f"return {fm.phi}" in src and f"return {fm.vjp}" in src
    assert "D = tl.constexpr(48)" in src and "DV = tl.constexpr(80)" in src and "BD = tl.constexpr(64)" in src
    assert "tl.float16" in src
    for k in KERNELS:
        assert f"def {k}(" in src
    # phi is applied to tiles on chip; no kernel takes a phi(q)/phi(k) tensor argument
    assert "_phi(q, row_q" in src and "_phi(k, row_k" in src and "phi(x)" in src


def test_spec_key_is_stable_and_distinct():
    a = KernelSpec("elu", True, True, "bfloat16", 64, 64, False, False)
    assert a.key() == KernelSpec("elu", True, True, "bfloat16", 64, 64, False, False).key()
    others = [
        KernelSpec("relu", True, True, "bfloat16", 64, 64, False, False),
        KernelSpec("elu", False, True, "bfloat16", 64, 64, False, False),
        KernelSpec("elu", True, False, "bfloat16", 64, 64, False, False),
        KernelSpec("elu", True, True, "float16", 64, 64, False, False),
        KernelSpec("elu", True, True, "bfloat16", 64, 32, False, False),
        KernelSpec("elu", True, True, "bfloat16", 64, 64, True, False),
        KernelSpec("elu", True, True, "bfloat16", 64, 64, False, True),
    ]
    assert len({a.key()} | {o.key() for o in others}) == 1 + len(others)
    assert a.tag() == "elu-causal-norm-bfloat16-D64-DV64"


def test_generated_module_is_cached_on_disk():
    spec = KernelSpec("relu", True, False, "float32", 8, 8, False, True)
    mod = codegen.load(spec)
    path = codegen.source_path(spec)
    assert path.exists() and path.read_text() == lx.emit(spec)
    assert codegen.load(spec) is mod
    assert str(codegen.cache_dir()) in str(path)


SOFTPLUS = feature_maps.ElementwiseFeatureMap(
    name="softplus_test",
    phi="tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))",
    vjp="g * tl.sigmoid(x)",
    reference=torch.nn.functional.softplus,
    doc="log(1 + exp(x))",
    positive=True,
)


@given(c=cases(maps=("elu",), dtypes=("float32",)))
def test_user_defined_map_gets_every_kernel(c):
    """A map defined in a few lines of Triton: forward, state and gradients all generated for it."""
    feature_maps.register(SOFTPLUS)
    c = dict(c, feature_map="softplus_test")
    note(case_id(c))
    q, k, v, state = make_inputs(c, requires_grad=True)
    o = lx.linear_attention(q, k, v, feature_map=SOFTPLUS, causal=c["causal"], normalize=c["normalize"],
                            initial_state=state, scale=c["scale"], backend="triton")
    assert_forward_close(c, o.detach(), q.detach(), k.detach(), v.detach(),
                         tuple(x.detach() for x in state) if state else None)
    leaves = [q, k, v]
    got = torch.autograd.grad(o.sum(), leaves)
    ot = lx.linear_attention(q, k, v, feature_map="softplus_test", causal=c["causal"], normalize=c["normalize"],
                             initial_state=state, scale=c["scale"], backend="torch")
    want = torch.autograd.grad(ot.sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
    assert "tl.sigmoid(x)" in lx.emit(feature_map="softplus_test")


def test_feature_map_validation():
    with pytest.raises(ValueError, match="identifier"):
        feature_maps.ElementwiseFeatureMap("my map", "x", "g", reference=lambda x: x)
    with pytest.raises(ValueError, match="one-line Triton expression"):
        feature_maps.ElementwiseFeatureMap("m", "", "g", reference=lambda x: x)
    with pytest.raises(TypeError, match="reference must be callable"):
        feature_maps.ElementwiseFeatureMap("m", "x", "g", reference=None)
    with pytest.raises(ValueError, match="already registered"):
        feature_maps.register(feature_maps.ElementwiseFeatureMap("elu", "x", "g", reference=lambda x: x))
