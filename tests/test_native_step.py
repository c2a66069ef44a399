"""The native CPU decode step (lintx_triton/native, issue #17): the same numbers as the torch step within the
package's bounds, used when eligible, off when asked, never where autograd or an unsupported map needs torch."""

import warnings

import pytest
import torch

import lintx_triton as lx
from helpers import attr_runner, build_variant, case_id, check_forward, check_state, cpu_isas, decode_steps, \
    freed_in_default_device_new_empty, make_inputs, native_off
from lintx_triton import api, native
from lintx_triton.codegen.cache import cache_dir

needs_native = pytest.mark.skipif(not native.available(), reason="no working C compiler here: the native step "
                                  "cannot be built, decode steps take the torch path")

# (B, H, HKV, D, DV): the benchmark's shape (small), grouped heads with odd widths, B = 3, and groups of more than
# the 4 query heads step.c sums in one sweep over the state (G = 5: a second sweep of 1; G = 9: 4 + 4 + 1)
SHAPES = [(1, 2, 2, 64, 64), (3, 4, 2, 33, 17), (1, 4, 2, 33, 17), (3, 1, 1, 16, 40), (2, 10, 2, 8, 20),
          (1, 9, 1, 16, 24)]


class _Count:
    """len(): the native steps run since it was made: the C runner's counter (lintx_runner.calls()), plus the
    calls of the C function wrapped here for the Python runner."""

    def __init__(self, ext):
        self.ext, self.python = ext, []
        self.start = ext.calls() if ext is not None else 0

    def __len__(self):
        return len(self.python) + (self.ext.calls() - self.start if self.ext is not None else 0)


def _spy(monkeypatch, python_runner: bool):
    monkeypatch.setattr(api, "_STEP_KEYS", {})  # the api's plans forgotten (and restored)
    ext = None if python_runner else native._ext()
    count = _Count(ext)
    if ext is None:  # the Python runner, its C function wrapped
        fn = native._load()

        def counted(*args):
            count.python.append(args[0][:6])
            return fn(*args)

        monkeypatch.setattr(native, "_load", lambda: counted if fn is not None else None)
    return count


@pytest.fixture
def spy(monkeypatch):
    """The native steps run, counted, on the runner a step uses here (runner.c's when it builds)."""
    return _spy(monkeypatch, False)


@pytest.fixture
def attr_spy(monkeypatch):
    """The same on runner.c built without meta.cpp (the tensors read through their Python attributes: where no
    C++ compiler or torch headers are)."""
    mod = attr_runner()
    if mod is None:
        pytest.skip("runner.c cannot be built here")
    monkeypatch.setattr(native, "_EXT", mod)
    monkeypatch.setattr(api, "_STEP_KEYS", {})
    return _Count(mod)


@pytest.fixture
def py_spy(monkeypatch):
    """The same on the Python runner (native._runner: where runner.c cannot be built)."""
    return _spy(monkeypatch, True)


def _steps(c, q, k, v, state, inplace):
    """decode_steps with each token's q, k, v contiguous (a slice x[:, t] is not at B > 1: the torch path)."""
    q, k, v = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))  # [B, T, ...], x[:, t] dense
    return decode_steps(c, q, k, v, state, "torch", inplace)


def _case(shape, fm, normalize, scale=0.5, eps=1e-3, initial_state=True, seed=0):
    B, H, HKV, D, DV = shape
    c = dict(B=B, T=5, H=H, HKV=HKV, D=D, DV=DV, dtype="float32", feature_map=fm, causal=True, normalize=normalize,
             initial_state=initial_state, scale=scale, eps=eps, seed=seed)
    if normalize and fm == "identity":  # a signed map: keep every term of the normalizer positive
        c["inputs"] = "positive_den"
    return c


