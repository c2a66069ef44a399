"""Test setup: the Triton interpreter, a private kernel cache, NaN-filled allocations, hypothesis profiles.

TRITON_INTERPRET must be set before Triton decorates any kernel; lintx_triton
generates its kernel modules lazily, so setting it here, before the tests import
anything, is enough.
"""

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("LINTX_TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lintx_triton_test_cache_"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
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


def pytest_configure(config):
    # `pytest --hypothesis-profile thorough` picks the other one; `ci` is the default.
    name = config.getoption("--hypothesis-profile", default=None) or os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)


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
