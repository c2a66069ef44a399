"""The causal CPU path in native C (lintx_triton/native/causal.c, issue #17): the recurrent forward and backward
that ``backend="torch"`` runs on CPU float32 tensors, checked against the float64 reference's bounds at the
shapes its tiles and padding make special (a token short of, on, and past a tile of 64; D and DV padded to 16;
grouped heads; every map kind, fused or computed by torch), in every ISA variant, split between threads, and
never taken where it must not be (autograd tracers, the switch off, no compiler)."""

import pytest
import torch

import lintx_triton as lx
from helpers import build_variant, case_id, check_forward, check_grads, check_state, cpu_isas, forward_and_grads, \
    make_inputs, native_off
from lintx_triton import native, reference
from lintx_triton.feature_maps import builtin

needs_native = pytest.mark.skipif(not native.available(), reason="no working C compiler here: the causal CPU "
                                  "path takes the chunked PyTorch products")


def _case(B=2, T=37, H=4, HKV=None, D=16, DV=16, fm="elu", normalize=True, initial_state=True, scale=0.5,
          eps=1e-3, seed=1, **extra):
    return dict(B=B, T=T, H=H, HKV=HKV or H, D=D, DV=DV, dtype="float32", feature_map=fm, causal=True,
                normalize=normalize, initial_state=initial_state, scale=scale, eps=eps, seed=seed, **extra)


@pytest.fixture
def calls(monkeypatch):
    """causal_forward's and causal_backward's calls, counted: [("forward" or "backward", the fused map's name or
    None)]."""
    seen = []
    fwd, bwd = native.causal_forward, native.causal_backward

    def forward(*args, **kw):
        seen.append(("forward", args[4].name if len(args) > 4 and args[4] is not None else None))
        return fwd(*args, **kw)

    def backward(*args, **kw):
        seen.append(("backward", args[8].name if len(args) > 8 and args[8] is not None else None))
        return bwd(*args, **kw)

    monkeypatch.setattr(native, "causal_forward", forward)
    monkeypatch.setattr(native, "causal_backward", backward)
    return seen


# (B, T, H, HKV, D, DV): tokens around the tile of 64 (1, 63, 64, 65, 130), D and DV off the padding of 16
# (1, 3, 13, 40, 80), grouped heads (HKV < H)
SHAPES = [(1, 1, 1, 1, 1, 1), (2, 63, 3, 3, 13, 3), (1, 64, 2, 1, 16, 40), (2, 65, 4, 2, 8, 24),
          (1, 130, 2, 2, 32, 80), (3, 17, 6, 3, 40, 16)]
shape_id = "B{}-T{}-H{}-HKV{}-D{}-DV{}".format


