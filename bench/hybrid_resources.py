"""sm_90 resources of the hybrid's (window=) kernels, compiled on a CPU: rows of bench/COMPILE_REPORT.md's hybrid
table.

    python bench/hybrid_resources.py      # bf16: elu at D = 64 and 128, Hedgehog (M = 2D) at 64, Taylor, ReBased at 16
    python bench/hybrid_resources.py --maps elu --dims 64 --stages "hybrid decode step"

The variant a hybrid call generates (causal, unnormalized), under ``gpu_heuristic`` for 528 (batch, head)
programs on 132 multiprocessors, as ``lintx_triton.compile_report.family_launches("hybrid", ...)`` plans it: the
sliding window of 4 chunks, the forward on both paths, the backward, the decode step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lintx_triton as lx  # noqa: E402
from lintx_triton import compile_report as cr  # noqa: E402
from lintx_triton.config import gpu_heuristic  # noqa: E402
from lintx_triton.spec import KernelSpec  # noqa: E402


def rows(maps=("elu", "hedgehog", "taylor", "rebased"), dims=(16, 64, 128), stages=None, dtype="bfloat16"):
    """Markdown rows, one per hybrid kernel launch (Hedgehog at D = 64 only: M = 2D; polynomial maps at 16)."""
    out = []
    for fam in maps:
        for D in dims:
            if (fam == "hedgehog" and D != 64) or ((fam in ("taylor", "taylor_c", "rebased")) != (D == 16)):
                continue
            fm = lx.feature_maps.resolve("elu") if fam == "elu" else lx.feature_maps.family_map(fam, D, 2 * D)
            spec = KernelSpec(feature_map=fm.name, causal=True, normalize=False, dtype=dtype, head_dim=D,
                              value_dim=D, has_initial_state=False, dot_fp32=False)
            cfg = gpu_heuristic(spec, batch_heads=4 * 132, sm_count=132, arch=90)
            seen = set()  # a blocked map's fused path is its chunked one (the launcher's rule): one row
            for path in ("chunked", "fused"):
                for L in cr.family_launches("hybrid", spec, dataclasses.replace(cfg, path=path)):
                    if not L.kernel.startswith("hybrid") or (stages and L.stage not in stages) or \
                            (path == "fused" and "output" not in L.stage) or L.stage in seen:
                        continue
                    seen.add(L.stage)
                    r = cr.kernel_resources(spec, L, arch=90)
                    k = L.plan.constexprs
                    out.append(f"| {fm.name} | bf16 | {D} | {L.stage} | {k.get('BT', '-')} | {k.get('BV', '-')} | "
                               f"{r.num_warps} | {r.registers} | {r.stack} | {r.spill_loads}/{r.spill_stores} | "
                               f"{r.shared} | {r.hgmma} | {r.hmma} | {r.blocks_per_sm} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--maps", nargs="+", default=["elu", "hedgehog", "taylor", "rebased"])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 16])
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (their labels)")
    a = p.parse_args(argv)
    for row in rows(a.maps, a.dims, a.stages):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