@needs_native
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "functional"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("fm", sorted(native.MAPS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-HKV{}-D{}-DV{}".format(*s))
def test_native_matches_reference_and_torch(spy, shape, fm, normalize, inplace):
    """Five steps in a row through the native step meet the float64 reference's bounds (outputs and the state),
    and agree with the torch step's (run with the native step off) to the same bound."""
    c = _case(shape, fm, normalize, initial_state=shape[0] != 1)
    q, k, v, state = make_inputs(c)
    with torch.no_grad():
        o, st = _steps(c, q, k, v, state, inplace)
        # a functional loop from no state: its first step on torch (it allocates the state)
        used = 5 if inplace or state is not None else 4
        assert len(spy) == used, case_id(c)
        check_forward(c, o, q, k, v, state)
        check_state(c, st, q, k, v, state)
        with native_off():
            o_t, st_t = _steps(c, q, k, v, state, inplace)
    assert len(spy) == used  # the torch step's run did not call it
    # both within the reference's bound; each other's within the bound's scale (err_native + err_torch)
    check_forward(c, o_t, q, k, v, state, name="torch step o")
    torch.testing.assert_close(o, o_t, rtol=1e-5, atol=1e-5)
    for a, b in zip(st, st_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@needs_native
@pytest.mark.parametrize("runner", ["attr_spy", "py_spy"], ids=["c_runner_attrs", "python_runner"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "functional"])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "B{}-H{}-HKV{}-D{}-DV{}".format(*s))
def test_other_runners_match_reference(request, runner, shape, inplace):
    """runner.c without meta.cpp and the Python runner (where meta.cpp, or runner.c, cannot be built) run the same
    steps to the same bounds."""
    test_native_matches_reference_and_torch(request.getfixturevalue(runner), shape, "elu", True, inplace)


@needs_native
@pytest.mark.parametrize("runner", ["spy", "attr_spy", "py_spy"], ids=["c_runner", "c_runner_attrs", "python_runner"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "functional"])
@pytest.mark.parametrize("fm, normalize, threads", [("elu", True, 2), ("relu", False, 3)],
                         ids=["elu-norm-2threads", "relu-raw-3threads"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=lambda s: "B{}-H{}-HKV{}-D{}-DV{}".format(*s))
def test_split_between_threads_gives_the_same_bits(request, monkeypatch, runner, threads, inplace, fm, normalize,
                                                   shape):
    """A step whose kv heads split between torch's threads (step.c's lintx_step_f32_team: from 2^18 state elements;
    here from any) writes the same bits as on one thread, in ranges that cut batch rows and head groups (G = 5)."""
    if not native._openmp_parallel():
        pytest.skip("torch's parallel backend is not OpenMP here: steps run on one thread")
    count = request.getfixturevalue(runner)
    c = _case(shape, fm, normalize)
    q, k, v, state = make_inputs(c)
    ext = native._EXT if runner != "py_spy" else None
    split0 = ext.split_calls()[0] if ext else 0
    with torch.no_grad():
        o1, st1 = _steps(c, q, k, v, state, inplace)  # below the size: on one thread
    assert len(count) == 5, case_id(c)
    assert (ext.split_calls()[0] if ext else 0) == split0
    teams = []
    if ext is None:  # the Python runner's team, counted
        team = native._step_team

        def counted(*args):
            teams.append(args[4].value)
            return team(*args)

        monkeypatch.setattr(native, "_step_team", counted)
    monkeypatch.setattr(native, "_STEP_SPLIT_MIN", 0)
    monkeypatch.setattr(api, "_STEP_KEYS", {})  # planned again, with the team
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            o2, st2 = _steps(c, q, k, v, state, inplace)
    finally:
        torch.set_num_threads(old)
    parts = min(threads, shape[0] * shape[2])
    if ext:
        assert ext.split_calls() == (split0 + 5, parts)
    else:
        assert teams == [parts] * 5
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(st1, st2))


def _forked_module_step(layer, x, state, queue):
    with torch.no_grad():
        queue.put(layer.step(x, state)[0].tolist())


@needs_native
@pytest.mark.parametrize("runner", ["spy", "py_spy"], ids=["c_runner", "python_runner"])
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork here")
def test_split_step_after_fork(request, monkeypatch, runner):
    """A process forked after steps and projections split between threads (a DataLoader or server worker) runs its
    own unsplit at the parent's thread count, to the same bits: GNU OpenMP's team does not survive a fork, and a
    split there would wait for its threads for ever."""
    import multiprocessing
    import queue as queue_module

    if not native._openmp_parallel():
        pytest.skip("torch's parallel backend is not OpenMP here: steps run on one thread")
    count, teams = request.getfixturevalue(runner), []
    if runner == "py_spy":  # the Python runner's team, counted
        team = native._step_team
        monkeypatch.setattr(native, "_step_team", lambda *args: teams.append(args[4].value) or team(*args))
    torch.manual_seed(0)
    layer = lx.nn.LinearAttention(512, 8, backend="torch")  # B = 16: 2^19 state elements, 4M multiply-adds each
    x = torch.randn(16, 512)
    state = tuple(torch.rand_like(t) for t in layer.init_state(16))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ext = native._ext()
        splits0 = (ext.split_calls()[0], ext.linear_calls()[1])
        with torch.no_grad():
            y = layer.step(x, state)[0]
        # split in the parent: the step and the four projections
        assert (ext.split_calls()[0], ext.linear_calls()[1]) == (splits0[0] + (runner == "spy"), splits0[1] + 4)
        assert len(count) == (runner == "spy") and teams == ([] if runner == "spy" else [2])
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_forked_module_step, args=(layer, x, state, queue))
        child.start()
        try:  # read before joining: the child's put waits for the pipe to be read
            got = queue.get(timeout=60)
        except queue_module.Empty:
            got = None
        child.join(timeout=10)
        hung = child.is_alive()
        if hung:
            child.kill()
    finally:
        torch.set_num_threads(old)
    assert got is not None and not hung and child.exitcode == 0
    assert torch.equal(torch.tensor(got), y)


@needs_native
@pytest.mark.parametrize("scale, eps", [(1.0, 1e-6), (0.125, 0.5), (2.0, 0.0)])
def test_native_scale_eps(spy, scale, eps):
    c = _case((2, 4, 1, 8, 24), "elu", True, scale=scale, eps=eps, seed=3)
    q, k, v, state = make_inputs(c)
    with torch.inference_mode():
        o, st = _steps(c, q, k, v, state, inplace=True)
    assert len(spy) == 5
    check_forward(c, o, q, k, v, state)
    check_state(c, st, q, k, v, state)


@needs_native
def test_native_elu_exp_within_2_ulp():
    """step.c's vectorized exp: phi(k) of elu read back from z (a zero state plus phi(k), exact) against float64
    exp over [-104, 0] and the special values; x + 1 above 0."""
    grid = torch.cat([torch.linspace(-104.0, 0.0, 200_003), -torch.logspace(-30, 2, 2001),
                      torch.tensor([0.0, -0.0, 1e-30, 3.5, 1e30, -87.5, -88.7, -103.9, -float("inf"), float("inf")])])
    D = grid.numel()
    k = grid.view(1, 1, D)
    S, z = torch.zeros(1, 1, D, 1), torch.zeros(1, 1, D)
    with torch.no_grad():
        lx.linear_attention_step_(torch.zeros(1, 1, D), k, torch.ones(1, 1, 1), (S, z), backend="torch")
    want = torch.where(grid > 0, grid.double() + 1, grid.double().exp()).float()  # correctly rounded
    got = z[0, 0]
    # ulps between the fp32 values (both non-negative; subnormals included)
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert ulps.max().item() <= 2, grid[ulps.argmax()].item()
    S3, z3 = torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 3)
    with torch.no_grad():
        lx.linear_attention_step_(torch.zeros(1, 1, 3), torch.full((1, 1, 3), float("nan")), torch.ones(1, 1, 1),
                                  (S3, z3), backend="torch")
    assert z3.isnan().all()  # NaN stays NaN, as in torch's elu