@needs_native
# identity unnormalized only: a signed map's normalizer can pass through 0, where no bound means anything
@pytest.mark.parametrize("fm,normalize", [("elu", True), ("elu", False), ("relu", True), ("relu", False),
                                          ("identity", False), ("favor", True), ("favor", False),
                                          ("hedgehog", True)],
                         ids=lambda x: str(x) if isinstance(x, str) else ("norm" if x else "unnorm"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(*s))
def test_forward_and_gradients(calls, shape, fm, normalize):
    """Outputs, final states and every gradient (q, k, v, the initial state, through a final-state gradient) within
    the float64 reference's bounds; a built-in map is applied in the C (phi, and phi' in the backward), a
    random-feature map's features come from torch (and its gradients go back through torch's autograd)."""
    B, T, H, HKV, D, DV = shape
    extra = {"favor": dict(map=dict(family="favor", D=D, M=24, seed=3)),
             "hedgehog": dict(map=dict(family="hedgehog", D=D, M=24, seed=3, heads=1, key_heads=None))}.get(fm, {})
    c = _case(B=B, T=T, H=H, HKV=HKV, D=D, DV=DV, fm=fm, normalize=normalize, **extra)
    q, k, v, state = make_inputs(c)
    with torch.no_grad():
        o, st = lx.linear_attention(q, k, v, initial_state=state, backend="torch", return_state=True,
                                    feature_map=lx.testing.ensure_map(c), normalize=normalize, scale=0.5, eps=1e-3)
    fused = None if fm in ("favor", "hedgehog") else fm
    assert calls == [("forward", fused)], case_id(c)
    check_forward(c, o, q, k, v, state)
    check_state(c, st, q, k, v, state)
    calls.clear()
    got, want, bounds, names = forward_and_grads(c, "torch")
    assert calls == [("forward", fused), ("backward", fused)], case_id(c)
    check_grads(c, got, want, bounds, names)


@needs_native
@pytest.mark.parametrize("fm", [builtin.ELU, builtin.RELU, builtin.IDENTITY], ids=lambda f: f.name)
def test_fused_map_gradients_are_torch_maps(calls, fm):
    """phi' in the C is the derivative torch's autograd takes of the map, also where it is not smooth (x = 0, where
    elu + 1's slope is 1 and relu's 0) and far out (x = -20): the gradients of a call with the map fused match
    those of the same map computed by torch (the same map under another name, which the C does not recognise)."""
    by_torch = lx.feature_maps.ElementwiseFeatureMap(name=f"{fm.name}_by_torch", phi=fm.phi, vjp=fm.vjp,
                                                     reference=fm.reference_fn, positive=fm.positive)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 70, 2, 8, generator=g) for _ in range(3))
    for x in (q, k):
        x[0, :3, 0, :4] = 0.0
        x[1, 5:9, 1, :] = -20.0
    do = torch.randn(2, 70, 2, 8, generator=g)
    grads = []
    for m in (fm, by_torch):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = lx.linear_attention(*leaves, feature_map=m, backend="torch", normalize=fm is not builtin.IDENTITY,
                                eps=1e-3)
        grads.append(torch.autograd.grad(o, leaves, do))
    assert calls == [("forward", fm.name), ("backward", fm.name), ("forward", None), ("backward", None)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _split_on(monkeypatch, where: str) -> None:
    """Split every call between 4 threads: on torch's OpenMP team ("team": skipped where torch has none) or on the
    module's own pool ("pool")."""
    if where == "team" and not native._openmp_parallel():
        pytest.skip("torch runs no OpenMP runtime here: splits take the pool")
    if where == "pool":
        monkeypatch.setattr(native, "_openmp_parallel", lambda: 0)
    monkeypatch.setattr(native, "_SPLIT_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)


@needs_native
@pytest.mark.parametrize("where", ["team", "pool"])
@pytest.mark.parametrize("T", [1, 64, 200])
def test_threads_split_heads_with_the_same_bits(monkeypatch, T, where):
    """The heads split between threads (every share its own heads, on torch's OpenMP team or on the module's pool)
    give the same bits as one call, forward and backward."""
    c = _case(B=3, T=T, H=3, D=16, DV=24)
    q, k, v, state = make_inputs(c, requires_grad=True)

    def run():
        o, (S, z) = lx.linear_attention(q, k, v, initial_state=state, backend="torch", return_state=True, scale=0.5,
                                        eps=1e-3)
        grads = torch.autograd.grad((o * o).sum() + S.sum() + z.sum(), (q, k, v, *state))
        with torch.no_grad():
            o2 = lx.linear_attention(q, k, v, initial_state=state, backend="torch", scale=0.5, eps=1e-3)
        return [o, S, z, o2, *grads]

    one = run()
    _split_on(monkeypatch, where)
    split = run()
    for a, b in zip(one, split):
        assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32))


