"""``python -m lintx_triton.autotune`` / ``lintx autotune``: tune the kernels on this GPU and write the config files."""

from __future__ import annotations

import json
import sys

import click

from lintx_triton.spec import DTYPES, FAMILIES, dtype_of

from .prune import MAX_SPILLS
from .tuner import DEFAULT_GRID

__all__ = ["autotune"]

# every name of a dtype: bf16 or bfloat16
DTYPE_CHOICES = [n for d in DTYPES.values() for n in (d.short, d.name)]


def _pairs(values, what: str, param: str) -> tuple[tuple[int, int], ...]:
    out = []
    for s in values:
        parts = s.lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if what == "dims" and len(nums) == 1:
            nums = nums * 2
        if len(nums) != 2 or min(nums) < 1:
            raise click.BadParameter(f"expected {'D or DxDV' if what == 'dims' else 'BHxT'} like "
                                     f"{'64 or 64x80' if what == 'dims' else '512x1024'}, got {s!r}", param_hint=param)
        out.append(tuple(nums))
    return tuple(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--kernel", "kernels", multiple=True, type=click.Choice(FAMILIES), help="[default: all three]")
@click.option("--map", "maps", multiple=True, metavar="NAME",
              help="feature map(s): registered names, or families with M features (default 2D) such as favor[:M], "
                   "hedgehog[:M], t2r[:M] [default: elu]")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(sorted(DTYPE_CHOICES)), help="[default: bf16]")
@click.option("--dims", "dims", multiple=True, metavar="D[xDV]", help="head widths [default: 64, 128]")
@click.option("--shape", "shapes", multiple=True, metavar="BHxT",
              help="B*H x T of the forward and backward [default: 512x1024 128x4096 32x16384]")
@click.option("--decode-bh", "decode_bh", multiple=True, type=click.IntRange(1),
              help="B*H of the decode step [default: 64 256 1024]")
@click.option("--causal/--full", default=True, show_default=True)
@click.option("--normalize/--raw", default=True, show_default=True)
@click.option("--initial-state", is_flag=True, help="the variants that read (S_0, z_0)")
@click.option("--space", default="default", show_default=True, type=click.Choice(["default", "full", "online"]),
              help="the candidate values (lintx_triton.autotune.space.SPACES)")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="stop starting candidates after this long; the best so far is written and a rerun resumes")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="where <gpu>/<kernel>.json go [default: the shipped autotune/configs]")
@click.option("--journal", type=click.Path(dir_okay=False), default=None,
              help="the resume file [default: $LINTX_TRITON_CACHE_DIR/autotune/<gpu>.jsonl]")
@click.option("--fresh", is_flag=True, help="ignore the journal of an earlier run")
@click.option("--prune-compile/--no-prune-compile", default=True, show_default=True,
              help="compile candidates for the GPU's arch on the CPU first and drop those that spill")
@click.option("--max-spills", default=MAX_SPILLS, show_default=True, type=click.IntRange(0),
              help="spill instructions (LDL + STL) a candidate may compile to")