@needs_native
def test_used_only_when_eligible(spy):
    """The native step runs for CPU float32 contiguous steps of its maps with nothing to record for autograd; a
    step that requires grad, a non-contiguous q, another dtype or map, or TRITON's backend take the other paths."""
    q, k, v = (torch.randn(2, 3, 8) for _ in range(3))
    S, z = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8)
    lx.linear_attention_step_(q, k, v, (S, z), backend="torch")
    assert len(spy) == 1
    # autograd: q requires grad, grad mode on -> the torch path, differentiable
    qg = q.clone().requires_grad_()
    o = lx.linear_attention_step_(qg, k, v, (S, z), backend="torch")
    assert len(spy) == 1 and o.requires_grad
    o.sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    with torch.no_grad():  # the same call with nothing to record: native
        lx.linear_attention_step_(qg, k, v, (S, z), backend="torch")
    assert len(spy) == 2
    # functional step from a state that requires grad: the torch path, and its output carries the graph
    S1, z1 = S.clone().requires_grad_(), z.clone()
    o, (S2, _) = lx.linear_attention_step(q, k, v, (S1, z1), backend="torch")
    assert len(spy) == 2 and o.requires_grad and S2.requires_grad
    # a non-contiguous q of the same shape (same api key): the torch path, same numbers
    qt = torch.randn(2, 8, 3).transpose(1, 2)
    S3, z3, S4, z4 = S.clone(), z.clone(), S.clone(), z.clone()
    with torch.no_grad():
        o_nc = lx.linear_attention_step_(qt, k, v, (S3, z3), backend="torch")
        assert len(spy) == 2
        o_c = lx.linear_attention_step_(qt.contiguous(), k, v, (S4, z4), backend="torch")
        assert len(spy) == 3
    torch.testing.assert_close(o_nc, o_c, rtol=1e-5, atol=1e-6)
    # another dtype (float16 inputs), a map step.c does not have
    with torch.no_grad():
        lx.linear_attention_step_(q.half(), k.half(), v.half(), (S, z), backend="torch")
        fav = lx.feature_maps.favor(8, 8, 0)
        Sf, zf = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8)
        lx.linear_attention_step_(q, k, v, (Sf, zf), feature_map=fav, backend="torch")
    assert len(spy) == 3


