"""`lintx fuzz` on a correct install and on a planted wrong kernel: valid draws for every default variant, the
three outcomes (ok, FAIL with a reproducer that raises, ERROR) and their exit codes, --quick, --minutes, --device.

The runs that must see exactly the package's own maps (a test may have registered more in this process) or the
whole command as a user runs it (its startup counted by --quick) run in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings

import lintx_triton as lx
import lintx_triton.ops.custom as custom
from lintx_triton import testing
from lintx_triton.cli import QUICK_SECONDS, _time_left_column, main
from lintx_triton.feature_maps import base as fm_base
from lintx_triton.spec import DTYPES, FAMILIES

DEFAULT_MAPS = {"elu", "relu", "identity", "favor", "favor_hyp", "fourier", "hedgehog", "hedgehog_fla", "t2r", "rebased",
                "taylor", "taylor_c"}

# The planted wrong kernel: the Triton backward adds 1 to the last element of dq. Installed by --import, so the
# fuzz run and its reproducer both carry it; without it the same reproducer passes.
PLANTED = textwrap.dedent('''
    """A planted wrong kernel: the Triton backward adds 1 to the last element of dq."""
    import lintx_triton.ops.custom as custom

    _chunk_bwd = custom.chunk_bwd


    def chunk_bwd(*args, **kwargs):
        grads = _chunk_bwd(*args, **kwargs)
        grads[0].view(-1)[-1] += 1.0  # dq
        return grads


    custom.chunk_bwd = chunk_bwd
''')


def _lintx(*args, env=None, timeout=300):
    """`python -m lintx_triton ...` in a fresh process (this test run's kernel cache and interpreter)."""
    return subprocess.run([sys.executable, "-m", "lintx_triton", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def _json(r):
    return json.loads(r.stdout)


@pytest.fixture
def registry(monkeypatch):
    """Register maps for one test only: the registry is put back afterwards."""
    monkeypatch.setattr(fm_base, "_REGISTRY", dict(fm_base._REGISTRY))
    return lambda fm: lx.feature_maps.register(fm)


# ---------------------------------------------------------------- valid draws


def test_default_variants_draw_valid_examples():
    """Every variant of the default list, on a tiny budget, draws a valid example at once: no ERROR, no
    unsatisfiable strategy (the identity's normalized gradients used to reject every draw), nothing skipped,
    within bound. Both backends draw the same cases: the PyTorch path runs them fast. (Many draws of the signed
    maps' normalized gradients: the next test; through the Triton kernels: --quick below.)"""
    out = _lintx("fuzz", "-n", "1", "--backend", "torch", "--json")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(out.stdout)
    res = data["results"]
    assert len(res) == len(FAMILIES) * len(DEFAULT_MAPS) * len(DTYPES) * 2 * 2
    assert {r["feature_map"] for r in res} == DEFAULT_MAPS
    assert data["counts"] == {"ok": len(res), "FAIL": 0, "ERROR": 0, "skipped": 0, "not run": 0}
    assert all(r["status"] == "ok" and r["examples"] == 1 and r["worst"] <= 1 and not r["error"] for r in res)
    # the variant the issue found rejecting every draw
    assert any(r["kernel"] == "backward" and r["feature_map"] == "identity" and r["normalize"] for r in res)


@pytest.mark.parametrize("fmap, floor", [("identity", 0.0), ("fourier", 0.49)])
def test_signed_maps_normalized_gradients_draw_a_positive_normalizer(fmap, floor):
    """The precondition of a normalized gradient's bound holds by construction: every term phi(q_t)^T phi(k_s)
    of the normalizer, and phi(q_t)^T z_0, is positive (identity: products of positive elements; Fourier
    features: at least 1/2, a cosine of at most pi/3), so the normalizer never nears 0."""

    @settings(max_examples=30, deadline=None)
    @given(c=testing.cases(maps=(fmap,), normalize=True, positive_den=True))
    def prop(c):
        assert c["inputs"] == "positive_den"
        q, k, v, state = testing.make_inputs(c)
        fm = testing.ensure_map(c)
        a, b = fm.features(q.double(), "query", stabilize=True), fm.features(k.double(), "key")
        terms = torch.einsum("bthm,bshm->bhts", a, b)  # every pair, whatever the mask
        assert bool((terms >= floor).all()), terms.min()
        if state is not None:
            assert bool((torch.einsum("bthm,bhm->bth", a, state[1].double()) >= 5 * floor).all())
        _, _, _, den = testing.reference(c, q, k, v, state)
        assert bool((den > 0).all())

    prop()


def test_positive_den_only_where_needed_and_make_inputs_unchanged_otherwise():
    fm = lx.feature_maps.get
    assert testing.signed_map(fm("identity")) and not testing.signed_map(fm("elu"))
    assert not testing.signed_map(fm("relu")) and not testing.signed_map(lx.feature_maps.favor(8, 16, seed=0))
    assert testing.signed_map(lx.feature_maps.random_fourier(8, 16, seed=0))
    assert testing.positive_den_inputs(fm("identity")) and testing.positive_den_inputs(
        lx.feature_maps.random_fourier(8, 16, seed=0))

    @settings(max_examples=10, deadline=None)
    @given(c=testing.cases(maps=("elu", "relu", "favor"), positive_den=True))
    def positive_maps_keep_gaussian_inputs(c):
        assert "inputs" not in c

    positive_maps_keep_gaussian_inputs()
    # a case without the key: the Gaussian draws of before, in the same order
    c = dict(B=1, T=3, H=2, D=4, DV=5, dtype="float32", feature_map="identity", causal=True, normalize=True,
             initial_state=False, scale=1.0, seed=7)
    q, k, v, _ = testing.make_inputs(c)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(q, torch.randn(1, 3, 2, 4, generator=g)) and torch.equal(k, torch.randn(1, 3, 2, 4, generator=g))
    q2, k2, v2, _ = testing.make_inputs(dict(c, inputs="positive_den"))
    assert torch.equal(q2, q.abs()) and torch.equal(k2, k.abs()) and torch.equal(v2, v)


def test_a_meaningless_variant_is_a_visible_skipped_row(registry):
    """A signed map with no inputs that keep its normalizer positive: its normalized gradients are skipped,
    with the reason, and the rest runs."""
    # sin changes sign on both half-lines: no inputs keep its products phi(q)_m phi(k)_m of one sign
    registry(lx.feature_maps.ElementwiseFeatureMap(name="fuzz_sine", phi="tl.sin(x)", vjp="g * tl.cos(x)",
                                                   reference=torch.sin))
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "fuzz_sine", "--kernel", "backward", "--backend",
                                  "torch", "--dtype", "fp32", "--no-state"])
    assert r.exit_code == 0, r.output
    assert "skipped: signed map" in r.stdout and "ok" in r.stdout
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "fuzz_sine", "--kernel", "backward", "--backend",
                                  "torch", "--dtype", "fp32", "--no-state", "--json"])
    rows = {x["normalize"]: x for x in _json(r)["results"]}
    assert rows[True]["status"] == "skipped" and "normalizer" in rows[True]["reason"] and rows[True]["examples"] == 0
    assert rows[False]["status"] == "ok" and rows[False]["examples"] == 2


