"""``lintx``: fuzz the kernels against the float64 reference, read the generated source, check the install.

    lintx fuzz --examples 20 --map elu --dtype bf16     # property tests on this device
    lintx emit --map relu --dtype fp16 --head-dim 64    # the generated Triton source
    lintx info --json                                   # versions, device, backend, config, cache
    lintx resources --dtype bf16 -D 128 --arch 90      # registers/spills/HGMMA of each kernel, no GPU
    lintx autotune --budget-minutes 9                  # tune on this GPU (python -m lintx_triton.autotune)

Also ``python -m lintx_triton ...``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import click

from .spec import DTYPES, FAMILIES, MAX_TRITON_DIM, dtype_of, products_in_fp32

# every name of a dtype: bf16 or bfloat16 (lintx_triton.spec.DTYPES)
DTYPE_CHOICES = [n for d in DTYPES.values() for n in (d.short, d.name)]


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _prepare_cpu_interpreter():
    # Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the first
    # kernel is generated (Triton decides at decoration).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_modules(modules):
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise click.BadParameter(f"cannot import {name!r}: {e}", param_hint="--import") from None


def _check_maps(maps):
    from . import feature_maps

    known = feature_maps.available() + list(feature_maps.RANDOM_FAMILIES)
    bad = [m for m in maps if m not in known]
    if bad:
        raise click.BadParameter(f"unknown feature map(s) {bad}; registered: {known} "
                                 f"(register your own in a module and pass --import MODULE)", param_hint="--map")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lintx_triton")
def main():
    """lintx_triton's command line: fuzz, emit, info, resources, autotune."""


# ---------------------------------------------------------------- fuzz

@dataclass
class Variant:
    kernel: str
    backend: str
    feature_map: str
    dtype: str
    normalize: bool
    state: bool

    def label(self) -> str:
        return (f"{self.kernel}/{self.backend}/{self.feature_map}/{self.dtype}/"
                f"{'norm' if self.normalize else 'raw'}/{'state' if self.state else 'nostate'}")


@dataclass
class Result:
    variant: Variant
    examples: int = 0
    worst: float = 0.0
    status: str = "ok"
    error: str = ""
    case: dict | None = None
    snippet: str = ""


SNIPPET = '''\
# Reproduces a lintx fuzz failure: {label}
import os
{interp}import torch
import lintx_triton as lx
from lintx_triton.testing import check_forward, check_grads, check_state, decode_steps, forward_and_grads, make_inputs
{imports}
case = {case!r}
{body}'''

FORWARD_BODY = '''q, k, v, state = make_inputs(case, device={device!r})
o, final_state = lx.linear_attention(
    q, k, v, feature_map=case["feature_map"], causal=case["causal"], normalize=case["normalize"],
    scale=case["scale"], initial_state=state, return_state=True, backend={backend!r},
)
check_forward(case, o, q, k, v, state)  # raises lintx_triton.testing.EquivalenceError
check_state(case, final_state, q, k, v, state)
'''

DECODE_BODY = '''q, k, v, state = make_inputs(case, device={device!r})
o, final_state = decode_steps(case, q, k, v, state, {backend!r})  # one token at a time
check_forward(case, o, q, k, v, state)  # raises lintx_triton.testing.EquivalenceError
check_state(case, final_state, q, k, v, state)
'''

BACKWARD_BODY = '''got, want, bounds, names = forward_and_grads(case, {backend!r}, device={device!r})
check_grads(case, got, want, bounds, names)  # raises lintx_triton.testing.EquivalenceError
'''


def _snippet(v: Variant, case: dict, device: str, imports) -> str:
    body = {"forward": FORWARD_BODY, "backward": BACKWARD_BODY, "decode": DECODE_BODY}[v.kernel]
    body = body.format(device=device, backend=v.backend)
    interp = 'os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton\'s interpreter\n' \
        if (device == "cpu" and v.backend == "triton") else ""
    imp = "".join(f"import {m}  # registers feature maps\n" for m in imports)
    return SNIPPET.format(label=v.label(), interp=interp, imports=imp, case=case, body=body)