@needs_native
def test_strided_inputs_and_expanded_gradients(calls):
    """q, k, v slices of wider tensors (strides in every dim, a unit inner one or not) and an expanded output
    gradient (sum().backward(): strides 0) give the contiguous inputs' results."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 40, 3, 3, 20, generator=g)
    q, k, v = wide[:, :, 0, :, 2:18], wide[:, :, 1, :, 1:17], wide[:, :, 2, :, ::2]  # v: inner stride 2
    assert not any(x.is_contiguous() for x in (q, k, v))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = lx.linear_attention(*leaves, backend="torch")
    o.sum().backward()
    plain = [x.contiguous().requires_grad_() for x in (q, k, v)]
    o_plain = lx.linear_attention(*plain, backend="torch")
    o_plain.backward(torch.ones_like(o_plain))
    assert torch.equal(o, o_plain)
    for a, b in zip(leaves, plain):
        assert torch.equal(a.grad, b.grad)
    with torch.no_grad():  # phi from the C (torch's elu + 1 under autograd: the last bits differ)
        torch.testing.assert_close(lx.linear_attention(q, k, v, backend="torch"), o.detach(), rtol=1e-5, atol=1e-6)
    assert ("backward", "elu") in calls and ("forward", "elu") in calls


@needs_native
def test_long_sequence_within_bounds():
    """The recurrence adds T terms one after another (the chunked products add C, then T / C): at T = 4096 its
    rounding still sits well inside the tests' bounds (forward and gradients; bench/NOTES.md has T = 8192)."""
    c = _case(B=1, T=4096, H=1, D=32, DV=32, initial_state=False, scale=1.0, eps=1e-6)
    q, k, v, _ = make_inputs(c)
    with torch.no_grad():
        o, st = lx.linear_attention(q, k, v, backend="torch", return_state=True)
    assert check_forward(c, o, q, k, v, None) < 0.5
    assert check_state(c, st, q, k, v, None) < 0.5
    got, want, bounds, names = forward_and_grads(c, "torch")
    assert check_grads(c, got, want, bounds, names) < 0.5


@needs_native
def test_every_isa_variant_within_bounds(native_variants, calls, monkeypatch):
    """Each variant the CPU runs (AVX-512 and AVX2 fuse products into FMAs, the baseline does not: they differ in
    the last bits) meets the reference's bounds, forward and backward, at shapes with padding and ragged tiles."""
    import ctypes

    for isa in cpu_isas():
        lib = ctypes.CDLL(str(build_variant(isa, native_variants)))
        fn = lib.lintx_causal_f32
        fn.restype = ctypes.c_int
        monkeypatch.setattr(native, "_causal", fn)
        for shape in [(2, 65, 4, 2, 13, 40), (1, 130, 1, 1, 64, 64)]:
            B, T, H, HKV, D, DV = shape
            c = _case(B=B, T=T, H=H, HKV=HKV, D=D, DV=DV)
            q, k, v, state = make_inputs(c)
            with torch.no_grad():
                o, st = lx.linear_attention(q, k, v, initial_state=state, backend="torch", return_state=True,
                                            scale=0.5, eps=1e-3)
            check_forward(c, o, q, k, v, state)
            check_state(c, st, q, k, v, state)
            check_grads(c, *forward_and_grads(c, "torch"))
    assert ("backward", "elu") in calls


@needs_native
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is deprecated; still used
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_off_switch_and_tracers_take_the_chunked_path(calls):
    """native.set_enabled(False), FakeTensorMode (a FakeTensor's data_ptr is 0), make_fx and torch.jit.trace (their
    graphs must record the products) run the chunked PyTorch path; make_fx's graph then replays new inputs as
    eager does (torch.jit.trace cannot trace the chunked path's autograd.Function: it raises, where the C would
    have left a graph that returns uninitialised memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        return lx.linear_attention(q, k, v, backend="torch")

    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    with torch.no_grad():
        with native_off():
            o_off = f(q, k, v)
        with FakeTensorMode() as mode:
            assert f(*(mode.from_tensor(t) for t in (q, k, v))).shape == q.shape
        graph = make_fx(f)(q, k, v)
        with pytest.raises(RuntimeError):
            torch.jit.trace(f, (q, k, v), check_trace=False)
        assert not calls
        x2 = [torch.randn(1, 20, 2, 8) - 1 for _ in range(3)]
        torch.testing.assert_close(graph(*x2), f(*x2), rtol=1e-5, atol=1e-6)
        o = f(q, k, v)
    assert calls == [("forward", "elu")] * 2  # the two eager calls
    torch.testing.assert_close(o, o_off, rtol=1e-5, atol=1e-6)


@needs_native
def test_forward_ad_is_not_dropped(calls):
    """Forward-mode AD (dual tensors, which require no grad) takes the chunked path, whose Function has no jvp: an
    error, never an output without its tangent (the C would compute one unseen)."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    with fwAD.dual_level():
        try:
            tangent = fwAD.unpack_dual(lx.linear_attention(fwAD.make_dual(q, torch.ones_like(q)), k, v,
                                                           backend="torch")).tangent
        except NotImplementedError:
            tangent = "raised"
    assert tangent is not None and not calls


