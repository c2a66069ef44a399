"""The tests' imports of :mod:`lintx_triton.testing` (its public API), and a call of a case."""

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
    decode_steps,
    forward_and_grads,
    grad_bound,
    make_inputs,
    reference,
    reference_grads,
)


def kwargs(c: dict) -> dict:
    return dict(feature_map=c["feature_map"], causal=c["causal"], normalize=c["normalize"], scale=c["scale"])


def run(c, q, k, v, state, backend, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, backend=backend, return_state=return_state, **kwargs(c))