# ---------------------------------------------------------------- FAIL and ERROR


def test_planted_wrong_kernel_fails_with_a_reproducer_that_raises(tmp_path):
    (tmp_path / "planted_bwd.py").write_text(PLANTED)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = _lintx("fuzz", "-n", "4", "--kernel", "backward", "--backend", "triton", "--map", "elu", "--dtype", "fp32",
                 "--raw", "--no-state", "--import", "planted_bwd", "--json", env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    data = json.loads(out.stdout)
    (res,) = data["results"]
    assert data["exit_code"] == 1 and data["counts"]["FAIL"] == 1
    assert res["status"] == "FAIL" and res["fault"] == "mismatch" and res["error"].startswith("EquivalenceError: dq")
    assert res["case"] and "import planted_bwd" in res["snippet"]
    script = tmp_path / "repro.py"
    script.write_text(res["snippet"])
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **env))
    assert run.returncode != 0 and "EquivalenceError: dq" in run.stderr, run.stderr[-2000:]
    # the same reproducer without the planted fault passes: what it catches is the kernel, not the harness
    script.write_text(res["snippet"].replace("import planted_bwd", "pass  # planted_bwd left out"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **env))
    assert run.returncode == 0, run.stderr[-2000:]


def _broken_reference_map():
    def reference(x):
        if x.dtype == torch.float64:  # the float64 reference breaks: the fuzzer's own fault
            raise RuntimeError("planted: the reference is broken")
        return x * x + 1

    return lx.feature_maps.ElementwiseFeatureMap(name="fuzz_broken_reference", phi="x * x + 1.0", vjp="2.0 * x * g",
                                                 reference=reference, positive=True)


def test_harness_error_is_error_not_fail(registry):
    registry(_broken_reference_map())
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "fuzz_broken_reference", "--kernel", "forward",
                                  "--backend", "triton", "--dtype", "fp32", "--raw", "--no-state", "--json"])
    assert r.exit_code == 2, r.output
    (res,) = _json(r)["results"]
    assert res["status"] == "ERROR" and res["fault"] == "harness" and "reference is broken" in res["error"]
    assert "reference" in res["detail"] and not res["snippet"] and res["case"] is None


