"""Test-side names for the properties shipped in :mod:`lintx_triton.testing`."""

from __future__ import annotations

import lintx_triton as lx
from lintx_triton.testing import (  # noqa: F401  (re-exported for the tests)
    GTOL,
    TOL,
    case_id,
    cases,
    check_forward,
    check_grads,
    check_state,
    forward_and_grads,
    grad_bound,
    make_inputs,
    reference,
)


def kwargs(c: dict) -> dict:
    return dict(feature_map=c["feature_map"], causal=c["causal"], normalize=c["normalize"], scale=c["scale"])


def assert_forward_close(c: dict, out, q, k, v, state, what="o"):
    check_forward(c, out, q, k, v, state, name=what)


def assert_grads_close(c: dict, got, want, bounds, names):
    check_grads(c, got, want, bounds, names)


def run(c, q, k, v, state, backend, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, backend=backend, return_state=return_state, **kwargs(c))