class _Sub(torch.Tensor):
    pass


@needs_native
@pytest.mark.parametrize("runner", ["spy", "attr_spy", "py_spy"],
                         ids=["c_runner", "c_runner_attrs", "python_runner"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "functional"])
def test_repeated_step_skips_the_key_until_anything_changes(request, monkeypatch, inplace, runner):
    """A step repeating the last native step's arguments runs it without building the key (api._fast_step); a
    step that differs in any one thing the key holds (B, q's heads, a tensor's type or dtype, a negated view, the state's container, a functional
    state's contiguity, eps, scale's type, the map) goes through the key again and gives the torch path's
    numbers, whether it runs natively or not; on both runners (runner.c's and the Python one)."""
    spy = request.getfixturevalue(runner)
    keys = []
    real_key = api._step_key
    monkeypatch.setattr(api, "_step_key", lambda *a: (keys.append(1), real_key(*a))[1])
    fn = lx.linear_attention_step_ if inplace else lx.linear_attention_step
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, generator=gen) for _ in range(3))
    S, z = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, generator=gen) + 1

    def run(q, k, v, state, **kw):
        state = type(state)(t.clone() for t in state)
        out = fn(q, k, v, state, backend="torch", **kw)
        return (out, state) if inplace else out

    with torch.no_grad():
        for i in range(3):
            run(q, k, v, (S, z))
            assert len(keys) == 1 and len(spy) == i + 1
        calls = dict(
            B1=((q[:1], k[:1], v[:1], (S[:1], z[:1])), {}, True),
            q_heads=((torch.randn(2, 6, 8, generator=gen), k, v, (S, z)), {}, True),  # two query heads a kv head
            subclass=((q.as_subclass(_Sub), k, v, (S, z)), {}, False),
            neg_view=((torch._neg_view(-q), k, v, (S, z)), {}, False),  # q's values, its memory -q
            half=((q.half(), k.half(), v.half(), (S, z)), {}, False),
            list_state=((q, k, v, [S, z]), {}, True),
            eps=((q, k, v, (S, z)), dict(eps=0.25), True),
            scale_int=((q, k, v, (S, z)), dict(scale=2), True),
            relu=((q, k, v, (S, z)), dict(feature_map="relu"), True),
        )
        if not inplace:  # in place, a non-contiguous state is an error (test_decode)
            calls["strided_S"] = ((q, k, v, (S.transpose(-1, -2).contiguous().transpose(-1, -2), z)), {}, False)
        for name, (args, kw, native_runs) in calls.items():
            run(q, k, v, (S, z))  # the first arguments' step is the last one again
            n_keys, n_native = len(keys), len(spy)
            run(q, k, v, (S, z))
            assert (len(keys), len(spy)) == (n_keys, n_native + 1), name  # the fast path
            n_native += 1
            got = run(*args, **kw)
            assert len(keys) == n_keys + 1, name
            assert len(spy) == n_native + native_runs, name
            with native_off():
                want = run(*(a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args), **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@needs_native
def test_auto_step_follows_triton_interpret(spy, monkeypatch):
    """backend="auto" decode steps read TRITON_INTERPRET at each call (config.interpreting reads os.environ's own
    mapping) and a change is a new plan: the interpreter's Triton step while it is 1, the native step once it is
    set to 0, the interpreter again when it is back to 1, each giving the same numbers."""
    q, k, v = (torch.randn(1, 2, 8) for _ in range(3))
    states = [(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)) for _ in range(3)]
    outs = []
    with torch.no_grad():
        for flag, calls in (("1", 0), ("0", 1), ("1", 1)):
            monkeypatch.setenv("TRITON_INTERPRET", flag)
            outs.append(lx.linear_attention_step_(q, k, v, states[len(outs)]))
            assert len(spy) == calls, flag
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