def test_op_crash_is_a_kernel_fault_and_fail_beats_error(registry, monkeypatch):
    """An exception of the op itself on a valid input is a kernel fault: FAIL (crash), shrunk, exit code 1,
    also beside an ERROR of another variant."""
    registry(_broken_reference_map())
    chunk_fwd = custom.chunk_fwd

    def crash(spec, *args, **kwargs):
        if spec.feature_map == "elu":
            raise RuntimeError(f"planted crash in {spec.feature_map}")
        return chunk_fwd(spec, *args, **kwargs)

    monkeypatch.setattr(custom, "chunk_fwd", crash)
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "elu", "--map", "fuzz_broken_reference", "--kernel",
                                  "forward", "--backend", "triton", "--dtype", "fp32", "--raw", "--no-state", "--json"])
    assert r.exit_code == 1, r.output
    rows = {x["feature_map"]: x for x in _json(r)["results"]}
    elu = rows["elu"]
    assert elu["status"] == "FAIL" and elu["fault"] == "crash" and "planted crash in elu" in elu["error"]
    assert elu["case"]["T"] == 1 and "lx.linear_attention" in elu["snippet"]
    assert rows["fuzz_broken_reference"]["status"] == "ERROR" and _json(r)["counts"]["ERROR"] == 1


def test_eps_is_drawn_and_reaches_the_op(monkeypatch):
    """The fuzz draws eps as the tests do (testing.EPS_VALUES): a forward that ignores its eps (always 1e-6) FAILs,
    and the failing case carries its eps into the case id and the reproducer's call."""
    chunk_fwd = custom.chunk_fwd

    def ignores_eps(spec, cfg, q, k, v, S0, z0, fq, fk, scale, eps, *args, **kwargs):
        return chunk_fwd(spec, cfg, q, k, v, S0, z0, fq, fk, scale, testing.EPS_VALUES[0], *args, **kwargs)

    monkeypatch.setattr(custom, "chunk_fwd", ignores_eps)
    r = CliRunner().invoke(main, ["fuzz", "-n", "20", "--map", "elu", "--kernel", "forward", "--backend", "triton",
                                  "--dtype", "fp32", "--normalize", "--no-state", "--json"])
    assert r.exit_code == 1, r.output
    (res,) = _json(r)["results"]
    assert res["status"] == "FAIL" and res["fault"] == "mismatch", res
    eps = res["case"]["eps"]
    assert eps != testing.EPS_VALUES[0] and eps in testing.EPS_VALUES
    assert f"case {testing.case_id(res['case'])}" in res["snippet"] and f"-eps{eps}" in res["snippet"]
    assert "**call_kwargs(case)" in res["snippet"]


def test_unsatisfiable_strategy_is_error(monkeypatch):
    cases = testing.cases
    monkeypatch.setattr(testing, "cases", lambda *a, **k: cases(*a, **k).filter(lambda c: False))
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "elu", "--kernel", "forward", "--backend", "torch",
                                  "--dtype", "fp32", "--raw", "--no-state", "--json"])
    assert r.exit_code == 2, r.output
    (res,) = _json(r)["results"]
    assert res["status"] == "ERROR" and res["fault"] == "unsatisfiable" and "Unsatisfiable" in res["error"]


def test_device_cuda_without_a_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    before = os.environ.get("TRITON_INTERPRET")
    r = CliRunner().invoke(main, ["fuzz", "--device", "cuda", "-n", "1", "--map", "elu"])
    assert r.exit_code == 2 and "torch.cuda.is_available() is False" in r.output and "--device cpu" in r.output
    assert os.environ.get("TRITON_INTERPRET") == before


# ---------------------------------------------------------------- time


def test_quick_covers_every_kernel_map_and_dtype_in_its_budget():
    """`lintx fuzz --quick` as a user runs it (its startup counted): every kernel family, map family and dtype,
    both backends and flags, every variant with examples, all ok, within its budget."""
    t = time.monotonic()
    out = _lintx("fuzz", "--quick", "--json")
    wall = time.monotonic() - t
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(out.stdout)
    res = data["results"]
    assert {r["kernel"] for r in res} == set(FAMILIES) and {r["feature_map"] for r in res} == DEFAULT_MAPS
    assert {r["dtype"] for r in res} == set(DTYPES) and {r["backend"] for r in res} == {"triton", "torch"}
    assert {(r["kernel"], r["feature_map"]) for r in res} == {(k, m) for k in FAMILIES for m in DEFAULT_MAPS}
    assert all(r["status"] == "ok" and r["examples"] >= 1 for r in res), res
    assert data["mode"] == "quick" and data["elapsed_s"] <= QUICK_SECONDS + 5
    print(f"lintx fuzz --quick: {wall:.1f} s, {data['examples']} examples")


def test_minutes_is_honoured_and_draws_that_cannot_finish_are_not_started():
    """The Triton backward's largest draws take seconds in the interpreter: near the end they are left for
    smaller ones, so the run ends within 10 % of --minutes."""
    t = time.monotonic()
    r = CliRunner().invoke(main, ["fuzz", "--minutes", "0.2", "--kernel", "backward", "--backend", "triton",
                                  "--map", "elu", "--dtype", "fp32", "--json"])
    wall = time.monotonic() - t
    assert r.exit_code == 0, r.output
    data = _json(r)
    assert 0.9 * 12 <= wall <= 1.1 * 12, wall
    assert all(x["status"] == "ok" and x["examples"] >= 1 for x in data["results"])


def test_progress_shows_the_time_left():
    col = _time_left_column(time.monotonic() + 75.5)
    assert str(col.render(None)) in ("1:15 left", "1:14 left")
