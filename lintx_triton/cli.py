"""``lintx``: fuzz the kernels against the float64 reference, read the generated source, check the install.

    lintx fuzz --quick                                  # every kernel, map and dtype in a minute
    lintx fuzz --minutes 10 --map elu --dtype bf16      # property tests on this device (--device cuda)
    lintx emit --map relu --dtype fp16 --head-dim 64    # the generated Triton source
    lintx info --json                                   # versions, device, backend, config, cache
    lintx resources --dtype bf16 -D 128 --arch 90      # registers/spills/HGMMA of each kernel, no GPU
    lintx autotune --budget-minutes 9                  # tune on this GPU (python -m lintx_triton.autotune)

Also ``python -m lintx_triton ...``.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import click

from .spec import DTYPES, FAMILIES, MAX_TRITON_DIM, dtype_of, products_in_fp32, triton_limits

# every name of a dtype: bf16 or bfloat16 (lintx_triton.spec.DTYPES)
DTYPE_CHOICES = [n for d in DTYPES.values() for n in (d.short, d.name)]


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _import_modules(modules):
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise click.BadParameter(f"cannot import {name!r}: {e}", param_hint="--import") from None


def _check_maps(maps):
    from . import feature_maps

    known = feature_maps.available() + list(feature_maps.MAP_FAMILIES)
    bad = [m for m in maps if m not in known]
    if bad:
        raise click.BadParameter(f"unknown feature map(s) {bad}; registered: {known} "
                                 f"(register your own in a module and pass --import MODULE)", param_hint="--map")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lintx_triton")
def main():
    """lintx_triton's command line: fuzz, emit, info, resources, autotune."""


# ---------------------------------------------------------------- fuzz

# --quick: the covering set's examples stop this long after the process started; with Python's and torch's
# startup (~2.5 s), the last example and the table, `lintx fuzz --quick` ends within 60 s on a 2-core CPU
QUICK_SECONDS = 45.0
# --minutes / --quick in a `lintx` process: examples stop this long before the end, which the table and
# Python's exit take (a table of 432 rows 0.4 s, the teardown of torch and Triton 0.6-1.2 s on a 2-core CPU)
END_SECONDS = 1.5
# after a failure, hypothesis shrinks it for at most this long; then the smallest failing case so far is shown
SHRINK_SECONDS = 60.0
# examples per variant when neither --quick nor --minutes bounds the time
DEFAULT_EXAMPLES = 10
# at most this many per variant with --quick: the time the PyTorch path leaves goes to the interpreted kernels
QUICK_EXAMPLES = 20
# a draw predicted to take longer than this margin x its measured rate is left for a smaller one near the end
PREDICTION_MARGIN = 1.5
DECODE_T_VALUES = (1, 2, 5, 9)


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


# The outcomes of a variant. ok: every example within its bound. FAIL: the kernel is wrong (an output beyond
# its bound, or the op raised on a valid input); it comes with a reproducer. ERROR: the fuzzer or the
# environment broke (its strategy, inputs, reference or bound raised; hypothesis gave up; the device failed),
# which says nothing about the kernel. skipped: the variant has no meaning (the reason says why). not run: the
# time ran out before it.
STATUSES = ("ok", "FAIL", "ERROR", "skipped", "not run")


@dataclass
class Result:
    variant: Variant
    status: str = "not run"
    examples: int = 0
    worst: float = 0.0
    seconds: float = 0.0
    fault: str = ""  # FAIL: "mismatch" or "crash"; ERROR: "harness", "unsatisfiable" or "environment"
    error: str = ""  # one line
    detail: str = ""  # ERROR: the end of the traceback
    reason: str = ""  # skipped / not run
    case: dict | None = None
    snippet: str = ""


SNIPPET = '''\
# Reproduces a lintx fuzz failure: {label}, case {case_id}
import os
{interp}import torch
import lintx_triton as lx
from lintx_triton.testing import (call_kwargs, check_forward, check_grads, check_state, decode_steps,
                                  forward_and_grads, make_inputs)
{imports}
case = {case!r}
{body}'''