@needs_native
def test_tracers_get_the_torch_step(spy):
    """A planned key (an eager native step first) does not hand the native step to a tracer: under make_fx (real
    tensors, the same key) the graph records the torch step and replays as eager; under FakeTensorMode (a
    FakeTensor's data_ptr is 0) the step runs on fake tensors without touching memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k, v, S, z):
        return lx.linear_attention_step_(q, k, v, (S, z), backend="torch")

    q, k, v = (torch.randn(1, 2, 8) for _ in range(3))
    S, z = torch.rand(1, 2, 8, 8), torch.rand(1, 2, 8) + 1
    with torch.no_grad():
        step(q, k, v, S.clone(), z.clone())
        assert len(spy) == 1
        graph = make_fx(step)(q, k, v, S.clone(), z.clone())
        with FakeTensorMode() as mode:
            assert step(*(mode.from_tensor(t) for t in (q, k, v, S, z))).shape == (1, 2, 8)
        assert len(spy) == 1
        S1, z1, S2, z2 = S.clone(), z.clone(), S.clone(), z.clone()
        torch.testing.assert_close(graph(q, k, v, S1, z1), step(q, k, v, S2, z2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(S1, S2, rtol=1e-6, atol=1e-6)


@needs_native
def test_off_switch(spy):
    """native.set_enabled(False) sends the next steps (already planned keys included) to the torch path."""
    q, k, v = (torch.randn(1, 2, 8) for _ in range(3))
    S, z = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)
    with torch.no_grad():
        lx.linear_attention_step_(q, k, v, (S, z), backend="torch")
        assert len(spy) == 1 and native.enabled()
        with native_off():
            assert not native.enabled()
            for _ in range(3):
                lx.linear_attention_step_(q, k, v, (S, z), backend="torch")
                lx.linear_attention_step(q, k, v, (S, z), backend="torch")
            assert len(spy) == 1
        lx.linear_attention_step_(q, k, v, (S, z), backend="torch")
    assert len(spy) == 2


@needs_native
def test_module_step_uses_it(spy):
    """LinearAttention.step (in place and functional) runs the native step under no_grad and matches the module
    with it off; with grad (training-style) it takes the torch path."""
    torch.manual_seed(0)
    attn = lx.nn.LinearAttention(16, 4, num_kv_heads=2, backend="torch")
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        state = attn.init_state(3)
        ys = [attn.step(x[:, t], state, inplace=True)[0] for t in range(4)]
        assert len(spy) == 4
        st = None
        y, st = attn.step(x[:, 0], st)  # state None: torch; then native
        y, st = attn.step(x[:, 1], st)
        assert len(spy) == 5
        with native_off():
            state_t = attn.init_state(3)
            ys_t = [attn.step(x[:, t], state_t, inplace=True)[0] for t in range(4)]
    assert len(spy) == 5
    torch.testing.assert_close(torch.stack(ys), torch.stack(ys_t), rtol=1e-5, atol=1e-6)
    for a, b in zip(state, state_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    y, _ = attn.step(x[:, 0], attn.init_state(3))  # parameters require grad: the projections' q, k, v do too
    assert len(spy) == 5 and y.requires_grad


def test_no_compiler_means_torch_path(monkeypatch):
    """No C compiler: available() is False, quietly (no warning), and a decode step still runs (the torch path)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(api, "_STEP_KEYS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()
        q = torch.randn(1, 2, 8)
        S, z = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)
        o = lx.linear_attention_step_(q, q, q, (S, z), backend="torch")
    assert o.shape == (1, 2, 8) and z.sum() > 0


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")
def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A source that does not compile: one RuntimeWarning, available() False from then on, steps on torch; the
    half-written output never lands where a later process would load it."""
    bad = tmp_path / "step.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_SOURCES", (bad,))
    monkeypatch.setenv("LINTX_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "_STEP_KEYS", {})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second warning, no second build
        assert not native.available()
        q = torch.randn(1, 2, 8)
        lx.linear_attention_step_(q, q, q, (torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)), backend="torch")
    assert not any(p.suffix == ".so" and not p.name.endswith(".tmp.so") for p in (tmp_path / "cache").rglob("*"))
    assert not list((tmp_path / "cache").rglob("*.tmp.so"))  # the temporary file is removed


@needs_native
@pytest.mark.parametrize("why", ["no_headers", "failed_build"])
def test_runner_falls_back_to_python(monkeypatch, tmp_path, why):
    """runner.c not built (no Python.h: quietly; a compile error: one RuntimeWarning): the decode steps run the
    Python runner, natively and with the same numbers."""
    import sysconfig

    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(api, "_STEP_KEYS", {})
    monkeypatch.setenv("LINTX_TRITON_CACHE_DIR", str(tmp_path / "cache"))  # the library stays loaded
    if why == "no_headers":
        paths = sysconfig.get_paths()
        monkeypatch.setattr(sysconfig, "get_paths", lambda: dict(paths, include=str(tmp_path)))
    else:
        bad = tmp_path / "runner.c"
        bad.write_text("this is not C\n")
        monkeypatch.setattr(native, "_RUNNER_SOURCE", bad)
    q, k, v = (torch.randn(1, 2, 8) for _ in range(3))
    states = [(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [lx.linear_attention_step_(q, k, v, states[0], backend="torch") for _ in range(3)]
    runner_warnings = [w for w in caught if w.category is RuntimeWarning and "runner.c" in str(w.message)]
    assert len(runner_warnings) == (0 if why == "no_headers" else 1)
    assert native._EXT is False and api._STEP_FAST[1][6].__module__ == native.__name__  # the Python runner
    with native_off(), torch.no_grad():
        want = [lx.linear_attention_step_(q, k, v, states[1], backend="torch") for _ in range(3)]
    torch.testing.assert_close(outs, want, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("runner", ["spy", "attr_spy", "py_spy"],
                         ids=["c_runner", "c_runner_attrs", "python_runner"])
def test_runners_refuse_tensors_without_their_memory(request, runner):
    """A runner returns None (the api then checks again and takes the PyTorch path) for a sparse or mkldnn q, a
    ZeroTensor, a functional tensor's wrapper, a state whose storage was resized to 0 (as FSDP frees one), and a
    state that normalize's __bool__ shrinks (the scalars are read before the tensors): it never touches memory a
    tensor does not have. A gc callback or torch.set_default_device's mode that frees the state during a call
    finds it outside the runner's reads (run under AddressSanitizer by test_native_sanitized)."""
    import gc

    spy = request.getfixturevalue(runner)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, generator=gen) for _ in range(3))

    def state():
        return torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8)

    run = native.plan(q, k, v, *state(), lx.feature_maps.resolve("elu"), True, tuple)
    with torch.no_grad():
        assert run(q, k, v, state(), True, 1.0, 1e-6) is not None and len(spy) == 1
        S, z = state()
        S.untyped_storage().resize_(0)
        cases = [(q.to_sparse(), state()), (torch._efficientzerotensor(2, 3, 8), state()), (q, (S, z)),
                 (torch._to_functional_tensor(q), state())]
        if torch.backends.mkldnn.is_available():
            cases.append((q.to_mkldnn(), state()))
        for qq, st in cases:
            assert run(qq, k, v, st, True, 1.0, 1e-6) is None
        S, z = state()

        class Shrinks:
            def __bool__(self):
                S.untyped_storage().resize_(0)
                return True

        assert run(q, k, v, (S, z), Shrinks(), 1.0, 1e-6) is None and len(spy) == 1
        # torch.set_default_device's mode: its __torch_function__ (Python) stays out of the window (o's allocation)
        S, z = state()
        with freed_in_default_device_new_empty(S) as fired:
            o = run(q, k, v, (S, z), True, 1.0, 1e-6)
        assert not fired and o is not None
        # the state freed at the n-th collection of a call, for each n: one falls between the reads and the
        # call unless gc is off there (AddressSanitizer sees the write into freed memory)
        threshold = gc.get_threshold()
        for target in range(1, 40):
            S, z = state()
            seen = [0]

            def free(phase, info):
                if phase == "start":
                    seen[0] += 1
                    if seen[0] == target:
                        S.set_(torch.empty(0))

            gc.callbacks.append(free)
            gc.set_threshold(1)
            try:
                run(q, k, v, (S, z), True, 1.0, 1e-6)
            finally:
                gc.set_threshold(*threshold)
                gc.callbacks.remove(free)


