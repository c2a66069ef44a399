"""The decode step's projections in C (lintx_triton/native/linear.c, issue #17): nn.Linear's x w^T + b for a
few rows, within a rounding bound of the float64 product at every shape and ISA variant, used by
LinearAttention.step only where nothing else must see the call (autograd, a hook, a tracer)."""

import contextlib
import ctypes

import pytest
import torch
from hypothesis import given, strategies as st

import lintx_triton as lx
from helpers import attr_runner, build_variant, cpu_isas, freed_in_default_device_new_empty, native_off
from lintx_triton import native

needs_native = pytest.mark.skipif(not native.available(), reason="no working C compiler here: no native code")

U = 2.0 ** -24  # float32's unit roundoff


def _bound(x, w, b):
    """|y - x w^T - b| for any order of the K products' sums (each an FMA or a product and an add) and the bias'
    add: gamma_(K+1) (|x| |w|^T + |b|), Higham's bound for a dot product of K + 1 terms, plus y's rounding."""
    K = x.shape[1]
    g = (K + 1) * U / (1 - (K + 1) * U)
    ref = x.abs().double() @ w.abs().double().T + (b.abs().double() if b is not None else 0)
    return g * ref + U * ref


def _check(y, x, w, b):
    want = x.double() @ w.double().T + (b.double() if b is not None else 0)
    err = (y.double() - want).abs()
    bound = _bound(x, w, b)
    assert (err <= bound).all(), f"error {err.max().item():.3g} over its bound at {(err / bound).argmax().item()}"


_new_empty = torch.Tensor.new_empty


@pytest.fixture(autouse=True)
def nan_new_empty(monkeypatch):
    """y (x.new_empty) starts as NaN, as conftest's nan_empty does for torch.empty: a column linear.c forgot fails."""
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _new_empty(self, *a, **k).fill_(float("nan")))


def _module(path: str):
    """runner.c's module for a path of native.linear: "c" (built with meta.cpp where it builds), "c_attrs" (built
    without: the tensors' Python attributes), "python" (False: its checks in Python, where runner.c cannot be
    built)."""
    if path == "python":
        return False
    mod = native._ext() if path == "c" else attr_runner()
    if mod is None:
        pytest.skip("runner.c cannot be built here (no Python headers): native.linear's checks run in Python")
    return mod


@contextlib.contextmanager
def _on(path: str):
    """native.linear on one of its paths (see _module) within."""
    mod, saved = _module(path), native._EXT
    native._EXT = mod
    try:
        yield
    finally:
        native._EXT = saved


class _Calls:
    """linear.c's calls since it was made, on the path of _on(path): (whole, split between threads); runner.c's
    counter, or for the Python path its ctypes functions wrapped."""

    def __init__(self, monkeypatch, path: str):
        self.ext = _module(path) or None
        self.start = self.ext.linear_calls() if self.ext is not None else (0, 0)
        self.python = [0, 0]
        if self.ext is None:
            for i, name in enumerate(("_linear", "_linear_team")):
                monkeypatch.setattr(native, name, self._counted(getattr(native, name), i))

    def _counted(self, fn, i: int):
        def counted(*args):
            self.python[i] += 1
            return fn(*args)

        return counted

    def __call__(self) -> tuple:
        if self.ext is None:
            return tuple(self.python)
        now = self.ext.linear_calls()
        return now[0] - self.start[0], now[1] - self.start[1]


PATHS = pytest.mark.parametrize("path", ["c", "c_attrs", "python"])

# M up to LINEAR_MAX_ROWS; N and K around the tiles (4 x 4 rows, 16 / 8 / 4 lanes) and their tails
shapes = st.tuples(st.integers(1, native.LINEAR_MAX_ROWS), st.integers(1, 37), st.integers(1, 70))


@needs_native
@PATHS
@given(shape=shapes, bias=st.booleans(), pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_linear_within_bound(path, shape, bias, pad, seed):
    """Every shape (row blocks and column tiles with tails, K below, at and past a vector), with and without a
    bias, x's rows strided (a view of wider rows): within the dot-product bound of the float64 product."""
    M, N, K = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K + pad, generator=gen)[:, :K]
    w, b = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen) if bias else None
    with _on(path):
        y = native.linear(x, w, b)
    assert y is not None and y.shape == (M, N) and y.is_contiguous()
    _check(y, x, w, b)