@needs_native
def test_features_in_another_dtype_take_the_chunked_path(calls):
    """A user map whose features come out in float64 (the C reads float32): the chunked products, not garbage."""
    import torch.nn.functional as F

    fm = lx.feature_maps.ElementwiseFeatureMap(name="softplus_double", phi="x", vjp="g",
                                               reference=lambda x: F.softplus(x.double()), positive=True)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    with torch.no_grad():
        o = lx.linear_attention(q, k, v, feature_map=fm, backend="torch")
        ref = reference.linear_attention_reference(q, k, v, fm)[0]
    assert not calls
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-6)


def test_without_native(calls, monkeypatch):
    """No compiler (the library known not to load): the chunked PyTorch path, nothing native."""
    monkeypatch.setattr(native, "_lib", False)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    with torch.no_grad():
        o, _ = reference.linear_attention_torch(q, k, v, builtin.ELU)
    o_grad, _ = reference.linear_attention_torch(q, k, v.requires_grad_(), builtin.ELU)
    assert not calls
    torch.testing.assert_close(o, o_grad.detach())


@needs_native
def test_eligibility():
    """CPU float32 plain tensors while the native code is on; a fused map only for the built-in elementwise maps;
    shapes that do not agree raise before the C runs."""
    x = torch.randn(2, 5, 3, 8)
    assert native.causal_eligible(x, x)
    assert not native.causal_eligible(x, x.half())
    assert native.fused_map(builtin.ELU) and not native.fused_map(lx.feature_maps.favor(8, 8, 0))
    with native_off():
        assert not native.causal_eligible(x)
    with pytest.raises(ValueError, match="do not agree"):
        native.causal_forward(x, x[:, :4], x, None)
    with pytest.raises(ValueError, match="S0"):
        native.causal_forward(x, x, x, torch.zeros(2, 3, 8, 8))


def _forked_forward(q, queue):
    with torch.no_grad():
        queue.put(float(lx.linear_attention(q, q, q, backend="torch").sum()))


@needs_native
@pytest.mark.parametrize("where", ["team", "pool"])
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork here")
def test_split_after_fork(monkeypatch, where):
    """A process forked after a split call (a DataLoader worker, say) runs its calls, split on a pool of its own:
    with the parent's pool, or on torch's OpenMP team (GNU OpenMP's team does not survive a fork: torch's own
    parallel ops hang there at more than one thread), whose threads it does not have, it would wait for ever."""
    import multiprocessing

    _split_on(monkeypatch, where)
    q = torch.randn(1, 64, 2, 8)
    with torch.no_grad():
        o = lx.linear_attention(q, q, q, backend="torch")  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_forward, args=(q, queue))
    child.start()
    child.join(timeout=20)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(float(o.sum()))


@needs_native
def test_waits_for_its_shares(monkeypatch):
    """Whatever leaves a call split on the pool (a KeyboardInterrupt in the caller's share, here) leaves it after the
    shares handed to the pool are done: they read and write the caller's tensors, which may be freed right
    after. (A split on the OpenMP team is one C call, which returns when every member is done.)"""
    import threading
    import time

    native._load()
    real, done = native._causal, []

    def share(arr, se):
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        time.sleep(0.3)
        done.append(real(arr, se))
        return 0

    monkeypatch.setattr(native, "_causal", share)
    _split_on(monkeypatch, "pool")
    q = torch.randn(1, 64, 2, 8)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        lx.linear_attention(q, q, q, backend="torch")
    assert done == [0]


