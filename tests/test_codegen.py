"""The generator: the feature map is spliced into the source, the cache is keyed, user maps get every kernel."""

import ast
import importlib

import pytest
import torch
from hypothesis import given, note, settings

import lintx_triton as lx
from lintx_triton import codegen, feature_maps
from lintx_triton.spec import KernelSpec
from helpers import EPS_VALUES, case_id, cases, check_forward, check_grads, check_state, forward_and_grads, \
    make_inputs

KERNELS = [k for family in codegen.KERNELS.values() for k in family]  # every launched function, by family


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


# T up to 33 (two chunks and one more token): what the generated kernels do at longer T the built-in maps' properties
# check; this one forward and backward with every gradient ran ~250 s over T up to 61 on two shared cores, and
# 107 s at the ci profile's 40 examples: a user's map reaches the same kernels as the built-in ones (whose
# properties draw the shapes), so a fifth of the profile's examples shows that it gets every one of them
@settings(max_examples=max(5, settings.default.max_examples // 5))
@given(c=cases(maps=("elu",), dtypes=("float32",), t_values=(1, 2, 7, 16, 17, 33), eps_values=EPS_VALUES))
def test_user_defined_map_gets_every_kernel(kernel_device, c):
    """A map defined in a few lines of Triton: forward, state and gradients all generated for it, each against the
    float64 reference within its bound (gradients of q, k, v, the initial state, through o and the final state)."""
    feature_maps.register(SOFTPLUS)
    c = dict(c, feature_map="softplus_test")
    note(case_id(c))
    out = []

    def call(*args, **kwargs):
        out.append(lx.linear_attention(*args, **kwargs))
        return out[-1]

    got, want, bounds, names = forward_and_grads(c, "triton", device=kernel_device, call=call)
    check_grads(c, got, want, bounds, names)
    o, (S, z) = out[0]
    q, k, v, state = make_inputs(c, device=kernel_device)  # the inputs of that call (the seed's)
    check_forward(c, o.detach(), q, k, v, state)
    check_state(c, (S.detach(), z.detach()), q, k, v, state)
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


# ---- the kernels are real source files ----

KERNEL_FILES = ("helpers", "elementwise", "projected", "polynomial", "single_block", "forward", "backward", "decode",
                "hybrid")


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_file_names_resolve(name):
    """Each kernel file is a module of its own: every global its Triton functions use is defined or imported in
    it (what a linter checks), so an editor's go-to-definition works and a typo fails here, not at a launch."""
    import builtins
    import inspect

    mod = importlib.import_module(f"lintx_triton.codegen.kernels.{name}")
    # @triton.jit functions (interpreted here): they keep the Python function as .fn
    fns = [f for f in vars(mod).values() if getattr(getattr(f, "fn", None), "__module__", None) == mod.__name__]
    assert fns, name
    for f in fns:
        tree = ast.parse(inspect.getsource(f.fn).lstrip())
        local = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
        local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        missing = sorted(u for u in used - local if not hasattr(mod, u) and not hasattr(builtins, u))
        assert not missing, f"{name}.py {f.__name__} uses undefined {missing}"


def test_header_defines_what_the_kernel_files_import():
    """kernels/constants.py (the stand-in readers and linters see) names exactly the header's constants, and every
    name a kernel file imports from it is one of them or a feature-map function."""
    import re

    from lintx_triton.codegen import kernels
    from lintx_triton.codegen.kernels import constants

    render = importlib.import_module("lintx_triton.codegen.render")  # (the package's `render` is the function)

    header = set(re.findall(r"^(\w+) = tl\.constexpr\(", render.HEADER, re.M))
    stub = {n for n, v in vars(constants).items() if type(v).__name__ == "constexpr"}
    assert header == stub
    spliced = {"phi", "phi_vjp", "phi_proj", "phi_proj_vjp", "poly_pre_sel", "poly_pre_vjp", "poly_pre_dparams",
               "poly_index"}
    assert spliced <= set(vars(constants))
    for name in KERNEL_FILES:
        text = (render.resources.files(kernels) / f"{name}.py").read_text()
        for line in re.findall(r"^from \.constants import (.+)$", text, re.M):
            assert {n.strip() for n in line.split("#")[0].split(",")} <= header | spliced, (name, line)


def test_cache_key_follows_the_kernel_files(monkeypatch):
    """Editing a kernel file changes every module's key: a stale generated module is never reused."""
    render = importlib.import_module("lintx_triton.codegen.render")

    spec = KernelSpec("elu", True, True, "float32", 8, 8, False, True)
    key = render.module_key(spec)
    original = render._kernel_file

    def edited(name):
        text = original(name)
        return text + "# edited\n" if name == "forward.py" else text

    monkeypatch.setattr(render, "_kernel_file", edited)
    render._sources_hash.cache_clear()
    try:
        assert render.module_key(spec) != key
        assert "# edited" in render.render(spec)
    finally:
        monkeypatch.undo()
        render._sources_hash.cache_clear()
    assert render.module_key(spec) == key


def test_kernel_table_is_what_the_launchers_launch():
    """codegen.KERNELS names each family's own kernels; the launchers (recorded on meta tensors, nothing runs)
    launch exactly those, plus the forward's chunk sums and scan again in the backward."""
    from lintx_triton.compile_report import family_launches

    spec = KernelSpec("elu", True, True, "bfloat16", 64, 64, True, False)
    cfg = lx.config.gpu_heuristic(spec, batch_heads=16, sm_count=132)  # chunked: few programs
    every = {k for family in codegen.KERNELS.values() for k in family}
    for family, kernels in codegen.KERNELS.items():
        launched = {L.kernel for L in family_launches(family, spec, cfg)}
        assert set(kernels) <= launched <= every, family
    fused = lx.config.gpu_heuristic(spec, batch_heads=4096, sm_count=132)
    assert [L.kernel for L in family_launches("forward", spec, fused)] == ["chunk_fwd_kernel_o"]
