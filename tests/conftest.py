"""Test setup: where the Triton kernels run, a private kernel cache, NaN-filled allocations, hypothesis profiles.

Where the kernels run (one line of the pytest header says which):

* no GPU (or ``LINTX_INTERPRET=1``, or ``pytest --interpret``): Triton's CPU interpreter, as before, on CPU
  tensors. It runs bfloat16 products in float32 (``spec.products_in_fp32``) and fp16 products of exact fp32
  values, so the float16/bfloat16 bounds (``testing.TOL``/``GTOL``) are not calibrated by this run.
* a CUDA GPU: a test that takes the ``kernel_device`` fixture gets ``"cuda"`` and runs the compiled kernels
  (real tensor-core products, TF32, 64-wide chunks, concurrent atomics); its inputs go there
  (``make_inputs(c, device=kernel_device)``). A test that does not ask for it keeps the interpreter on CPU
  tensors, as before.

TRITON_INTERPRET is read when a kernel module is generated (``codegen.cache.load`` keys its modules on it) and
at each call (``config.interpreting``), so it is set here, before the tests import anything, and switched off
per test for the compiled ones.

Hypothesis: the ``ci`` profile (default) draws from a seed derived from the git commit (or the date without
git), printed in the header: a commit's run always draws the same examples (no flaky CI), the next commit draws
others, and ``--hypothesis-seed=N`` replays a run. Each test's draws come from that seed and the test's name.
"""

import datetime
import functools
import hashlib
import os
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("LINTX_TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lintx_triton_test_cache_"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, is_hypothesis_test, seed, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=False,  # the seed below: fixed per commit, not forever
    database=None,  # a run is its seed alone (no replay of another run's failures)
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pytest_addoption(parser):
    parser.addoption("--interpret", action="store_true", default=False,
                     help="run the Triton kernels in the CPU interpreter even on a GPU (as LINTX_INTERPRET=1)")


@functools.cache
def kernel_device_name() -> str:
    """"cuda" where the compiled kernels are tested, "cpu" where the interpreter runs them."""
    if os.environ.get("LINTX_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


_SEED = None  # (the session's seed, where it came from), or None: hypothesis's own random draws


def _commit_seed(root) -> tuple[int, str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        source = f"git commit {head[:12]}"
    except (OSError, subprocess.SubprocessError):
        head = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        source = f"the date {head} (no git)"
    return int(hashlib.sha256(head.encode()).hexdigest()[:8], 16), source


@pytest.hookimpl(tryfirst=True)  # before hypothesis's plugin reads --hypothesis-seed
def pytest_configure(config):
    global _SEED
    if config.getoption("--interpret"):
        os.environ["LINTX_INTERPRET"] = "1"
    # `pytest --hypothesis-profile thorough` picks the other one; `ci` is the default.
    name = config.getoption("--hypothesis-profile", default=None) or os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    given = config.getoption("--hypothesis-seed", default=None)
    if given is not None:
        _SEED = (given, "--hypothesis-seed")
    elif name == "ci":
        s, source = _commit_seed(config.rootpath)
        _SEED = (str(s), source)
        config.option.hypothesis_seed = str(s)  # hypothesis's plugin: the seed of @given functions made in tests
    else:
        _SEED = None


def pytest_collection_modifyitems(config, items):
    """Each collected hypothesis test draws from the session's seed and its own name (a test-wide seed alone would
    give every test with the same strategy the same examples)."""
    if _SEED is None:
        return
    done = set()
    for item in items:
        fn = getattr(item, "obj", None)
        if fn is None or id(fn) in done or not is_hypothesis_test(fn):
            continue
        done.add(id(fn))
        if getattr(fn, "_hypothesis_internal_use_seed", None) is None:  # a test's own @seed stays
            key = f"{_SEED[0]}:{fn.__module__}.{fn.__qualname__}"
            seed(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))(fn)


def pytest_report_header(config):
    dev = kernel_device_name()
    if dev == "cuda":
        lines = [f"lintx kernels: compiled on {torch.cuda.get_device_name()} for tests taking kernel_device; "
                 f"the interpreter on CPU tensors elsewhere (LINTX_INTERPRET=1 or --interpret: all interpreted)"]
    else:
        why = "asked (LINTX_INTERPRET=1 / --interpret)" if torch.cuda.is_available() else "no CUDA device"
        lines = [f"lintx kernels: Triton's CPU interpreter ({why}); float16/bfloat16 bounds (TOL/GTOL) not "
                 f"calibrated here: the interpreter runs bf16 products in fp32 and fp16 products of exact fp32 "
                 f"values; neither TF32, 64-wide chunks nor concurrent atomics run"]
    if _SEED is not None:
        value, source = _SEED
        lines.append(f"hypothesis seed {value} (from {source}); reproduce with --hypothesis-seed={value}")
    return lines


@pytest.fixture(scope="session")
def kernel_device():
    """Where a test puts the inputs of the Triton path: "cuda" (compiled kernels) on a GPU, else "cpu" (the
    interpreter). The backend="torch" path and the float64 references stay on the CPU."""
    return kernel_device_name()


@pytest.fixture(scope="session")
def native_variants(tmp_path_factory):
    """A folder that the ISA-variant builds of lintx_triton.native (helpers.build_variant: about 6 s each) share
    for the session (per xdist worker)."""
    return tmp_path_factory.mktemp("native_variants")


@pytest.fixture(autouse=True)
def _kernel_mode(request, monkeypatch):
    """A test that takes kernel_device on a GPU runs compiled kernels: the interpreter is off for it."""
    if "kernel_device" in request.fixturenames and kernel_device_name() == "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield


_empty, _empty_like = torch.empty, torch.empty_like


def _nan_fill(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Fresh allocations start as NaN, so an element a kernel forgot to write fails the test (FLA's idea)."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_fill(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(_empty_like(*a, **k)))
    yield
