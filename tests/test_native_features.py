"""The CPU forward's feature maps in native C (lintx_triton/native/features.c, issue #17): phi written straight
into the chunked buffers, the same numbers as the PyTorch map (elu + 1 within 2 ulp of float64), used only
without autograd, and the forward's results within the package's bounds either way."""

import pytest
import torch

import lintx_triton as lx
from helpers import case_id, check_forward, check_state, make_inputs
from lintx_triton import native, reference
from lintx_triton.feature_maps import builtin

needs_native = pytest.mark.skipif(not native.available(), reason="no working C compiler here: the forward's "
                                  "features take the PyTorch path")


def _chunks_ref(x64: torch.Tensor, C: int, G: int, fm) -> torch.Tensor:
    """phi(x) in float64, in the chunked layout [N, B, H, C, W] (rows past T zero)."""
    B, T, HX, W = x64.shape
    N = -(-T // C)
    phi = fm.reference(x64).repeat_interleave(G, 2)  # [B, T, H, W]
    out = x64.new_zeros(B, N * C, HX * G, W)
    out[:, :T] = phi
    return out.view(B, N, C, HX * G, W).permute(1, 0, 3, 2, 4)


def _ulps(got: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """|got - ref| in units of the float32 spacing at ref (the smallest normal spacing below 2^-126)."""
    r = ref64.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
    spacing = (torch.nextafter(r, torch.tensor(float("inf"))) - r).double()
    return (got.double() - ref64).abs() / spacing


@needs_native
@pytest.mark.parametrize("split", [False, True], ids=["one-call", "threads"])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("fm", [builtin.ELU, builtin.RELU, builtin.IDENTITY], ids=lambda f: f.name)
@pytest.mark.parametrize("T,C", [(64, 16), (37, 16), (1, 16), (50, 64)], ids=lambda v: str(v))
def test_features_into_chunks(monkeypatch, fm, G, T, C, split):
    """phi(x) lands in each chunk's rows (relu and identity exact, elu + 1 within 2 ulp of float64), the rows of a
    ragged last chunk past T are zero, a buffer's extra row per chunk (the keys' chunks carry one) is untouched,
    x may be strided (a slice of wider heads), and splitting the chunks between threads gives the same bits."""
    if split:
        monkeypatch.setattr(native, "_SPLIT_MIN", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    gen = torch.Generator().manual_seed(T + G)
    B, HX, W = 2, 2, 24
    wide = torch.randn(B, T, HX, W + 8, generator=gen) * 4
    wide[0, 0, 0, 3:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -200.0, -20.0])
    x = wide[..., 3:W + 3]  # strides (T HX (W + 8), HX (W + 8), W + 8, 1)
    assert x.isnan().any() and x.isinf().any()
    N = -(-T // C)
    out = torch.full((N, B, HX * G, C + 1, W), 7.0)
    assert native.features_eligible(fm, x)
    native.features_into(x, out, C, fm, G)
    ref = _chunks_ref(x.double(), C, G, fm)
    got = out[..., :C, :]
    assert torch.equal(out[..., C, :], torch.full_like(out[..., C, :], 7.0))  # the extra row: untouched
    nan, fin = ref.isnan(), ref.isfinite()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~fin & ~nan].double(), ref[~fin & ~nan])  # inf stays inf
    if fm is builtin.ELU:
        assert _ulps(got[fin], ref[fin]).max() <= 2
    else:
        assert torch.equal(got[fin].double(), ref[fin])
    if T % C:
        assert not got[-1, :, :, T % C:].any()  # a ragged chunk's rows past T: zero
    if split:  # the same bits as one call
        one = torch.full_like(out, 7.0)
        monkeypatch.undo()
        native.features_into(x, one, C, fm, G)
        assert torch.equal(one.view(torch.int32), out.view(torch.int32))


@needs_native
def test_features_eligible():
    """Only the built-in elementwise maps on CPU float32 with a unit inner stride, while the native code is on."""
    x = torch.randn(2, 5, 3, 8)
    assert native.features_eligible(builtin.ELU, x, x)
    assert not native.features_eligible(builtin.ELU, x, x.half())
    assert not native.features_eligible(builtin.ELU, x, x.transpose(2, 3))
    assert not native.features_eligible(lx.feature_maps.favor(8, 8, 0), x)
    native.set_enabled(False)
    try:
        assert not native.features_eligible(builtin.ELU, x)
    finally:
        native.set_enabled(True)
    with pytest.raises(ValueError, match="chunked layout"):
        native.features_into(x, torch.empty(1, 2, 3, 4, 8), 4, builtin.ELU)


@pytest.fixture
def calls(monkeypatch):
    """features_into's calls, counted."""
    seen = []
    real = native.features_into

    def counted(*args, **kw):
        seen.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(native, "features_into", counted)
    return seen


@needs_native
@pytest.mark.parametrize("fm", ["elu", "relu"])
@pytest.mark.parametrize("shape", [(2, 37, 4, 2, 16, 16), (1, 64, 2, 2, 8, 24)],
                         ids=lambda s: "B{}-T{}-H{}-HKV{}-D{}-DV{}".format(*s))
def test_forward_uses_it_without_autograd(calls, shape, fm):
    """The torch path's causal forward without autograd writes phi(q), phi(k) with features_into and meets the
    float64 reference's bounds (outputs and the final state from an initial state, grouped heads); with a q that
    requires grad it does not call it, and gives the same output within the bound."""
    B, T, H, HKV, D, DV = shape
    c = dict(B=B, T=T, H=H, HKV=HKV, D=D, DV=DV, dtype="float32", feature_map=fm, causal=True, normalize=True,
             initial_state=True, scale=0.5, eps=1e-3, seed=1)
    q, k, v, state = make_inputs(c)
    kw = dict(feature_map=fm, scale=0.5, eps=1e-3, backend="torch", initial_state=state)
    with torch.no_grad():
        o, st = lx.linear_attention(q, k, v, return_state=True, **kw)
    assert len(calls) == 2, case_id(c)
    check_forward(c, o, q, k, v, state)
    check_state(c, st, q, k, v, state)
    o_grad = lx.linear_attention(q.clone().requires_grad_(), k, v, **kw)
    assert len(calls) == 2 and o_grad.requires_grad
    check_forward(c, o_grad.detach(), q, k, v, state)
    if fm == "relu":  # the same features bit for bit: the same products
        assert torch.equal(o, o_grad.detach())


@needs_native
def test_forward_off_switch(calls):
    """native.set_enabled(False): the forward's features take the PyTorch path (and the same output for relu)."""
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    with torch.no_grad():
        o = lx.linear_attention(q, k, v, feature_map="relu", backend="torch")
        native.set_enabled(False)
        try:
            o_off = lx.linear_attention(q, k, v, feature_map="relu", backend="torch")
        finally:
            native.set_enabled(True)
    assert len(calls) == 2
    assert torch.equal(o, o_off)


def test_forward_without_native(calls, monkeypatch):
    """No compiler (the library known not to load): the forward runs its PyTorch features, nothing native."""
    monkeypatch.setattr(native, "_lib", False)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    with torch.no_grad():
        o, _ = reference.linear_attention_torch(q, k, v, builtin.ELU)
    assert not calls
    torch.testing.assert_close(o, reference.linear_attention_torch(q, k, v.requires_grad_(), builtin.ELU)[0].detach())


def _forked_forward(x, out, queue):
    native.features_into(x, out, 16, builtin.ELU)
    queue.put(float(out.sum()))


@needs_native
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork here")
def test_features_after_fork(monkeypatch):
    """A process forked after the thread pool started (a DataLoader worker, say) splits its calls on a pool of its
    own: with the parent's, whose threads it does not have, it would wait for ever."""
    import multiprocessing

    monkeypatch.setattr(native, "_SPLIT_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(1, 64, 2, 8)
    out = torch.empty(4, 1, 2, 16, 8)
    native.features_into(x, out, 16, builtin.ELU)  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_forward, args=(x, torch.empty_like(out), queue))
    child.start()
    child.join(timeout=20)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(float(out.sum()))


@needs_native
def test_tracers_get_the_torch_path(calls):
    """Under FakeTensorMode (a FakeTensor's data_ptr is 0: the C would write through NULL) and make_fx (its graph
    must record the map) the forward takes the torch path; make_fx's graph then replays new inputs as eager does."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        return lx.linear_attention(q, k, v, backend="torch")

    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    with torch.no_grad():
        with FakeTensorMode() as mode:
            assert f(*(mode.from_tensor(t) for t in (q, k, v))).shape == q.shape
        graph = make_fx(f)(q, k, v)
        assert not calls
        x2 = [torch.randn(1, 20, 2, 8) - 1 for _ in range(3)]
        torch.testing.assert_close(graph(*x2), f(*x2), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # the eager call


@needs_native
def test_features_into_waits_for_its_shares(monkeypatch):
    """Whatever leaves features_into (a KeyboardInterrupt in the caller's share, here) leaves it after the shares
    handed to the pool are done: they read and write the caller's tensors, which may be freed right after."""
    import threading
    import time

    real, done = native._features, []

    def share(arr):
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        time.sleep(0.3)
        real(arr)
        done.append(True)

    native._load()
    monkeypatch.setattr(native, "_features", share)
    monkeypatch.setattr(native, "_SPLIT_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x, out = torch.randn(1, 64, 2, 8), torch.empty(4, 1, 2, 16, 8)
    with pytest.raises(KeyboardInterrupt):
        native.features_into(x, out, 16, builtin.ELU)
    assert done == [True]


@needs_native
def test_features_into_without_new_threads(monkeypatch):
    """A pool that takes no more work (the interpreter shutting down: submit raises) leaves every share to the
    calling thread, with the same result."""

    class Closed:
        def submit(self, *args):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    x = torch.randn(2, 64, 2, 8)
    one = torch.empty(4, 2, 2, 16, 8)
    native.features_into(x, one, 16, builtin.ELU)
    monkeypatch.setattr(native, "_pool", lambda workers: Closed())
    monkeypatch.setattr(native, "_SPLIT_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    split = torch.full_like(one, float("nan"))
    native.features_into(x, split, 16, builtin.ELU)
    assert torch.equal(split, one)


@needs_native
def test_elu_forward_does_not_depend_on_autograd():
    """elu + 1 is exp(x) for x <= 0 on every path: queries of -20 (features of 2e-9, which F.elu(x) + 1 rounded to
    0 in fp32) give the same output from the native map (no autograd) and from torch's (autograd)."""
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 16, 2, 8), -20.0)
    k, v = torch.randn(1, 16, 2, 8, generator=g), torch.randn(1, 16, 2, 8, generator=g)
    with torch.no_grad():
        o = lx.linear_attention(q, k, v, backend="torch", eps=1e-12)
    o_grad = lx.linear_attention(q.clone().requires_grad_(), k, v, backend="torch", eps=1e-12)
    assert o.abs().max() > 0.1
    torch.testing.assert_close(o, o_grad.detach(), rtol=1e-4, atol=1e-5)