def _run_variant(v: Variant, examples: int, seed: int, device, imports) -> Result:
    from hypothesis import HealthCheck, Phase, assume, given, settings
    from hypothesis import seed as hseed

    from . import api, testing

    res = Result(v)
    last: dict = {}
    decode = v.kernel == "decode"
    strategy = testing.cases(maps=(v.feature_map,), dtypes=(v.dtype,), normalize=v.normalize,
                             causal=True if (v.state or decode) else None, initial_state=v.state,
                             t_values=(1, 2, 5, 9) if decode else testing.T_VALUES)

    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink))
    @hseed(seed)
    @given(c=strategy)
    def prop(c):
        # identity + normalize: a signed normalizer through 0 makes its gradient ill-conditioned
        assume(not (v.kernel == "backward" and c["feature_map"] == "identity" and c["normalize"]))
        last["case"] = c
        if v.kernel == "forward":
            q, k, v_, state = testing.make_inputs(c, device=device)
            o, st = api.linear_attention(q, k, v_, feature_map=c["feature_map"], causal=c["causal"],
                                         normalize=c["normalize"], scale=c["scale"], initial_state=state,
                                         return_state=True, backend=v.backend)
            ratio = max(testing.check_forward(c, o, q, k, v_, state), testing.check_state(c, st, q, k, v_, state))
        elif decode:
            q, k, v_, state = testing.make_inputs(c, device=device)
            o, st = testing.decode_steps(c, q, k, v_, state, v.backend)
            ratio = max(testing.check_forward(c, o, q, k, v_, state), testing.check_state(c, st, q, k, v_, state))
        else:
            got, want, bounds, names = testing.forward_and_grads(c, v.backend, device=device)
            ratio = testing.check_grads(c, got, want, bounds, names)
        res.examples += 1
        res.worst = max(res.worst, ratio)

    try:
        prop()
    except Exception as e:  # a failure, shrunk by hypothesis; its last run was the minimal case
        res.status = "FAIL"
        res.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        res.case = last.get("case")
        res.worst = max(res.worst, getattr(e, "worst", float("inf")))
        if res.case is not None:
            res.snippet = _snippet(v, res.case, str(device), imports)
    return res


@main.command()
@click.option("--examples", "-n", default=10, show_default=True, help="examples per variant (per round)")
@click.option("--minutes", type=float, default=None, help="keep running rounds with new seeds for this long")
@click.option("--seed", default=0, show_default=True, help="seed of the first round")
@click.option("--map", "maps", multiple=True,
              help="feature map(s) [default: every registered map, and the random-feature families favor, "
                   "favor_hyp, fourier (a fresh D, M and draw per example)]")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(sorted(DTYPE_CHOICES)),
              help="dtype(s) [default: all three]")
@click.option("--kernel", "kernels", multiple=True, type=click.Choice(FAMILIES),
              help="forward, backward and/or decode (the RNN-form step) [default: all]")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["triton", "torch"]),
              help="[default: triton on a GPU; triton (interpreter) and torch on a CPU]")