@needs_native
def test_without_new_threads(monkeypatch):
    """A pool that takes no more work (the interpreter shutting down: submit raises) leaves every share to the
    calling thread, with the same result."""

    class Closed:
        def submit(self, *args):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    q = torch.randn(2, 64, 3, 8)
    with torch.no_grad():
        one = lx.linear_attention(q, q, q, backend="torch")
        monkeypatch.setattr(native, "_pool", lambda workers: Closed())
        _split_on(monkeypatch, "pool")
        assert torch.equal(lx.linear_attention(q, q, q, backend="torch"), one)


@needs_native
def test_scratch_failure_raises(monkeypatch):
    """causal.c's scratch not allocated (its return value 1, in one call or a split's): a MemoryError, not a
    silent garbage output."""
    q = torch.randn(1, 8, 2, 4)
    with monkeypatch.context() as m:
        m.setattr(native, "_causal", lambda arr, se: 1)
        with pytest.raises(MemoryError, match="scratch"), torch.no_grad():
            lx.linear_attention(q, q, q, backend="torch")
    for where in ("pool", "team"):
        with monkeypatch.context() as m:
            _split_on(m, where)
            m.setattr(native, "_causal", lambda arr, se: 1)
            m.setattr(native, "_causal_team", lambda arr, se, gomp, parts: 1)  # a member's failure, as the C says
            with pytest.raises(MemoryError, match="scratch"), torch.no_grad():
                lx.linear_attention(q, q, q, backend="torch")


@needs_native
def test_elu_forward_does_not_depend_on_autograd():
    """elu + 1 is exp(x) for x <= 0 on every path: queries of -20 (features of 2e-9, which F.elu(x) + 1 rounded to
    0 in fp32) give the same output from the C's map (no autograd) and from torch's (autograd)."""
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 16, 2, 8), -20.0)
    k, v = torch.randn(1, 16, 2, 8, generator=g), torch.randn(1, 16, 2, 8, generator=g)
    with torch.no_grad():
        o = lx.linear_attention(q, k, v, backend="torch", eps=1e-12)
    o_grad = lx.linear_attention(q.clone().requires_grad_(), k, v, backend="torch", eps=1e-12)
    assert o.abs().max() > 0.1
    torch.testing.assert_close(o, o_grad.detach(), rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("D", [16, 8], ids=["D16", "D8-padded"])
def test_nan_and_inf_propagate(D):
    """A NaN or inf in one token's query reaches that token's output (and a key's, every later token's) as in the
    PyTorch path: nothing in the C turns them into numbers; and an inf in a value stays an inf in its column, also
    where D is padded to 16 (0 * inf in a padded row of the state would be NaN)."""
    q, k, v = (torch.randn(1, 70, 1, D) for _ in range(3))
    q[0, 5, 0, 3] = float("nan")
    k[0, 66, 0, 0] = float("inf")
    with torch.no_grad():
        o = lx.linear_attention(q, k, v, backend="torch")
        v[0, 3, 0, 0] = float("inf")
        o_inf = lx.linear_attention(q[:, :66], k[:, :66], v[:, :66], backend="torch")
    assert o[0, 5].isnan().all() and not o[0, :5].isnan().any() and not o[0, 6:66].isnan().any()
    assert not o[0, 66:].isfinite().any()
    keep = torch.ones(66, dtype=torch.bool)
    keep[5] = False  # the NaN query's token
    col = o_inf[0, keep, 0, 0]
    assert col[3:].isinf().all() and (col[3:] > 0).all() and col[:3].isfinite().all()
    assert o_inf[0, keep, 0, 1:].isfinite().all()