FORWARD_BODY = '''q, k, v, state = make_inputs(case, device={device!r})
o, final_state = lx.linear_attention(  # call_kwargs: the case's causal, normalize, scale and eps
    q, k, v, feature_map=case["feature_map"], initial_state=state, return_state=True, backend={backend!r},
    **call_kwargs(case),
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
    from .testing import case_id

    body = {"forward": FORWARD_BODY, "backward": BACKWARD_BODY, "decode": DECODE_BODY}[v.kernel]
    body = body.format(device=device, backend=v.backend)
    interp = 'os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton\'s interpreter\n' \
        if (device == "cpu" and v.backend == "triton") else ""
    imp = "".join(f"import {m}  # as lintx fuzz --import {m} did (maps, or a changed op)\n" for m in imports)
    return SNIPPET.format(label=v.label(), case_id=case_id(case), interp=interp, imports=imp, case=case, body=body)


class _Stop(BaseException):
    """Ends a variant's examples now (its time is up). Not an Exception: hypothesis lets it through unshrunk."""


class _HarnessFault(BaseException):
    """An exception of the fuzzer's own code (inputs, reference, bounds), carried out of hypothesis unshrunk."""

    def __init__(self, exc: BaseException, fault: str = "harness"):
        super().__init__(str(exc))
        self.exc, self.fault = exc, fault


def _environment_error(e: BaseException) -> bool:
    """The device, not the op: out of memory is the environment's fault, not the kernel's."""
    import torch

    return isinstance(e, torch.OutOfMemoryError)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _traceback_tail(e: BaseException, lines: int = 12) -> str:
    import traceback

    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-lines:]).rstrip()


def _representative_map(name: str):
    """The registered map, or a map of a random or learnable family (whose sign does not depend on the draw)."""
    from . import feature_maps

    if name in feature_maps.MAP_FAMILIES:
        return feature_maps.family_map(name, 8, 16)
    return feature_maps.get(name)


def _skip_reason(v: Variant) -> str:
    """Why a variant has no meaning ('' when it has one)."""
    from . import testing

    if v.kernel == "backward" and v.normalize:
        fm = _representative_map(v.feature_map)
        if testing.signed_map(fm) and testing.positive_den_inputs(fm) is None:
            # the gradients divide by den; where a signed den crosses 0 they have no first-order error bound,
            # and testing knows no inputs that keep this map's den positive
            return "signed map: its normalizer can cross 0, where normalized gradients have no error bound"
    return ""


def _covering(kernels, backends, maps, dtypes, norms, states) -> list[Variant]:
    """--quick: every kernel with every map once, the other axes turning so that each of their values appears.
    With the default axes: 18 variants, each dtype 6 times, flags and states 9 times, the second backend
    (torch, on a CPU) in a third of them, and the gradients of both signed maps normalized."""
    out = []
    for j, kernel in enumerate(kernels):
        for i, fmap in enumerate(maps):
            out.append(Variant(kernel, backends[(1 if (i + 2 * j) % 3 == 2 else 0) % len(backends)], fmap,
                               dtypes[(i + j) % len(dtypes)], norms[(i + j) % len(norms)],
                               states[(i + i // 3 + j) % len(states)]))
    # with few kernels and maps, a value the turning missed gets a variant of its own
    for axis, values in (("backend", backends), ("dtype", dtypes), ("normalize", norms), ("state", states)):
        for value in values:
            if all(getattr(v, axis) != value for v in out):
                out.append(dataclasses.replace(out[len(out) % (len(kernels) * len(maps))], **{axis: value}))
    return list({v.label(): v for v in out}.values())


def _run_order(variants: list[Variant], axes) -> list[Variant]:
    """The --quick set first, then the rest with the kernel turning fastest, then backend, map, dtype, flags."""
    first = _covering(*axes)
    seen = {v.label() for v in first}
    pos = [{x: n for n, x in enumerate(values)} for values in axes]
    fields = ("kernel", "backend", "feature_map", "dtype", "normalize", "state")
    rest = sorted((v for v in variants if v.label() not in seen),
                  key=lambda v: tuple(pos[i][getattr(v, f)] for i, f in reversed(list(enumerate(fields)))))
    return first + rest


class _Clock:
    """When a variant's examples stop, and how long a draw will take: the seconds per unit of work (programs x
    chunks, or decode steps x heads) measured so far for its kernel and backend, so that near the end a draw
    that cannot finish is left for a smaller one instead of running past the deadline."""

    def __init__(self, deadline):
        self.deadline = deadline
        self.rates: dict[tuple, list[float]] = {}

    @staticmethod
    def units(v: Variant, c: dict) -> int:
        heads = c["B"] * c["H"]
        return heads * c["T"] + c["T"] if v.kernel == "decode" else heads * (-(-c["T"] // 16) + 1)

    def observe(self, v: Variant, c: dict, seconds: float) -> None:
        rate = seconds / self.units(v, c)
        for key in ((v.kernel, v.backend, v.feature_map), (v.kernel, v.backend)):
            self.rates.setdefault(key, []).append(rate)

    def predict(self, v: Variant, c: dict) -> float:
        rates = self.rates.get((v.kernel, v.backend, v.feature_map)) or self.rates.get((v.kernel, v.backend))
        if not rates:
            return 0.0
        return PREDICTION_MARGIN * sorted(rates)[len(rates) // 2] * self.units(v, c)


def _run_variant(v: Variant, seed: int, device, imports, *, limit=None, examples=None, clock=None,
                 on_example=lambda res: None) -> Result:
    """Examples of one variant until ``examples`` of them ran or the time reaches ``limit`` (monotonic).

    The property runs in three phases, and where an exception comes from decides the outcome: building the
    inputs, and the reference with its bound, are the harness (ERROR, not shrunk); the call of the op is the
    kernel (FAIL: a crash of the op on a valid input is a kernel fault, shrunk like a mismatch); the check's
    EquivalenceError is a mismatch (FAIL)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Flaky, Unsatisfiable

    from . import api, testing

    res = Result(v)
    clock = clock or _Clock(None)
    failed: dict = {}  # the last failing case (the smallest so far while shrinking), its error and kind
    decode = v.kernel == "decode"
    # eps drawn as the tests draw it (a misplaced eps shows only away from 1e-6): in the case, its id and the
    # reproducer
    strategy = testing.cases(maps=(v.feature_map,), dtypes=(v.dtype,), normalize=v.normalize,
                             causal=True if (v.state or decode) else None, initial_state=v.state,
                             t_values=DECODE_T_VALUES if decode else testing.T_VALUES,
                             positive_den=v.kernel == "backward", eps_values=testing.EPS_VALUES)
    bounded = limit is not None

    def forward(c, inputs):
        q, k, v_, state = inputs
        if decode:
            return testing.decode_steps(c, q, k, v_, state, v.backend)
        return api.linear_attention(q, k, v_, feature_map=c["feature_map"], initial_state=state,
                                    return_state=True, backend=v.backend, **testing.call_kwargs(c))

    def check(c, inputs, out):
        if v.kernel == "backward":
            got, leaves, (do, dS, dz) = out
            want = testing.reference_grads(c, leaves, do, dS, dz)
            bounds = testing.grad_bound(c, leaves, do, dS, dz)
            return testing.check_grads(c, got, want, bounds, ["q", "k", "v", "S_0", "z_0"][: len(leaves)])
        q, k, v_, state = inputs
        o, st = out
        return max(testing.check_forward(c, o, q, k, v_, state), testing.check_state(c, st, q, k, v_, state))

    def fail(c, e, fault):
        if not failed:  # the example that failed first (the shrinking runs after it are not new examples)
            res.examples += 1
            failed["until"] = time.monotonic() + SHRINK_SECONDS
        failed.update(case=c, error=_one_line(e), fault=fault, worst=getattr(e, "worst", float("inf")))

    @settings(max_examples=10**6 if bounded else examples, deadline=None, database=None, print_blob=False,
              verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink))
    @hseed(seed)
    @given(c=strategy)
    def prop(c):
        now = time.monotonic()
        if not failed:
            # a variant's share of the time ends its examples, but its first may run past it (never past the
            # deadline), so that every variant the time reaches runs at least once
            end = ((clock.deadline or limit) if res.examples == 0 else limit) if bounded else None
            if (bounded and now >= end) or (examples is not None and res.examples >= examples):
                raise _Stop
            if bounded and clock.predict(v, c) > end - now:
                return  # this draw would not finish in time; a smaller one may
        elif now >= min(failed["until"], clock.deadline or failed["until"]):
            raise _Stop
        try:
            inputs = testing.make_inputs(c, requires_grad=v.kernel == "backward", device=device)
        except Exception as e:
            raise _HarnessFault(e) from e
        try:  # the op, on a valid input
            if v.kernel == "backward":
                out = testing.op_grads(c, v.backend, device, inputs=inputs)
            else:
                out = forward(c, inputs)
        except Exception as e:
            if _environment_error(e):
                raise _HarnessFault(e, "environment") from e
            fail(c, e, "crash")
            raise
        try:
            ratio = check(c, inputs, out)
        except testing.EquivalenceError as e:
            fail(c, e, "mismatch")
            raise
        except Exception as e:
            raise _HarnessFault(e) from e
        if not failed:  # shrinking runs are not new examples
            if res.examples:  # a variant's first example also generates and loads its kernels: not a rate
                clock.observe(v, c, time.monotonic() - now)
            res.examples += 1
            res.worst = max(res.worst, ratio)
            on_example(res)

    t0 = time.monotonic()
    try:
        prop()
    except _Stop:
        pass
    except _HarnessFault as h:
        res.status, res.fault, res.error, res.detail = "ERROR", h.fault, _one_line(h.exc), _traceback_tail(h.exc)
    except Unsatisfiable as e:
        res.status, res.fault, res.error = "ERROR", "unsatisfiable", _one_line(e)
    except Exception as e:  # the op's exception or the mismatch, replayed by hypothesis; or hypothesis itself
        if not failed:
            res.status, res.fault, res.error, res.detail = "ERROR", "harness", _one_line(e), _traceback_tail(e)
        elif isinstance(e, Flaky):
            failed["error"] += " (it did not fail again when replayed: the op is not deterministic)"
    res.seconds = time.monotonic() - t0
    if failed:  # a kernel fault outranks whatever the harness did next
        res.status, res.fault, res.error, res.case = "FAIL", failed["fault"], failed["error"], failed["case"]
        res.worst = max(res.worst, failed["worst"])
        res.snippet = _snippet(v, res.case, str(device), imports)
    elif res.status == "not run":
        if res.examples:
            res.status = "ok"
        elif bounded:
            res.reason = "out of time"
        else:
            res.status, res.fault, res.error = "ERROR", "harness", "hypothesis drew no example"
    return res


def _merge(acc: Result, one: Result) -> None:
    """Add a round of a variant into its total."""
    acc.examples += one.examples
    acc.worst = max(acc.worst, one.worst)
    acc.seconds += one.seconds
    if one.status in ("FAIL", "ERROR"):
        for f in ("status", "fault", "error", "detail", "case", "snippet"):
            setattr(acc, f, getattr(one, f))
    elif one.status == "ok":
        acc.status, acc.reason = "ok", ""
    elif acc.status == "not run":
        acc.reason = one.reason


def _fuzz_device(choice: str, backends):
    """The device to fuzz on; Triton's interpreter chosen (before any kernel is generated) for the CPU."""
    import torch

    cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET")
    if choice == "cuda" and not cuda:
        built = "this torch is built for the CPU only" if torch.version.cuda is None else \
            f"this torch is built for CUDA {torch.version.cuda}, but no GPU or driver is visible"
        raise click.UsageError(f"--device cuda: torch.cuda.is_available() is False ({built}); run it on a "
                               f"machine with an NVIDIA GPU, or fuzz Triton's interpreter with --device cpu")
    if choice == "cuda" or (choice == "auto" and cuda and interpret != "1"):
        if interpret == "1" and "triton" in backends:
            raise click.UsageError("--device cuda runs the Triton kernels compiled for the GPU, but "
                                   "TRITON_INTERPRET=1 asks for Triton's CPU interpreter: unset it")
        return torch.device("cuda")
    if "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel module is first generated
        if os.environ["TRITON_INTERPRET"] != "1":
            raise click.UsageError("the triton backend on a CPU needs TRITON_INTERPRET=1 (unset it only on a GPU)")
    return torch.device("cpu")


def _process_start() -> tuple[float, bool]:
    """(when the run began on time.monotonic()'s clock, whether the process ends with it). The start of the
    process when it was started as ``lintx`` / ``python -m lintx_triton`` (Linux), so that --minutes counts
    Python's and torch's startup as ``time lintx fuzz`` does; else now (a fuzz called inside a longer process,
    e.g. a test's CliRunner)."""
    now = time.monotonic()
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not (os.path.basename(argv0) == "lintx" or argv0.endswith(os.path.join("lintx_triton", "__main__.py"))):
        return now, False
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now, True
    return (now - age if 0 <= age < 120 else now), True


def _time_left_column(deadline):
    from rich.progress import ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class TimeLeft(ProgressColumn):
        """Time left: to the deadline of --minutes / --quick, else rich's estimate from the examples so far."""

        estimate = TimeRemainingColumn()

        def render(self, task):
            if deadline is None:
                return Text.assemble(self.estimate.render(task), (" left", "progress.remaining"))
            left = int(max(0.0, deadline - time.monotonic()))
            return Text(f"{left // 60}:{left % 60:02d} left", style="progress.remaining")

    return TimeLeft()


def _status_cell(r: Result) -> str:
    from rich.markup import escape

    if r.status == "ok":
        return "[green]ok[/green]"
    if r.status == "FAIL":
        return f"[red]FAIL[/red] ({r.fault})"
    if r.status == "ERROR":
        return f"[magenta]ERROR[/magenta] ({r.fault})"
    return f"[dim]{r.status}: {escape(r.reason)}[/dim]"


def _finite(x: float):
    return x if x == x and abs(x) != float("inf") else None


@main.command()
@click.option("--examples", "-n", type=click.IntRange(1), default=None,
              help=f"examples per variant (per round with --minutes) [default: {DEFAULT_EXAMPLES}; with --minutes, "
                   f"as many as fit in each variant's share of the time; with --quick, up to {QUICK_EXAMPLES}]")
@click.option("--minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="stop after this long, counted from the start of `lintx`: the time is shared out among the "
                   "variants, and a draw that cannot finish in it is not started")
@click.option("--quick", is_flag=True,
              help=f"a covering set (every kernel with every map; every dtype, backend, flag) in "
                   f"{QUICK_SECONDS:.0f} s of examples (a minute in all on a 2-core CPU)")
@click.option("--seed", default=0, show_default=True, help="seed of the first round")
@click.option("--map", "maps", multiple=True,
              help="feature map(s) [default: every registered map, the random-feature families favor, "
                   "favor_hyp, fourier and the learnable ones hedgehog, hedgehog_fla, t2r (a fresh D, M, draw and, "
                   "for learnable maps, heads and tying per example)]")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(sorted(DTYPE_CHOICES)),
              help="dtype(s) [default: all three]")
@click.option("--kernel", "kernels", multiple=True, type=click.Choice(FAMILIES),
              help="forward, backward and/or decode (the RNN-form step) [default: all]")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["triton", "torch"]),
              help="[default: triton on a GPU; triton (interpreter) and torch on a CPU]")
@click.option("--normalize/--raw", "normalize", default=None, help="only normalized / unnormalized variants")
@click.option("--state/--no-state", "state", default=None, help="only variants with / without an initial state")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="cuda: the compiled Triton kernels on the GPU; cpu: Triton's interpreter [auto: cuda when "
                   "torch sees a GPU and TRITON_INTERPRET is not 1]")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="import a module first (one that registers maps; the reproducers import it too)")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def fuzz(examples, minutes, quick, seed, maps, dtypes, kernels, backends, normalize, state, device, imports,
         as_json):
    """Property-test every kernel variant against the float64 reference on this device.

    Each variant (kernel: forward, backward or decode steps; x backend x map x dtype x normalize x
    initial state) draws random shapes
    (T = 1, chunk boundaries, primes; D and DV not powers of two), scale and the normalizer's eps
    (1e-6, 1e-3, 0.5: in the case id of a failure and its reproducer) and checks every output element,
    or gradient element, against a bound scaled by the magnitude of the terms it sums. The gradients of
    a normalized signed map (identity, fourier) are drawn on inputs that keep every term of the
    normalizer positive; a variant with no meaning is listed as skipped, with the reason.

    \b
    Each variant ends as:
      ok       every example within its bound
      FAIL     the kernel is wrong: an element beyond its bound, or the op raised on a valid input;
               shrunk to a minimal case, printed as a snippet that raises when run
      ERROR    the fuzzer or the environment broke (its inputs, reference or bound raised, hypothesis
               could not draw, the device ran out of memory): nothing is known of the kernel
      skipped  the variant has no meaning (the reason says why); not run: out of time
    Exit code: 0 when every variant that ran is ok, 1 on any FAIL, 2 on an ERROR without a FAIL.

    \b
    Examples:
      lintx fuzz --quick                       # every kernel, map and dtype in a minute
      lintx fuzz --minutes 10 --dtype bf16 --map elu --kernel backward
      lintx fuzz --device cuda --examples 50
      lintx fuzz --import mymaps --map softplus --json
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    t0, own_process = _process_start()
    _import_modules(imports)
    from . import feature_maps
    from .testing import case_id

    maps = maps or tuple(feature_maps.available()) + feature_maps.MAP_FAMILIES
    _check_maps(maps)
    dts = tuple(dict.fromkeys(dtype_of(d).name for d in dtypes)) or tuple(DTYPES)
    dev = _fuzz_device(device, backends or ("triton",))
    bks = tuple(dict.fromkeys(backends)) or (("triton",) if dev.type == "cuda" else ("triton", "torch"))
    norms = (normalize,) if normalize is not None else (True, False)
    states = (state,) if state is not None else (False, True)
    axes = (tuple(dict.fromkeys(kernels)) or FAMILIES, bks, tuple(dict.fromkeys(maps)), dts, norms, states)
    variants = _covering(*axes) if quick else [Variant(*x) for x in itertools.product(*axes)]

    results = {v.label(): Result(v) for v in variants}
    for r in results.values():
        r.reason = _skip_reason(r.variant)
        if r.reason:
            r.status = "skipped"
    # the order they run in: a run the time cuts short has seen every kernel, map and dtype first
    order = {v.label(): n for n, v in enumerate(variants if quick else _run_order(variants, axes))}
    runnable = sorted((r for r in results.values() if r.status != "skipped"), key=lambda r: order[r.variant.label()])
    budget = 60 * minutes if minutes else (QUICK_SECONDS if quick else None)
    deadline = t0 + budget - (END_SECONDS if own_process else 0.0) if budget else None
    cap = examples or (QUICK_EXAMPLES if quick else (None if deadline else DEFAULT_EXAMPLES))
    # --minutes with --examples: rounds of that many examples per variant, each with the next seed
    rounds = itertools.count() if (minutes and examples) else range(1)
    clock = _Clock(deadline)
    mode = "quick" if quick else ("minutes" if minutes else "examples")

    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"),
                  TimeElapsedColumn(), _time_left_column(deadline), console=err, transient=as_json) as progress:
        total = budget if deadline else len(runnable) * cap
        task = progress.add_task("fuzz", total=total, done="")
        finished = [0]

        def show(current: Result | None = None):
            n = sum(r.examples for r in results.values()) + (current.examples if current else 0)
            done = f"{finished[0]}/{len(runnable)} variants, {n} examples"
            progress.update(task, done=done, completed=(time.monotonic() - t0) if deadline else n)

        for rnd in rounds:
            todo = [r for r in runnable if r.status in ("ok", "not run")]
            for i, acc in enumerate(todo):
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                progress.update(task, description=f"{f'round {rnd} ' if rnd else ''}{acc.variant.label()}")
                show()
                limit = None if deadline is None else now + (deadline - now) / (len(todo) - i)
                one = _run_variant(acc.variant, seed + rnd, dev, imports, limit=limit, examples=cap, clock=clock,
                                   on_example=show)
                _merge(acc, one)
                finished[0] += rnd == 0
                show()
            if not todo or (deadline is not None and time.monotonic() >= deadline):
                break
    elapsed = time.monotonic() - t0
    for r in runnable:
        if r.status == "not run":
            r.reason = "out of time"

    counts = {s: sum(r.status == s for r in results.values()) for s in STATUSES}
    ran = sum(r.examples for r in results.values())
    none_ran = bool(runnable) and ran == 0 and not counts["FAIL"] and not counts["ERROR"]
    code = 1 if counts["FAIL"] else (2 if (counts["ERROR"] or none_ran) else 0)
    note = (f"no example ran: the time ran out first ({budget:.0f} s counted from the start of the process)"
            if none_ran else "")
    if as_json:
        click.echo(json.dumps({
            "device": str(dev), "seed": seed, "mode": mode, "examples_per_round": cap, "budget_s": budget,
            "elapsed_s": round(elapsed, 2), "exit_code": code, "counts": counts, "examples": ran, "note": note,
            "results": [dict(asdict(r.variant), status=r.status, fault=r.fault, examples=r.examples,
                             worst=_finite(r.worst), seconds=round(r.seconds, 2), error=r.error, detail=r.detail,
                             reason=r.reason, case=r.case, snippet=r.snippet) for r in results.values()],
        }, indent=1))
    else:
        out = Console(width=None if sys.stdout.isatty() else 120)
        what = f"{cap} examples per variant" if mode == "examples" else \
            (f"--quick, {budget:.0f} s" if quick and not minutes else f"{budget / 60:g} min")
        table = Table(title=f"lintx fuzz on {dev} ({what}, seed {seed}); worst = max |err| / (tol x bound), "
                            f"must be <= 1")
        for col in ("kernel", "backend", "map", "dtype", "normalize", "state", "examples", "worst", "status"):
            table.add_column(col, justify="right" if col in ("examples", "worst") else "left")
        for r in results.values():
            v = r.variant
            table.add_row(v.kernel, v.backend, v.feature_map, v.dtype, str(v.normalize), str(v.state),
                          str(r.examples), f"{r.worst:.3g}" if r.examples or r.status == "FAIL" else "-",
                          _status_cell(r))
        out.print(table)
        parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] or s in ("ok", "FAIL", "ERROR"))
        out.print(f"{len(results)} variants: {parts}; {ran} examples in {elapsed:.1f} s; exit code {code}")
        if note:
            out.print(f"[magenta]ERROR[/magenta] {note}")
        for r in results.values():
            if r.status == "FAIL":
                out.print(f"\n[red]FAIL[/red] ({r.fault}) {r.variant.label()} {case_id(r.case)}: {r.error}\n"
                          f"Minimal reproducer (raises when run):\n", highlight=False, soft_wrap=True)
                # soft_wrap: the lines as they are (the case dict is longer than a terminal), to copy and run
                out.print(r.snippet, markup=False, highlight=False, soft_wrap=True)
            elif r.status == "ERROR":
                out.print(f"\n[magenta]ERROR[/magenta] ({r.fault}) {r.variant.label()}: {r.error}\n"
                          f"(the fuzzer or the environment failed, not the kernel)", highlight=False)
                if r.detail:
                    out.print(r.detail, markup=False, highlight=False)
    sys.exit(code)


# ---------------------------------------------------------------- emit

def _spec_options(f):
    f = click.option("--map", "feature_map", default="elu", show_default=True,
                     help="feature map name, or a family with M features (default 2D): favor[:M], favor_hyp[:M], "
                          "fourier[:M], hedgehog[:M], hedgehog_fla[:M], t2r[:M]; or a polynomial family (M follows "
                          "from D): taylor, taylor_c")(f)
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
    if family in feature_maps.POLYNOMIAL_FAMILIES and m:
        raise click.BadParameter(f"a polynomial map's M follows from D: pass {family!r} without ':M'",
                                 param_hint="--map")
    if family in feature_maps.MAP_FAMILIES:  # a random-feature, learnable or polynomial map built for this D
        if m and not m.isdigit():
            raise click.BadParameter(f"M must be a positive integer, got {feature_map!r}", param_hint="--map")
        try:
            feature_map = feature_maps.family_map(family, head_dim, int(m) if m else 2 * head_dim).name
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--map") from None
    _check_maps([feature_map])
    dt = dtype_of(dtype).name
    if initial_state and not causal:
        raise click.BadParameter("an initial state needs --causal", param_hint="--initial-state")
    why = triton_limits(feature_maps.get(feature_map), head_dim, value_dim or head_dim)
    if why is not None:
        raise click.BadParameter(why, param_hint="--head-dim")
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
