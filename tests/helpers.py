"""The tests' imports of :mod:`lintx_triton.testing` (its public API), and a call of a case."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

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


def cpu_isas() -> list:
    """The ISA variants of lintx_triton.native this CPU runs: "base", then "avx2" and "avx512" where it has them."""
    isas = ["base"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
        except OSError:
            flags = set()
        isas += [name for name, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if flag in flags]
    return isas


def build_variant(isa: str, directory) -> Path:
    """lintx_triton.native's library with every entry point pinned to one ISA variant (-DLINTX_FORCE_ISA), built
    into ``directory`` (once)."""
    from lintx_triton import native

    path = Path(directory) / f"native_{isa}.so"
    if not path.exists():
        native._build(native._compiler(), path, (f"-DLINTX_FORCE_ISA=LINTX_ISA_{isa.upper()}",))
    return path


@contextlib.contextmanager
def native_off():
    """lintx_triton.native switched off within: the CPU's causal torch backend runs the chunked PyTorch products."""
    from lintx_triton import native

    native.set_enabled(False)
    try:
        yield
    finally:
        native.set_enabled(True)


_ATTR_RUNNER = []


def attr_runner():
    """runner.c built without meta.cpp (its reads of the tensors through their Python attributes, as where no C++
    compiler or torch headers are), set up, once a process; None where runner.c cannot be built at all."""
    import sysconfig

    from lintx_triton import native

    if not _ATTR_RUNNER:
        include = sysconfig.get_paths().get("include") or ""
        ok = native._ext() is not None
        _ATTR_RUNNER.append(native._runner_module(include, from_impl=False) if ok else None)
    return _ATTR_RUNNER[0]


@contextlib.contextmanager
def freed_in_default_device_new_empty(t):
    """Within: torch.set_default_device("cpu")'s mode, and a trace hook that frees ``t``'s memory (``t.set_`` to
    an empty tensor) when that mode's Python ``__torch_function__`` is entered for a ``new_empty`` call, as a
    finalizer or another hook could. Yields the list of times it fired: a native call must allocate its outputs
    outside the mode (empty list) or it would have read ``t`` before its memory went."""
    import sys

    import torch

    fired = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "__torch_function__" and "new_empty" in str(
                frame.f_locals.get("func")):
            fired.append(1)
            t.set_(torch.empty(0))
        return None

    with torch.device("cpu"):
        sys.settrace(tracer)
        try:
            yield fired
        finally:
            sys.settrace(None)