@click.option("--workers", type=click.IntRange(1), default=None, help="parallel compiles [default: CPUs - 1]")
@click.option("--dry-run", is_flag=True, help="list and prune the candidates only (no GPU needed)")
@click.option("--arch", type=click.IntRange(50), default=None,
              help="the target to prune for without a GPU (--dry-run), e.g. 90")
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="import a module that registers maps")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def autotune(kernels, maps, dtypes, dims, shapes, decode_bh, causal, normalize, initial_state, space,
             budget_minutes, out_dir, journal, fresh, prune_compile, max_spills, workers, dry_run, arch, imports,
             as_json):
    """Tune the generated kernels on this GPU and write autotune/configs/<gpu>/<kernel>.json.

    Every candidate (chunk, value block, warps, stages, fused or chunked path) is pruned by its tile sizes
    and by what it compiles to for this GPU, checked against the float64 reference and, at each shape,
    against the PyTorch path, then timed (median of triton.testing.do_bench on rotating inputs). Failures
    are recorded, not fatal; an interrupted run resumes from its journal.

    \b
    Examples:
      python -m lintx_triton.autotune --budget-minutes 9    # the default grid
      lintx autotune --kernel forward --dtype fp16 --dims 64x128 --shape 256x2048
      python -m lintx_triton.autotune --dry-run --arch 90   # candidates and pruning, no GPU
    """
    import importlib

    import torch
    from rich.console import Console
    from rich.table import Table

    from . import CONFIG_DIR
    from .space import DeviceLimits
    from .tuner import Grid, tune

    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise click.BadParameter(f"cannot import {name!r}: {e}", param_hint="--import") from None
    try:
        grid = Grid(
            kernels=tuple(dict.fromkeys(kernels)) or DEFAULT_GRID.kernels,
            feature_maps=tuple(maps) or DEFAULT_GRID.feature_maps,
            dtypes=tuple(dict.fromkeys(dtype_of(d).name for d in dtypes)) or DEFAULT_GRID.dtypes,
            dims=_pairs(dims, "dims", "--dims") or DEFAULT_GRID.dims,
            causal=(causal,), normalize=(normalize,), initial_state=(initial_state,),
            shapes=_pairs(shapes, "shapes", "--shape") or DEFAULT_GRID.shapes,
            decode_batch_heads=tuple(decode_bh) or DEFAULT_GRID.decode_batch_heads,
        )
    except (KeyError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    gpu = torch.cuda.is_available()
    if not gpu and not dry_run:
        raise click.UsageError("timing needs a CUDA GPU; without one, --dry-run --arch 90 lists and prunes the "
                               "candidates")
    if arch is not None and gpu:
        raise click.UsageError("--arch is for dry runs without a GPU; with one, its own limits are used")
    limits = DeviceLimits.from_device(torch.cuda.current_device()) if gpu else DeviceLimits.for_arch(arch or 90)
    err = Console(stderr=True)
    results = tune(grid, out_dir=out_dir or CONFIG_DIR, space=space, limits=limits, journal=journal, fresh=fresh,
                   budget_minutes=budget_minutes, prune_compile=prune_compile, max_spills=max_spills, workers=workers,
                   dry_run=dry_run, console=err)
    rows = []
    for r in results:
        best = r.best()
        base = r.outcomes.get(r.base_key) or {}
        rows.append(dict(kernel=r.task.kernel, spec=r.task.spec.tag(), batch_heads=r.task.batch_heads, T=r.task.T,
                         candidates=len(r.outcomes), pruned=r.count("pruned"), rejected=r.count("rejected"),
                         failed=r.count("failed"), best=json.loads(best["config"]) if best else None,
                         ms=best["ms"] if best else None, default_ms=base.get("ms"), complete=r.complete,
                         outcomes=[dict(config=json.loads(k), status=o["status"], ms=o.get("ms"),
                                        reason=o.get("reason"), resources=o.get("resources"))
                                   for k, o in r.outcomes.items()]))
    if as_json:
        click.echo(json.dumps({"gpu": limits.name, "arch": limits.arch, "dry_run": dry_run, "tasks": rows}, indent=1))
        return
    title = f"autotune on {limits.name} (sm_{limits.arch})" + (": dry run, nothing timed" if dry_run else "")
    table = Table(title=title)
    for col in ("kernel", "spec", "B*H", "T", "cand.", "pruned", "rejected", "failed", "best config", "ms",
                "default ms", "speedup"):
        table.add_column(col, justify="left" if col in ("kernel", "spec", "best config") else "right")
    for x in rows:
        speed = f"{x['default_ms'] / x['ms']:.2f}x" if x["ms"] and x["default_ms"] else ""
        table.add_row(x["kernel"], x["spec"], str(x["batch_heads"]), str(x["T"]), str(x["candidates"]),
                      str(x["pruned"]), str(x["rejected"]), str(x["failed"]),
                      " ".join(f"{k}={v}" for k, v in x["best"].items()) if x["best"] else "",
                      f"{x['ms']:.4f}" if x["ms"] else "", f"{x['default_ms']:.4f}" if x["default_ms"] else "",
                      speed, style=None if x["complete"] else "yellow")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
