"""A small lintx case for compute-sanitizer: every kernel once, on odd shapes, checked against float64.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python bench/sanitize_case.py

Without the caching allocator each tensor is its own allocation, so an access past a tensor's end
is outside any allocation and memcheck reports it (inside PyTorch's pools it would not). Runs the
forward (fused and chunk-parallel paths: many short and one long sequence), the backward, a prefill
from a state and the in-place decode step (bf16 unless dtypes are named). Exit code 1 when a result
is off.
"""

from __future__ import annotations

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

# (mode, B, T, H, D, DV): T not a multiple of any chunk; one D != DV; few and many (batch, head) programs.
# D = DV = 64 and 128 in bf16 are the grid's kernels: compiled here, reused from the disk cache there.
CASES = [("fwd", 3, 77, 5, 64, 48), ("fwd", 1, 1000, 2, 64, 64), ("fwdbwd", 2, 200, 3, 64, 64),
         ("fwdbwd", 1, 300, 2, 128, 128), ("prefill", 2, 130, 3, 64, 64), ("decode", 3, 50, 5, 64, 64)]


def main(argv=None) -> int:
    """``python bench/sanitize_case.py [DTYPE ...]`` (bf16, fp16, fp32; default bf16)."""
    dtypes = (argv if argv is not None else sys.argv[1:]) or ["bf16"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lintx = next(i for i in harness.default_impls() if i.name == "lintx")
    bad = 0
    for dtype in dtypes:
        for mode, B, T, H, D, DV in CASES:
            row = harness.Row(mode, B, T, H, D, DV, dtype)
            inp = harness.make_inputs(row, device, seed=1)
            try:
                worst = harness.check(lintx, row, inp, window=64)
                harness.workload(lintx, row, inp)()  # the timed call too (decode: the in-place update)
            except harness.CheckError as e:
                worst = e.worst
            if device.type == "cuda":
                torch.cuda.synchronize()
            ok = worst <= 1.0
            bad += not ok
            print(f"{row.key():40s} worst err / bound {worst:.3g} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"sanitize_case: {bad} failed on {device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