@click.option("--normalize/--raw", "normalize", default=None, help="only normalized / unnormalized variants")
@click.option("--state/--no-state", "state", default=None, help="only variants with / without an initial state")
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="import a module that registers maps")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def fuzz(examples, minutes, seed, maps, dtypes, kernels, backends, normalize, state, imports, as_json):
    """Property-test every kernel variant against the float64 reference on this device.

    Each variant (kernel: forward, backward or decode steps; x backend x map x dtype x normalize x
    initial state) draws random shapes
    (T = 1, chunk boundaries, primes; D and DV not powers of two) and checks every output element,
    or gradient element, against a bound scaled by the magnitude of the terms it sums. A failure is
    shrunk to a minimal case and printed as a Python snippet that reproduces it; the exit code is 1.

    \b
    Examples:
      lintx fuzz --examples 20
      lintx fuzz --minutes 10 --dtype bf16 --map elu --kernel backward
      lintx fuzz --import mymaps --map softplus --json
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    _prepare_cpu_interpreter()
    _import_modules(imports)
    from . import feature_maps

    maps = maps or tuple(feature_maps.available()) + tuple(feature_maps.RANDOM_FAMILIES)
    _check_maps(maps)
    if examples < 1:
        raise click.BadParameter("must be >= 1", param_hint="--examples")
    device = _device()
    dts = tuple(dict.fromkeys(dtype_of(d).name for d in dtypes)) or tuple(DTYPES)
    bks = backends or (("triton",) if device.type == "cuda" else ("triton", "torch"))
    if "triton" in bks and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise click.UsageError("the triton backend on a CPU needs TRITON_INTERPRET=1 (unset it only on a GPU)")
    norms = (normalize,) if normalize is not None else (True, False)
    states = (state,) if state is not None else (False, True)
    variants = [Variant(*x) for x in itertools.product(kernels or FAMILIES, bks, maps, dts, norms, states)]

    err = Console(stderr=True)
    results = {v.label(): Result(v) for v in variants}
    deadline = time.monotonic() + 60 * minutes if minutes else None
    rounds = itertools.count() if deadline else range(1)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=as_json) as progress:
        task = progress.add_task("fuzz", total=None if deadline else len(variants))
        for r in rounds:
            for v in variants:
                if deadline and time.monotonic() > deadline:
                    break
                acc = results[v.label()]
                if acc.status == "FAIL":
                    continue
                progress.update(task, description=f"round {r} {v.label()}")
                one = _run_variant(v, examples, seed + r, device, imports)
                acc.examples += one.examples
                acc.worst = max(acc.worst, one.worst)
                if one.status == "FAIL":
                    acc.status, acc.error, acc.case, acc.snippet = one.status, one.error, one.case, one.snippet
                progress.advance(task)
            else:
                continue
            break

    failed = [r for r in results.values() if r.status == "FAIL"]
    if as_json:
        click.echo(json.dumps({
            "device": str(device), "seed": seed, "examples_per_round": examples,
            "results": [dict(asdict(r.variant), examples=r.examples, worst=r.worst, status=r.status,
                             error=r.error, case=r.case, snippet=r.snippet) for r in results.values()],
        }, indent=1))
    else:
        out = Console(width=None if sys.stdout.isatty() else 120)
        table = Table(title=f"lintx fuzz on {device} (seed {seed}); worst = max |err| / (tol x bound), must be <= 1")
        for col in ("kernel", "backend", "map", "dtype", "normalize", "state", "examples", "worst", "status"):
            table.add_column(col, justify="right" if col in ("examples", "worst") else "left")
        for r in results.values():
            v = r.variant
            table.add_row(v.kernel, v.backend, v.feature_map, v.dtype, str(v.normalize), str(v.state),
                          str(r.examples), f"{r.worst:.3g}",
                          "[red]FAIL[/red]" if r.status == "FAIL" else "[green]ok[/green]")
        out.print(table)
        for r in failed:
            out.print(f"\n[red]FAIL[/red] {r.variant.label()}: {r.error}\nMinimal reproducer:\n")
            out.print(r.snippet, markup=False, highlight=False)
    sys.exit(1 if failed else 0)


# ---------------------------------------------------------------- emit

def _spec_options(f):
    f = click.option("--map", "feature_map", default="elu", show_default=True,
                     help="feature map name, or favor[:M] / favor_hyp[:M] / fourier[:M] (M features, default 2D)")(f)
    f = click.option("--causal/--full", default=True, show_default=True)(f)
    f = click.option("--normalize/--raw", default=True, show_default=True)(f)
    f = click.option("--dtype", default="bf16", show_default=True, type=click.Choice(sorted(DTYPE_CHOICES)))(f)
    f = click.option("--head-dim", "-D", default=64, show_default=True, type=click.IntRange(1, MAX_TRITON_DIM), help="D")(f)
    f = click.option("--value-dim", "-DV", "value_dim", default=None, type=click.IntRange(1, MAX_TRITON_DIM),
                     help="DV [default: D]")(f)
    f = click.option("--import", "imports", multiple=True, metavar="MODULE",
                     help="import a module that registers maps")(f)
    return f


def _make_spec(feature_map, causal, normalize, dtype, head_dim, value_dim, initial_state=False):
    from . import feature_maps
    from .config import interpreting
    from .spec import KernelSpec

    family, _, m = feature_map.partition(":")
    if family in feature_maps.RANDOM_FAMILIES:  # a random-feature map built for this D
        if m and not m.isdigit():
            raise click.BadParameter(f"M must be a positive integer, got {feature_map!r}", param_hint="--map")
        try:
            feature_map = feature_maps.RANDOM_FAMILIES[family](head_dim, int(m) if m else 2 * head_dim, 0).name
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--map") from None
    _check_maps([feature_map])
    dt = dtype_of(dtype).name
    if initial_state and not causal:
        raise click.BadParameter("an initial state needs --causal", param_hint="--initial-state")
    return KernelSpec(
        feature_map=feature_maps.get(feature_map).name, causal=causal, normalize=normalize, dtype=dt,
        head_dim=head_dim, value_dim=value_dim or head_dim, has_initial_state=initial_state,
        dot_fp32=products_in_fp32(dt, interpreting()),
    )


@main.command()
@_spec_options
@click.option("--initial-state", is_flag=True, help="the variant that reads (S_0, z_0)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="write <tag>.py into this folder")
def emit(feature_map, causal, normalize, dtype, head_dim, value_dim, imports, initial_state, out):
    """Print the generated Triton source of a kernel variant (or write it to a folder).

    \b
    Examples:
      lintx emit --map elu --dtype bf16 -D 64
      lintx emit --map relu --full --raw --dtype fp32 -D 48 -DV 80 --out kernels/
    """
    from .codegen import render, source_path

    _import_modules(imports)
    spec = _make_spec(feature_map, causal, normalize, dtype, head_dim, value_dim, initial_state)
    src = render(spec)
    cached = source_path(spec)
    where = f"cache: {cached} ({'present' if cached.exists() else 'written at the first call'})"
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{spec.tag()}.py")
        with open(path, "w") as f:
            f.write(src)
        click.echo(f"wrote {path}\n{where}")
    else:
        click.echo(src, nl=False)
        click.echo(where, err=True)


# ---------------------------------------------------------------- info

@main.command()
@_spec_options
@click.option("--batch", "-B", default=1, show_default=True, type=click.IntRange(1))
@click.option("--heads", "-H", default=16, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", "-T", default=4096, show_default=True, type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True)
def info(feature_map, causal, normalize, dtype, head_dim, value_dim, imports, batch, heads, seq_len, as_json):
    """Versions, the device, the backend `auto` picks, the config a shape would use, the kernel cache.

    \b
    Examples:
      lintx info
      lintx info -B 8 -T 1024 -H 16 -D 128 --dtype bf16 --json
    """
    import torch
    import triton

    from . import __version__
    from .codegen import cache_dir
    from .config import config_for, interpreting, search_order

    _import_modules(imports)
    device = _device()
    spec = _make_spec(feature_map, causal, normalize, dtype, head_dim, value_dim)
    cfg = config_for(spec, batch * heads, seq_len, device)
    kdir = cache_dir()
    data = {
        "lintx_triton": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if device.type == "cuda" else None,
        "triton_interpret": interpreting(),
        "auto_backend": "triton" if (device.type == "cuda" or interpreting()) else "torch",
        "shape": dict(B=batch, T=seq_len, H=heads, D=head_dim, DV=value_dim or head_dim, dtype=spec.dtype,
                      feature_map=spec.feature_map),
        "config": {k: v for k, v in asdict(cfg).items() if k != "source"},
        "config_source": cfg.source,
        "config_search": search_order(),
        "kernel_cache": str(kdir),
        "cached_kernels": len(list(kdir.glob("*.py"))) if kdir.exists() else 0,
    }
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title="lintx info")
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    Console(width=None if sys.stdout.isatty() else 120).print(table)


# ---------------------------------------------------------------- resources

@main.command()
@_spec_options
@click.option("--arch", default=90, show_default=True, type=click.Choice(["80", "90", "100"]), help="sm_ARCH")
@click.option("--sm-count", default=132, show_default=True, type=click.IntRange(1),
              help="multiprocessors, for the default config's choice of path")
@click.option("--json", "as_json", is_flag=True)
def resources(feature_map, causal, normalize, dtype, head_dim, value_dim, imports, arch, sm_count, as_json):
    """Compile every kernel of a variant for a GPU target on this machine (no GPU needed) and report
    registers, stack, spill instructions (LDL/STL), shared memory, HGMMA/HMMA counts and occupancy.

    \b
    Examples:
      lintx resources --dtype bf16 -D 64
      lintx resources --map relu --dtype fp16 -D 128 --arch 80 --json
    """
    # compiling for a target: the kernels must not be decorated for the interpreter
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    from .compile_report import variant_report
    from .config import gpu_heuristic

    _import_modules(imports)
    spec = _make_spec(feature_map, causal, normalize, dtype, head_dim, value_dim)
    cfg = gpu_heuristic(spec, batch_heads=4 * sm_count, sm_count=sm_count, arch=int(arch))
    rows = variant_report(spec, cfg, arch=int(arch))
    if as_json:
        click.echo(json.dumps({"spec": asdict(spec), "arch": int(arch), "triton": triton.__version__,
                               "config": {k: v for k, v in asdict(cfg).items()}, "kernels": rows}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.tag()} on sm_{arch} (Triton {triton.__version__}, compiled on this machine)")
    cols = ("stage", "BT", "BV", "num_warps", "registers", "stack", "spill_loads", "spill_stores", "shared",
            "hgmma", "hmma", "blocks_per_sm")
    for col in cols:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols), style="red" if r["spills"] else None)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


# ---------------------------------------------------------------- autotune

@main.command(name="autotune", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def autotune_command(args):
    """Tune the kernels on this GPU and write autotune/configs/<gpu>/<kernel>.json (see --help).

    The offline tuner ``lintx_triton.autotune``, also ``python -m lintx_triton.autotune``.
    """
    from .autotune.cli import autotune

    autotune.main(args=list(args), prog_name="lintx autotune")


if __name__ == "__main__":
    main()
