"""Compile the default config of every kernel for GPU targets on this (CPU) machine and tabulate resources.

    python bench/compile_report.py                          # sm_80 and sm_90, every map (and FAVOR+ at M = 2D),
                                                            # dtype, D in {64, 128}
    python bench/compile_report.py --arches 90 --maps elu --out -
    python bench/compile_report.py --arches 90 --maps hedgehog --dtypes bf16 --merge   # replace / add these rows

Writes bench/COMPILE_REPORT.md. A family of ``feature_maps.MAP_FAMILIES`` (favor, hedgehog, t2r, ...) is
built at M = 2D for each D (``feature_maps.family_map``: a learnable map's W shared by the heads, tied; per-head
W changes a stride, not the kernels; its backward launches sum dW, db: HAS_DFM). ``--merge`` recompiles only
the rows asked for and keeps every other row of ``--out`` as it is, so a new map does not cost a full
regeneration (about 1.5 minutes per variant on a CPU); the header then lists what was merged, and when.
Needs no GPU: Triton compiles for the target and the cuobjdump / nvdisasm inside the triton wheel read the
cubins (lintx_triton.compile_report).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # compiling for a GPU target, not interpreting

import torch  # noqa: E402
import triton  # noqa: E402

from lintx_triton import feature_maps  # noqa: E402
from lintx_triton.compile_report import default_report  # noqa: E402
from lintx_triton.spec import DTYPES, dtype_of  # noqa: E402

SHORT = sorted(d.short for d in DTYPES.values())  # bf16, fp16, fp32 (lintx_triton.spec.DTYPES), the report's order
HEADER = ("| map | dtype | D=DV | stage | BT | BV | warps | regs | stack | spill ld/st | shared B | HGMMA | HMMA "
          "| blocks/SM |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row_key(arch: int, line: str):
    """(arch, map, dtype, D, stage) of a table row, None for any other line."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if not line.startswith("| ") or len(cells) < 4 or not cells[2].isdigit():
        return None
    return (arch, cells[0], cells[1], cells[2], cells[3])


def merge(old: list[str], new: list[str], args: str) -> list[str]:
    """``old`` (a report's lines) with each row of ``new`` in place of the row of the same arch, map, dtype, D
    and stage, or after the last row of its arch when ``old`` has none; a header line records the merge."""
    def keyed(lines):
        arch, out = None, []
        for line in lines:
            m = re.match(r"## sm_(\d+)", line)
            arch = int(m.group(1)) if m else arch
            out.append((_row_key(arch, line) if arch is not None else None, line))
        return out

    fresh = {k: line for k, line in keyed(new) if k is not None}
    merged, placed = [], set()
    for k, line in keyed(old):
        if k in fresh:
            merged.append(fresh[k])
            placed.add(k)
        else:
            merged.append(line)
    for arch in dict.fromkeys(k[0] for k in fresh):
        add = [line for k, line in fresh.items() if k[0] == arch and k not in placed]
        if not add:
            continue
        rows = [i for i, (k, _) in enumerate(keyed(merged)) if k is not None and k[0] == arch]
        if rows:
            merged[rows[-1] + 1:rows[-1] + 1] = add
        else:
            merged += ["", f"## sm_{arch}", "", HEADER] + add
    note = (f"Rows merged by `python bench/compile_report.py {args}` ({time.strftime('%Y-%m-%d')}, Triton "
            f"{triton.__version__}); the other rows are from the last full run or merge before it.")
    merged = [line for line in merged if line != note]  # the same merge run again says so once
    first_section = next(i for i, line in enumerate(merged) if line.startswith("## "))
    return merged[:first_section - 1] + ["", note] + merged[first_section - 1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arches", type=int, nargs="+", default=[90, 80])
    p.add_argument("--maps", nargs="+", default=feature_maps.available() + ["favor"],
                   help="registered names, or families of feature_maps.MAP_FAMILIES (favor, hedgehog, t2r, ...) "
                        "built with M = 2D features at each D")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=SHORT, choices=SHORT)
    p.add_argument("--out", default="bench/COMPILE_REPORT.md", help="markdown file, or - for stdout")
    p.add_argument("--merge", action="store_true",
                   help="replace the rows of these arches, maps, dtypes and dims in --out (add them after the "
                        "last row of their arch when new) and keep every other row")
    args = p.parse_args(argv)
    if args.merge and args.out == "-":
        p.error("--merge rewrites --out in place: give a file")
    lines = [
        "# Compiled-kernel resources",
        "",
        f"Generated by `python bench/compile_report.py` on a CPU (no GPU): Triton {triton.__version__}, "
        f"torch {torch.__version__}. Causal, normalized variants under the default configs "
        "(`lintx_triton.config.gpu_heuristic` for each arch, 132 multiprocessors). `spill ld/st` counts LDL/STL "
        "instructions; `HGMMA`/`HMMA` count matrix instructions in the SASS (sm_80 has no HGMMA); "
        "blocks/SM is an estimate from registers and shared memory. Another Triton version compiles "
        "differently: bench/NOTES.md compares 3.6 (the GPU machine's) on the rows that matter.",
    ]
    for arch in args.arches:
        lines += ["", f"## sm_{arch}", "", HEADER]
        for fm in args.maps:
            for short in args.dtypes:
                if fm in feature_maps.MAP_FAMILIES:  # a projected map is built for one D
                    names = [(feature_maps.family_map(fm, d, 2 * d).name, [d]) for d in args.dims]
                else:
                    names = [(fm, args.dims)]
                rows = [r for name, dims in names for r in default_report(dtype_of(short).name, dims, arch, name)]
                for r in rows:
                    lines.append(
                        f"| {r['feature_map']} | {short} | {r['dim']} | {r['stage']} | {r['BT']} | {r['BV']} | "
                        f"{r['num_warps']} | {r['registers']} | {r['stack']} | {r['spill_loads']}/{r['spill_stores']} "
                        f"| {r['shared']} | {r['hgmma']} | {r['hmma']} | {r['blocks_per_sm']} |"
                    )
                    print(f"sm_{arch} " + lines[-1], file=sys.stderr)
    if args.merge:
        lines = merge(open(args.out).read().splitlines(), lines, " ".join(argv if argv is not None else sys.argv[1:]))
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
