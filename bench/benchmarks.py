"""pytest-benchmark benchmarks: every implementation of the side-by-side harness in every mode, small shapes.

    python -m pytest bench/benchmarks.py -q                                   # one round each
    LINTX_BENCH_ROUNDS=50 python -m pytest bench/benchmarks.py --benchmark-only \\
        --benchmark-columns=median,iqr --benchmark-sort=name                   # timed

The same implementations, inputs and checks as ``bench/side_by_side.py`` (``bench/harness.py``): each
benchmark first checks its implementation against the float64 reference, then times the mode's
call. ``tests/test_bench.py`` imports them so that CI (``python -m pytest tests -q``) runs each for one
round on a CPU, in Triton's interpreter: their code is exercised there, nothing is gated on time.
For the numbers that matter use ``side_by_side.py`` on a GPU.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

ROUNDS = int(os.environ.get("LINTX_BENCH_ROUNDS", "1"))
# T = 40: not a multiple of the interpreter's chunks (16, 32), so the last chunk is partial
SHAPE = dict(B=2, T=40, H=2, D=16, DV=16, dtype="bf16")
IMPLS = {i.name: i for i in harness.default_impls(torch_max_gib=1.0)}


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_side_by_side(benchmark, impl, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = harness.Row(mode, SHAPE["B"], SHAPE["T"], SHAPE["H"], SHAPE["D"], SHAPE["DV"], SHAPE["dtype"])
    why = IMPLS[impl].unavailable(mode, row, device)
    if why is None and mode == "decode" and IMPLS[impl].step is None:
        why = "no decode step"
    if why is not None:
        pytest.skip(why)
    inp = harness.make_inputs(row, device)
    worst = harness.check(IMPLS[impl], row, inp, window=16)
    assert worst <= (1.0 if impl == "lintx" else harness.LOOSE), f"{impl} {row.key()}: worst err / bound {worst:.3g}"
    fn = harness.workload(IMPLS[impl], row, inp)

    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(row=row.key(), check_worst=worst)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1 if ROUNDS > 1 else 0)