@needs_native
@PATHS
def test_split_between_threads_within_bound(monkeypatch, path):
    """Large enough calls split y's columns between torch's threads (on its OpenMP team, in whole tiles of 4; the
    last part takes the tail): the same bound, every column written (y starts as NaN)."""
    calls = _Calls(monkeypatch, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(2)
        for M, N, K in [(16, 512, 512), (9, 37, 6400), (32, 6, 12000)]:
            assert M * N * K >= native._LINEAR_SPLIT_MIN
            x, w, b = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
            with _on(path):
                y = native.linear(x, w, b)
            _check(y, x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert calls() == ((0, 3) if native._openmp_parallel() else (3, 0))


@needs_native
def test_every_isa_variant_within_bound(native_variants):
    """linear.c's variants (AVX-512, AVX2, the baseline; each pinned by -DLINTX_FORCE_ISA), each on shapes with
    row, column and K tails: within the bound."""
    gen = torch.Generator().manual_seed(1)
    for isa in cpu_isas():
        fn = ctypes.CDLL(str(build_variant(isa, native_variants))).lintx_linear_f32
        for M, N, K in [(16, 512, 512), (5, 7, 3), (1, 33, 67), (32, 9, 16), (7, 1, 1)]:
            x, w, b = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
            y = torch.full((M, N), float("nan"))
            a = (ctypes.c_int64 * 9)(M, N, K, x.data_ptr(), K, w.data_ptr(), b.data_ptr(), y.data_ptr(), N)
            assert fn(a) == 0
            _check(y, x, w, b)


@needs_native
@PATHS
def test_not_eligible_returns_none(path):
    """None (the caller runs torch) wherever linear.c must not run: autograd to record, too many rows, another
    dtype, a non-contiguous weight or bias, a strided x column, a tensor subclass, a tracer, the switch off."""
    with _on(path):
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        with torch.no_grad():
            assert native.linear(x, w, b) is not None
            assert native.linear(torch.randn(native.LINEAR_MAX_ROWS + 1, 8), w, b) is None
            assert native.linear(x.double(), w.double(), b.double()) is None
            assert native.linear(x, torch.randn(8, 5).T, b) is None
            assert native.linear(x, w, torch.randn(10)[::2]) is None
            assert native.linear(torch.randn(8, 3).T, w, b) is None
            assert native.linear(x.as_subclass(type("Sub", (torch.Tensor,), {})), w, b) is None
            assert native.linear(x[:0], w, b) is None  # no rows
            assert native.linear(torch.randn(3, 0), torch.randn(5, 0), b) is None  # K = 0
            assert native.linear(x, torch.randn(0, 8), None) is None  # N = 0
            assert native.linear(x.to("meta"), w, b) is None and native.linear(x, w.to("meta"), b) is None
            assert native.linear(x, w, b.double()) is None
            assert native.linear(x, w.double(), b) is None
            assert native.linear(x, w, torch.randn(6)) is None and native.linear(x, w, torch.randn(5, 1)) is None
            # no memory behind them (linear.c would read NULL or freed memory): sparse, mkldnn, a ZeroTensor, a
            # weight whose storage was resized to 0 (as FSDP frees a parameter's)
            shrunk = w.clone()
            shrunk.untyped_storage().resize_(0)
            for xx, ww, bb in [(x.to_sparse(), w, b), (x, w.to_sparse(), b), (x, w, b.to_sparse()), (x, shrunk, b),
                               (torch._efficientzerotensor(3, 8), w, b), (x, w, torch._efficientzerotensor(5))]:
                assert native.linear(xx, ww, bb) is None
            if torch.backends.mkldnn.is_available():
                assert native.linear(x.to_mkldnn(), w, b) is None
            assert native.linear(torch._neg_view(x), w, b) is None  # its memory holds -x
            assert native.linear(x, torch._neg_view(w), b) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear would give bfloat16
                assert native.linear(x, w, b) is None
            with native_off():
                assert native.linear(x, w, b) is None
        assert native.linear(x.clone().requires_grad_(), w, b) is None  # grad mode on, an input that requires grad
        assert native.linear(x, w.requires_grad_(), b) is None  # grad mode on, a parameter that requires grad
        from torch.fx.experimental.proxy_tensor import make_fx

        graph = make_fx(lambda x, w, b: native.linear(x, w, b) is None)(x, w.detach(), b)
        assert graph(x, w.detach(), b)  # the tracer saw None (no call it could not record)

        class Logging(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Logging():  # a mode answers even the attribute reads: not for the C
            assert native.linear(x, w.detach(), b) is None
        with torch.no_grad(), torch.device("cpu"):  # set_default_device's mode alone: the C runs
            assert native.linear(x, w.detach(), b) is not None


@needs_native
@PATHS
def test_default_device_mode_stays_out_of_the_window(path):
    """Under torch.set_default_device's mode (which linear.c runs under) its Python __torch_function__ does not
    run between the reads of x, w and the call (y's allocation included): a trace hook that would free w there
    never fires, and y is right."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32768, generator=gen), torch.randn(64, 32768, generator=gen)  # w: 8 MiB, its own mmap
    want = x.double() @ w.double().T
    with _on(path), torch.no_grad(), freed_in_default_device_new_empty(w) as fired:
        y = native.linear(x, w, None)
    assert not fired and y is not None
    assert (y.double() - want).abs().max() < 1e-3


@needs_native
def test_runner_is_built_outside_modes(monkeypatch, tmp_path):
    """runner.c is built (and meta.cpp checked against the attributes) at the first call outside a mode or
    tracer: a call under a TorchFunctionMode leaves it unbuilt; under torch.set_default_device's mode it builds,
    its check on CPU tensors all the same."""
    if native._cxx_compiler() is None or native._ext() is None:
        pytest.skip("no C++ compiler, or runner.c cannot be built here")
    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setenv("LINTX_TRITON_CACHE_DIR", str(tmp_path / "cache"))  # built again (the library stays)

    class Logging(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with torch.no_grad():
        with Logging():
            assert native.linear(x, w, b) is None and native._EXT is None
        with torch.device("meta"):
            y = native.linear(x, w, b)
    assert y is not None and native._EXT.FROM_IMPL == 1
    _check(y, x, w, b)


@needs_native
@PATHS
def test_module_step_projects_in_c_unless_hooked(monkeypatch, path):
    """LinearAttention.step under no_grad projects q, k, v and the output with linear.c (four calls a step) and
    matches the module with the native code off; a forward hook on a projection, a module's own or a global
    one, sends that projection through the module (the hook runs); with grad the module runs as before."""
    count = _Calls(monkeypatch, path)
    torch.manual_seed(0)
    attn = lx.nn.LinearAttention(32, 4, num_kv_heads=2)
    x = torch.randn(3, 32)
    with torch.no_grad(), _on(path):
        y, _ = attn.step(x, attn.init_state(3))
        assert sum(count()) == 4
        with native_off():
            y_t, _ = attn.step(x, attn.init_state(3))
        torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
        seen = []
        handle = attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        attn.step(x, attn.init_state(3))
        handle.remove()
        assert sum(count()) == 7 and seen == [(3, 16)]
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
        try:
            attn.step(x, attn.init_state(3))
        finally:
            handle.remove()
        assert sum(count()) == 7 and seen.count(torch.nn.Linear) == 4
    with _on(path):
        y_g, _ = attn.step(x, attn.init_state(3))
    assert sum(count()) == 7 and y_g.requires_grad


@needs_native
@PATHS
def test_module_step_leaves_replaced_forwards_modes_and_autocast_to_torch(monkeypatch, path):
    """A projection whose forward is replaced on the instance (as accelerate's hooks do) or patched on the class,
    a TorchFunctionMode around the step (it sees the four F.linear calls, as it did before linear.c), and CPU
    autocast (the projections' dtype is autocast's) all take the modules' own path."""
    torch.manual_seed(0)
    attn = lx.nn.LinearAttention(32, 4, num_kv_heads=2)
    x = torch.randn(3, 32)
    with torch.no_grad(), _on(path):
        y0, _ = attn.step(x, attn.init_state(3))
        original = attn.k_proj.forward
        attn.k_proj.forward = lambda i: original(i) * 0
        y1, _ = attn.step(x, attn.init_state(3))
        del attn.k_proj.forward
        seen = []
        real = torch.nn.Linear.forward
        monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, i: (seen.append(1), real(self, i))[1])
        attn.step(x, attn.init_state(3))
        assert len(seen) == 4
        monkeypatch.undo()
        funcs = []

        class Logging(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                funcs.append(func)
                return func(*args, **(kwargs or {}))

        with Logging():
            attn.step(x, attn.init_state(3))
        assert funcs.count(torch.nn.functional.linear) == 4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_native, _ = attn.step(x, attn.init_state(3))
            with native_off():
                y_torch, _ = attn.step(x, attn.init_state(3))
    assert not torch.equal(y0, y1)  # k was zeroed: the replaced forward ran
    assert y_native.dtype == y_torch.dtype == torch.bfloat16
