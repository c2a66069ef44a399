"""lintx_triton beside SDPA (FlashAttention), FLA and plain PyTorch, in one process, on the same inputs.

    python bench/side_by_side.py --out bench/out                         # the issue #6 grid (GPU)
    python bench/side_by_side.py --modes fwd,decode --T 1024,4096 --D 64 --out /tmp/b
    python bench/side_by_side.py --T 64,128 --H 2 --D 16 --tokens 256 --decode-batch 2 --out /tmp/b   # CPU, tiny
    python bench/side_by_side.py --report-only bench/out/results.json --out bench/out   # redraw md + png
    python bench/side_by_side.py --no-draw --fla-last --budget-s 120 --out /tmp/b       # bench/gpu_run.sh's stage 4

Writes ``results.json`` (after every cell, so a killed run keeps what it measured), ``results.md`` and
``results.png`` under ``--out`` (``--no-draw``: the JSON alone, drawn later with ``--report-only``). Each
cell is checked against a float64 reference before it is timed (``bench/harness.py`` says how); the exit code is 1 when a lintx cell fails its check or errors.
FLA (``fla-core``) is used when importable and skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time

import click

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402

DEFAULT_T = "1024,2048,4096,8192,16384,32768,65536"


def _ints(ctx, param, value):
    try:
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of integers, got {value!r}") from None


def _strs(ctx, param, value):
    return [x for x in value.split(",") if x]


def write_outputs(out: dict, out_dir: pathlib.Path, draw: bool = True) -> None:
    from bench import harness

    harness.save_json(out, out_dir / "results.json")
    if draw:
        (out_dir / "results.md").write_text(report.to_markdown(out))
        report.plot(out, out_dir / "results.png")


def _phases(impls: list, fla_last: bool) -> list[list]:
    """The implementations in the order their cells run: all at once (per head width, FLA's last in each), or with
    ``fla_last`` the others over the whole grid first, then the late ones (FLA, runtime autotuning)."""
    early, late = [i for i in impls if not i.late], [i for i in impls if i.late]
    return [early, late] if fla_last and early and late else [impls]


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--modes", default="fwd,fwdbwd,prefill,decode", callback=_strs, show_default=True,
              help="fwd, fwdbwd, prefill, decode")
@click.option("--T", "Ts", default=DEFAULT_T, callback=_ints, show_default=True,
              help="sequence lengths; for decode, the context lengths")
@click.option("--D", "Ds", default="64,128", callback=_ints, show_default=True, help="head widths, D = DV")
@click.option("--H", "H", default=16, show_default=True, help="heads")
@click.option("--tokens", default=32768, show_default=True, help="B*T, kept across T (B = tokens // T, at least 1)")
@click.option("--decode-batch", default=16, show_default=True, help="B for decode")
@click.option("--dtype", default="bf16", type=click.Choice(["bf16", "fp16", "fp32"]), show_default=True)
@click.option("--impls", default="lintx,sdpa,fla,fla-raw,torch,torch-chunked", callback=_strs, show_default=True)
@click.option("--fla-D", "fla_Ds", default="", callback=_ints,
              help="head widths at which FLA runs (default: all of --D); its runtime autotuning costs minutes per D")
@click.option("--torch-max-gib", default=None, type=float,
              help="skip plain PyTorch's O(T^2) scores above this (default 48 on CUDA, 1 on CPU)")
@click.option("--budget-s", default=None, type=float, help="stop starting cells after this many seconds")
@click.option("--rep-ms", default=100.0, show_default=True, help="do_bench repetition budget (CUDA)")
@click.option("--warmup-ms", default=25.0, show_default=True, help="do_bench warm-up budget (CUDA)")
@click.option("--cpu-reps", default=5, show_default=True, help="timed calls per cell on a CPU")
@click.option("--check-window", default=128, show_default=True, help="tokens per checked slice")
@click.option("--fla-last", is_flag=True,
              help="run FLA's cells after every other cell of the grid, all head widths (default: after the others "
                   "of each head width), so a --budget-s cut loses FLA's first")
@click.option("--draw/--no-draw", default=True, show_default=True,
              help="write results.md and results.png beside results.json (--no-draw: the JSON alone, one file; "
                   "draw it later with --report-only)")
@click.option("--time-failures", is_flag=True,
              help="time cells whose check failed too (marked FAIL; the exit code is still 1)")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available)")
@click.option("--out", "out_dir", default="bench/out", show_default=True, type=click.Path(file_okay=False))
@click.option("--report-only", default=None, type=click.Path(exists=True, dir_okay=False),
              help="redraw results.md and results.png from this JSON; runs nothing")
def main(modes, Ts, Ds, H, tokens, decode_batch, dtype, impls, fla_Ds, torch_max_gib, budget_s, rep_ms, warmup_ms,
         cpu_reps, check_window, fla_last, draw, time_failures, seed, device, out_dir, report_only):
    """lintx_triton against SDPA, FLA and plain PyTorch: time, peak memory, ratios, fraction of the floor."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if report_only:
        from bench.harness import load_json

        out = load_json(report_only)
        write_outputs(out, out_dir)
        click.echo(f"wrote {out_dir}/results.md, results.png from {report_only}")
        return
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from bench import harness

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    known = {i.name: i for i in harness.default_impls(
        torch_max_gib if torch_max_gib is not None else (48.0 if dev.type == "cuda" else 1.0))}
    unknown = [i for i in impls if i not in known]
    if unknown:
        raise click.BadParameter(f"unknown implementations {unknown}; known: {list(known)}", param_hint="--impls")
    chosen = [known[i] for i in impls]
    if fla_Ds:
        fla_only = set(fla_Ds)
        for n, impl in enumerate(chosen):
            if impl.name.startswith("fla"):
                base = impl.unavailable

                def why(mode, row, d, base=base):
                    return f"FLA runs at D in {sorted(fla_only)} (--fla-D)" if row.D not in fla_only \
                        else base(mode, row, d)

                chosen[n] = dataclasses.replace(impl, unavailable=why)
    try:
        rows = harness.grid(modes, Ts, Ds, H, tokens, decode_batch, dtype)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    timing = harness.Timing(warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_reps=cpu_reps)
    console = Console(stderr=True)
    n_cells = len(rows) * len(chosen)
    argv = " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("side_by_side.py") else None
    meta = dict(argv=argv, modes=modes, Ts=Ts, Ds=Ds, H=H, tokens=tokens, decode_batch=decode_batch, dtype=dtype,
                budget_s=budget_s, timing=dataclasses.asdict(timing))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("cells", total=n_cells)
        done: list = []  # the results of earlier phases (--fla-last), and the first phase's meta
        first: dict = {}

        def merged(out):
            return harness.summarize(dict(out, meta=first["meta"], results=done + out["results"])) if done else out

        def on_cell(res, out):
            harness.save_json(merged(out), out_dir / "results.json")
            t = res.get("time_ms")
            line = (f"{res['mode']:7s} D={res['D']:<3} T={res['T']:<6} B={res['B']:<4} {res['impl']:13s} "
                    + (f"{t:9.4f} ms" if t is not None else "") + f" {res['status']}"
                    + (f" ({res['reason'][:90]})" if res.get("reason") and res["status"] != "skip" else ""))
            progress.console.print(line, highlight=False, markup=False)
            progress.update(task, advance=1, description=line[:40])
        start = time.perf_counter()
        for phase in _phases(chosen, fla_last):
            left = None if budget_s is None else budget_s - (time.perf_counter() - start)
            out = harness.run(rows, phase, dev, timing=timing, window=check_window, seed=seed, budget_s=left,
                              meta=meta, time_failures=time_failures, on_cell=on_cell)
            out = merged(out)
            first.setdefault("meta", out["meta"])
            done[:] = out["results"]
        out["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(out, out_dir, draw)

    table = Table(title=f"lintx vs the rest, median ms ({report.device_line(out['meta'])[:60]}...)")
    for col in ("mode", "D", "T", "B", "lintx ms", "speedup (alt / lintx)", "floor %", "check"):
        table.add_column(col)
    for r in out["results"]:
        if r["impl"] != "lintx":
            continue
        sp = ", ".join(f"{k} {v:.2f}" for k, v in r.get("speedup", {}).items())
        table.add_row(r["mode"], str(r["D"]), str(r["T"]), str(r["B"]),
                      f"{r['time_ms']:.4f}" if r.get("time_ms") is not None else r["status"], sp,
                      f"{100 * r['floor_frac']:.0f}" if r.get("floor_frac") is not None else "—",
                      f"{r.get('check_worst', float('nan')):.2g} {r['status']}")
    stdout = Console()
    if not stdout.is_terminal:
        stdout = Console(width=160)  # a log file: one line per row
    stdout.print(table)
    for t in out["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a (no GPU)"}[t["met"]]
        click.echo(f"target {t['mode']:7s} T={t['T']:<6} lintx {t['time_ms']:.4f} ms vs {t['target_ms']} ms: {met}")
    click.echo(f"wrote {out_dir}/results.json" + (", results.md, results.png" if draw else ""))
    if not out["ok"]:
        bad = [f"{r['mode']} T={r['T']} D={r['D']}: {r.get('reason')}" for r in out["results"]
               if r["impl"] == "lintx" and r["status"] in ("fail", "error")]
        click.echo("lintx failed its check:\n  " + "\n  ".join(bad), err=True)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
