"""The tests' imports of :mod:`lintx_triton.testing` (its public API), and a call of a case."""

from __future__ import annotations

import contextlib

import lintx_triton as lx
from lintx_triton.testing import (  # noqa: F401  (re-exported for the tests)
    EPS_VALUES,
    GTOL,
    TOL,
    call_kwargs,
    case_id,
    cases,
    check_forward,
    check_grads,
    check_state,
    decode_steps,
    forward_and_grads,
    forward_bound,
    grad_bound,
    make_inputs,
    reference,
    reference_grads,
)


# chunk overrides a property draws: None keeps the device's own config (16 in the interpreter; on a GPU the tuned
# or heuristic one, 64-wide chunks)
CHUNKS = (16, 32, None)


def kwargs(c: dict) -> dict:
    return dict(feature_map=c["feature_map"], **call_kwargs(c))


def config(**fields):
    """lx.config.override of the fields that are not None (none: the device's own config)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    return lx.config.override(**fields) if fields else contextlib.nullcontext()


def on(device, backend):
    """Where a backend's inputs go: the kernel device for Triton, the CPU for the torch backend."""
    return device if backend == "triton" else "cpu"


def run(c, q, k, v, state, backend, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, backend=backend, return_state=return_state, **kwargs(c))