@needs_native
@pytest.mark.parametrize("why", ["no_cxx", "failed_build", "disagrees"])
def test_runner_reads_attributes_without_meta(monkeypatch, tmp_path, why):
    """meta.cpp not built (no C++ compiler, a compile error) or reading a tensor otherwise than its Python
    attributes do: runner.c reads the attributes (logged, no warning), and the steps stay native, same numbers."""
    monkeypatch.setattr(native, "_EXT", None)
    monkeypatch.setattr(api, "_STEP_KEYS", {})
    monkeypatch.setenv("LINTX_TRITON_CACHE_DIR", str(tmp_path / "cache"))  # the library stays loaded
    if why == "no_cxx":
        monkeypatch.setattr(native, "_cxx_compiler", lambda: None)
    elif why == "failed_build":
        bad = tmp_path / "meta.cpp"
        bad.write_text("this is not C++\n")
        monkeypatch.setattr(native, "_META_SOURCE", bad)
    else:
        monkeypatch.setattr(native, "_props", lambda t: ((), (), 0, 0, 0, 0))
    q, k, v = (torch.randn(1, 2, 8) for _ in range(3))
    states = [(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [lx.linear_attention_step_(q, k, v, states[0], backend="torch") for _ in range(3)]
    assert not [w for w in caught if w.category is RuntimeWarning]
    assert native._EXT and native._EXT.FROM_IMPL == 0 and native._EXT.calls() == 3
    # a failed build is remembered beside its name: the next process goes straight to the attribute build
    assert len(list((tmp_path / "cache").rglob("native_runner_*.failed"))) == (why == "failed_build")
    with native_off(), torch.no_grad():
        want = [lx.linear_attention_step_(q, k, v, states[1], backend="torch") for _ in range(3)]
    torch.testing.assert_close(outs, want, rtol=1e-5, atol=1e-6)


@needs_native
def test_runner_props_are_the_attributes():
    """What both builds of runner.c read of a tensor (meta.cpp from its TensorImpl, or its Python attributes)
    equals its attributes, on views, strides, dtypes, negated views, parameters, 0-d, 5-d and empty tensors."""
    mods = [m for m in (native._ext(), attr_runner()) if m is not None]
    if not mods:
        pytest.skip("runner.c cannot be built here")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, 6, generator=gen)
    ts = native._props_samples() + [
        base[:, ::2, 1:], base.permute(3, 1, 0, 2), base[..., :1], base[0, 0, 0], base.half(), base.to(torch.bfloat16),
        base[0, :, 0].contiguous().t(), base[0, :, :, 1].t(), torch.nn.Parameter(base.clone()),
        torch._neg_view(base[0]), base.expand(2, -1, -1, -1, -1)[1], torch.empty(5, 0, 2).transpose(0, 2),
        torch.complex(base, base), base.to("meta")]
    for mod in mods:
        for t in ts:
            assert mod.props(t) == native._props(t), (mod.FROM_IMPL, t.shape, t.stride(), t.dtype)
    assert attr_runner().FROM_IMPL == 0
    if native._cxx_compiler() is not None:  # meta.cpp builds wherever a C++ compiler is (torch ships its headers)
        assert native._ext().FROM_IMPL == 1, "meta.cpp was not used: native._ext logged why"


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")
def test_library_key(monkeypatch):
    """The cached library's name changes with the source, the flags and the compiler; it sits in the cache dir."""
    cc = native._compiler()
    path = native._library_path(cc)
    assert path.parent == cache_dir() and path.suffix == ".so"
    monkeypatch.setattr(native, "_FLAGS", native._FLAGS + ("-DLINTX_X=1",))
    assert native._library_path(cc) != path
    monkeypatch.undo()
    assert native._library_path(cc) == path
    assert native._library_path("/bin/true") != path  # another compiler (its path and --version)


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")
def test_every_isa_variant_gives_the_same_bits(native_variants):
    """The step's variants (AVX-512, AVX2, the baseline; each pinned by -DLINTX_FORCE_ISA) give bit-identical
    results, so a result does not depend on the CPU that computed it: shapes with a column tail (DV % 16),
    grouped heads split across the register sweeps (G = 5: 4 + 1), both sources of the state, each map,
    normalized or not. (causal.c's variants fuse products where the ISA can: tests/test_native_causal.py checks
    each against the reference.)"""
    import ctypes

    isas = cpu_isas()
    gen = torch.Generator().manual_seed(0)
    cases = []
    for B, H, HKV, D, DV in [(1, 8, 8, 64, 64), (3, 8, 2, 24, 40), (2, 5, 1, 32, 33), (1, 9, 1, 8, 100)]:
        for code in native.MAPS.values():
            for inplace in (True, False):
                t = [torch.randn(*s, generator=gen) for s in ((B, H, D), (B, HKV, D), (B, HKV, DV),
                                                               (B, HKV, D, DV))]
                z0 = torch.rand(B, HKV, D, generator=gen) + 1
                cases.append(((B, H, HKV, D, DV, code), inplace, t + [z0]))
    outs = {}
    for isa in isas:
        loaded = ctypes.CDLL(str(build_variant(isa, native_variants)))
        fn = loaded.lintx_step_f32
        res = []
        for dims, inplace, (q, k, v, S0, z0) in cases:
            B, H, _, _, DV, _ = dims
            for normalize in (0, 1):
                S0c, z0c = S0.clone(), z0.clone()
                S, z = (S0c, z0c) if inplace else (torch.empty_like(S0), torch.empty_like(z0))
                o = torch.empty(B, H, DV)
                a, se = native.args(dims, [t.data_ptr() for t in (q, k, v, S0c, z0c, S, z, o)], 0.7, 1e-3)
                assert fn(a, se, normalize) == 0
                res += [o, S, z]
        outs[isa] = res
    for isa in isas[1:]:
        for a, b in zip(outs[isas[0]], outs[isa]):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{isa} differs from {isas[0]}"  # bits
