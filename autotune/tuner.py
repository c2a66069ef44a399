"""The tuning loop: a grid of (kernel, spec, shape) tasks, candidates pruned, checked, timed; files written.

For each task: candidates (:mod:`.space`) are pruned by a tile-size estimate, then by what they
compile to for the device (:mod:`.prune`, once per kernel and spec); each survivor passes the
float64 reference check once per kernel and spec, then, at the task's shape, must be about as close
to the PyTorch path as the closest candidate before its median time counts (:mod:`.measure`).
Compile errors and out-of-resources are recorded, not fatal.

Every verdict and time is appended to a journal (JSON lines) as it is made: an interrupted run started
again skips what the journal holds. Each finished task updates ``<out>/<gpu>/<kernel>.json``
(:func:`lintx_triton.tuned_configs.validate_config_file` is its schema), one entry per line so that diffs read
well; a run stopped by its time budget writes the best so far with ``"complete": false``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lintx_triton
from lintx_triton import feature_maps
from lintx_triton.codegen import cache_dir
from lintx_triton.config import Config, gpu_heuristic
from lintx_triton.spec import FAMILIES, GENERATOR_VERSION, KernelSpec, dtype_of
from lintx_triton.tuned_configs import SCHEMA_VERSION, Bucket, gpu_key, validate_config_file

from . import measure
from .measure import FUDGE, Timer, Workload, reference_check
from .prune import MAX_SPILLS, describe_error, prune_by_compile
from .space import DeviceLimits, candidates, estimate_fits, kernel_fields

__all__ = [
    "DEFAULT_GRID",
    "Grid",
    "Task",
    "TaskResult",
    "default_journal",
    "environment",
    "spec_of",
    "tune",
    "write_config_file",
]


def spec_of(feature_map: str, causal: bool, normalize: bool, dtype: str, head_dim: int, value_dim: int,
            initial_state: bool = False) -> KernelSpec:
    """The spec a call with these settings builds (the products' precision as the op picks it)."""
    from lintx_triton.ops.custom import make_spec

    meta = lambda d: torch.empty(0, 0, 0, d, dtype=dtype_of(dtype).torch, device="meta")  # noqa: E731
    return make_spec(map_name(feature_map, head_dim), meta(head_dim), meta(value_dim), causal, normalize,
                     initial_state)


def map_name(feature_map: str, head_dim: int) -> str:
    """A registered map's name, or ``family[:M]`` (a random or learnable family, M default 2D) built for
    ``head_dim`` and registered: a learnable map tunes like any other (its parameters are runtime arguments;
    the backward's timing includes their gradients)."""
    family, _, m = feature_map.partition(":")
    if family in feature_maps.MAP_FAMILIES:
        if m and not m.isdigit():
            raise ValueError(f"M must be a positive integer, got {feature_map!r}")
        return feature_maps.family_map(family, head_dim, int(m) if m else 2 * head_dim).name
    return feature_maps.get(feature_map).name


@dataclass(frozen=True)
class Task:
    """One tuned bucket: a kernel of a spec at (B*H, T) (T = 1 for decode)."""

    kernel: str
    spec: KernelSpec
    batch_heads: int
    T: int

    @property
    def bucket(self) -> Bucket:
        return Bucket.of(self.spec, self.batch_heads, self.T)

    def label(self) -> str:
        T = "" if self.kernel == "decode" else f" T={self.T}"
        return f"{self.kernel} {self.spec.tag()} B*H={self.batch_heads}{T}"


@dataclass(frozen=True)
class Grid:
    """The tasks of a tuning run: kernels x specs x shapes.

    Args:
        kernels: any of ``"forward"``, ``"backward"``, ``"decode"``.
        feature_maps, dtypes, dims ((D, DV) pairs), causal, normalize, initial_state: the specs.
        shapes: (B*H, T) of the forward and backward.
        decode_batch_heads: B*H of the decode step.
    """

    kernels: tuple[str, ...] = FAMILIES
    feature_maps: tuple[str, ...] = ("elu",)
    dtypes: tuple[str, ...] = ("bfloat16",)
    dims: tuple[tuple[int, int], ...] = ((64, 64), (128, 128))
    causal: tuple[bool, ...] = (True,)
    normalize: tuple[bool, ...] = (True,)
    initial_state: tuple[bool, ...] = (False,)
    # H = 16 and B*T = 32768 tokens at T = 1k, 4k, 16k: the shapes of shared/anchors/h200.md
    shapes: tuple[tuple[int, int], ...] = ((512, 1024), (128, 4096), (32, 16384))
    decode_batch_heads: tuple[int, ...] = (64, 256, 1024)

    def __post_init__(self):
        bad = set(self.kernels) - set(FAMILIES)
        if bad:
            raise ValueError(f"kernels must be among {FAMILIES}, got {sorted(bad)}")
        for m in self.feature_maps:
            if m.partition(":")[0] not in feature_maps.MAP_FAMILIES:
                feature_maps.get(m)  # raises on an unknown map
        if any(bh < 1 or T < 1 for bh, T in self.shapes) or any(bh < 1 for bh in self.decode_batch_heads):
            raise ValueError(f"B*H and T must be >= 1, got shapes {self.shapes}, decode {self.decode_batch_heads}")

    def tasks(self) -> list[Task]:
        """Spec by spec (a run cut short by its budget has finished the first specs whole)."""
        out = []
        for dtype in self.dtypes:
            for D, DV in self.dims:
                for fm in self.feature_maps:
                    for causal in self.causal:
                        for norm in self.normalize:
                            for h0 in self.initial_state:
                                if h0 and not causal:
                                    continue
                                spec = spec_of(fm, causal, norm, dtype, D, DV, h0)
                                for kernel in self.kernels:
                                    if kernel == "decode":
                                        if causal and not h0:  # the step is causal and carries its own state
                                            out += [Task(kernel, spec, bh, 1) for bh in self.decode_batch_heads]
                                    else:
                                        out += [Task(kernel, spec, bh, T) for bh, T in self.shapes]
        return out


DEFAULT_GRID = Grid()


@dataclass
class TaskResult:
    """What became of one task's candidates."""

    task: Task
    outcomes: dict = field(default_factory=dict)  # candidate key -> record
    base_key: tuple = ()
    complete: bool = False

    def best(self) -> dict | None:
        ok = [r for r in self.outcomes.values() if r["status"] == "ok" and r.get("ms") is not None]
        return min(ok, key=lambda r: r["ms"]) if ok else None

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.outcomes.values())


def environment(gpu: str) -> dict:
    """What a journal record is only valid under."""
    import triton

    return dict(gpu=gpu, triton=triton.__version__, torch=torch.__version__, lintx_triton=lintx_triton.__version__,
                generator_version=GENERATOR_VERSION)


def default_journal(gpu: str) -> Path:
    return cache_dir().parent / "autotune" / f"{gpu_key(gpu)}.jsonl"


def _ckey(kernel: str, cfg: Config | dict) -> str:
    fields = cfg if isinstance(cfg, dict) else kernel_fields(kernel, cfg)
    return json.dumps(fields, sort_keys=True)


def _skey(spec: KernelSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


class Journal:
    """Append-only JSON lines: ``verdict`` records (pruning and the reference check, per kernel, spec, config),
    ``distance`` and ``time`` records (per kernel, bucket, config); lines from another environment are
    ignored."""

    def __init__(self, path: Path | None, env: dict, fresh: bool = False):
        self.path, self.env = path, env
        self.verdicts: dict = {}
        self.distances: dict = {}
        self.times: dict = {}
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut by an interruption
                    continue
                if r.get("env") == env:
                    self._index(r)

    def _index(self, r: dict) -> None:
        if r["kind"] == "verdict":
            self.verdicts[(r["kernel"], r["spec"], r["config"])] = r
        else:
            table = self.distances if r["kind"] == "distance" else self.times
            table[(r["kernel"], r["bucket"], r["config"])] = r

    def add(self, **r) -> dict:
        r = dict(r, env=self.env)
        self._index(r)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        return r


def _entry(res: TaskResult) -> dict | None:
    best = res.best()
    if best is None:
        return None
    base = res.outcomes.get(res.base_key)
    return dict(bucket=dataclasses.asdict(res.task.bucket), config=json.loads(best["config"]), ms=round(best["ms"], 6),
                heuristic_ms=round(base["ms"], 6) if base and base["status"] == "ok" else None,
                candidates=len(res.outcomes), pruned=res.count("pruned"), rejected=res.count("rejected"),
                failed=res.count("failed"), complete=res.complete)


def write_config_file(path: Path, header: dict, entries: Iterable[dict]) -> dict:
    """Merge ``entries`` into the file at ``path`` (a bucket's new entry replaces its old one; the file's
    other buckets stay when it was tuned in the same environment) and write it, one entry per line."""
    path = Path(path)
    merged = {}
    if path.exists():
        try:
            old = validate_config_file(json.loads(path.read_text()))
        except (ValueError, TypeError):
            old = None
        same = old is not None and all(old.get(k) == header.get(k) for k in ("kernel", "gpu", "triton", "torch",
                                                                              "generator_version"))
        if same:
            merged = {json.dumps(e["bucket"], sort_keys=True): e for e in old["entries"]}
    for e in entries:
        merged[json.dumps(e["bucket"], sort_keys=True)] = e
    data = dict(schema=SCHEMA_VERSION, **header, entries=[merged[k] for k in sorted(merged)])
    validate_config_file(data)
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in data.items() if k != "entries"]
    lines += [' "entries": ['] + [f"  {json.dumps(e, sort_keys=True)}," for e in data["entries"]]
    if data["entries"]:
        lines[-1] = lines[-1][:-1]
    lines += [" ]", "}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return data


class _Budget(Exception):
    pass


def tune(grid: Grid | Iterable[Task] = DEFAULT_GRID, *, out_dir: str | os.PathLike, space: str | dict = "default",
         timer: Timer | None = None, device=None, limits: DeviceLimits | None = None,
         capability: tuple[int, int] | None = None, journal: str | os.PathLike | None = None, fresh: bool = False,
         budget_minutes: float | None = None, prune_compile: bool = True, max_spills: int = MAX_SPILLS,
         workers: int | None = None, dry_run: bool = False, console=None) -> list[TaskResult]:
    """Tune every task of ``grid`` and write ``<out_dir>/<gpu>/<kernel>.json``.

    Args:
        grid: a :class:`Grid` or a list of :class:`Task`.
        out_dir: where the per-GPU folders go (``autotune/configs`` ships them).
        space: ``"default"``, ``"full"``, ``"online"`` or a dict like :data:`.space.SPACES` values.
        timer: ``(fn, config) -> ms``; default :func:`.measure.bench_timer` (needs a GPU).
        device: where the kernels run; default the current CUDA device.
        limits: the device's limits; default read from ``device`` (needs a GPU).
        capability: written to the files; default ``limits.capability``.
        journal: the resume file; default ``$LINTX_TRITON_CACHE_DIR/autotune/<gpu>.jsonl``; ``fresh`` drops it.
        budget_minutes: stop starting candidates after this long; write the best so far.
        prune_compile: prune by compiling for ``sm_<limits.arch>`` on the CPU (in a child process).
        max_spills: spill instructions a candidate may compile to.
        workers: processes compiling in parallel (default: the CPUs less one).
        dry_run: generate and prune only: no kernel runs, nothing written.
        console: a ``rich.console.Console`` for the progress bar (default: stderr).

    Returns one :class:`TaskResult` per task.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks = grid.tasks() if isinstance(grid, Grid) else list(grid)
    device = torch.device(device) if device is not None else torch.device("cuda") if torch.cuda.is_available() else None
    if not dry_run:
        if device is None:
            raise ValueError("tuning runs the kernels: it needs a CUDA device (or, with TRITON_INTERPRET=1, "
                             "device='cpu' and an injected timer); use dry_run=True to only prune")
        if timer is None:
            if device.type != "cuda":
                raise ValueError(f"do_bench times CUDA kernels; on {device} pass a timer=")
            timer = measure.bench_timer
    if limits is None:
        if device is None or device.type != "cuda":
            raise ValueError("without a GPU, pass limits=DeviceLimits.for_arch(90) (the target to prune for)")
        limits = DeviceLimits.from_device(device.index or 0)
    capability = capability or limits.capability
    env = environment(limits.name)
    jpath = None if dry_run else Path(journal) if journal is not None else default_journal(limits.name)
    jr = Journal(jpath, env, fresh=fresh)
    deadline = time.monotonic() + 60 * budget_minutes if budget_minutes else None
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    header = dict(gpu=limits.name, compute_capability=f"{capability[0]}.{capability[1]}", triton=env["triton"],
                  torch=env["torch"], lintx_triton=env["lintx_triton"], generator_version=GENERATOR_VERSION)

    plans = []
    for t in tasks:
        base = gpu_heuristic(t.spec, t.batch_heads, limits.sm_count, arch=limits.arch)
        base = dataclasses.replace(base, source="heuristic")
        plans.append((t, base, candidates(t.kernel, t.spec, base, space)))
    results, workloads = [], {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bar = progress.add_task("autotune", total=sum(len(c) for _, _, c in plans))
        try:
            for t, base, cands in plans:
                res = TaskResult(t, base_key=_ckey(t.kernel, base))
                results.append(res)
                progress.update(bar, description=t.label())
                _verdicts(t, base, cands, jr, limits, prune_compile, max_spills, workers, device, dry_run, progress,
                          deadline)
                live = []
                for cfg in cands:
                    v = jr.verdicts[(t.kernel, _skey(t.spec), _ckey(t.kernel, cfg))]
                    if v["status"] == "ok" and not dry_run:
                        live.append(cfg)
                    else:
                        res.outcomes[_ckey(t.kernel, cfg)] = dict(v, ms=None)
                        progress.advance(bar)
                for ck, outcome in _timed(t, live, jr, timer, workloads, device, deadline):
                    res.outcomes[ck] = outcome
                    progress.advance(bar)
                res.complete = True
                if not dry_run:
                    _write(out_dir, header, res)
        except _Budget:
            console.print(f"[yellow]time budget of {budget_minutes} min spent: writing the best so far; run again "
                          f"to resume[/yellow]")
            if not dry_run and results:
                _write(out_dir, header, results[-1])
    return results


def _write(out_dir: Path, header: dict, res: TaskResult) -> None:
    e = _entry(res)
    if e is not None:
        kernel = res.task.kernel
        write_config_file(out_dir / gpu_key(header["gpu"]) / f"{kernel}.json", dict(kernel=kernel, **header), [e])


def _check_budget(deadline) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _Budget


def _verdicts(t: Task, base: Config, cands: list[Config], jr: Journal, limits: DeviceLimits, prune_compile: bool,
              max_spills: int, workers, device, dry_run: bool, progress, deadline) -> None:
    """Prune (estimate, then compile) and reference-check every candidate of ``t`` not yet in the journal."""
    sk = _skey(t.spec)
    todo = [c for c in cands if (t.kernel, sk, _ckey(t.kernel, c)) not in jr.verdicts]
    if not todo:
        return
    add = lambda cfg, status, reason, **kw: jr.add(kind="verdict", kernel=t.kernel, spec=sk,  # noqa: E731
                                                   config=_ckey(t.kernel, cfg), status=status, reason=reason, **kw)
    base_key = _ckey(t.kernel, base)
    survivors = []
    for cfg in todo:
        why = None if _ckey(t.kernel, cfg) == base_key else estimate_fits(t.kernel, t.spec, cfg, limits)
        if why:
            add(cfg, "pruned", why)
        else:
            survivors.append(cfg)
    if prune_compile and survivors:
        progress.console.print(f"compiling {len(survivors)} {t.kernel} candidates of {t.spec.tag()} for "
                               f"sm_{limits.arch} to prune them")
        verdicts = prune_by_compile(t.spec, t.kernel, survivors, limits, max_spills, workers)
        kept = []
        for cfg, (why, summary) in zip(survivors, verdicts):
            if why and _ckey(t.kernel, cfg) != base_key:  # the default is timed whatever it compiles to
                add(cfg, "pruned", why, resources=summary)
            else:
                kept.append((cfg, summary))
    else:
        kept = [(cfg, None) for cfg in survivors]
    for cfg, summary in kept:
        if dry_run:
            add(cfg, "ok", "not run (dry run)", resources=summary)
            continue
        _check_budget(deadline)
        try:
            worst = reference_check(t.kernel, t.spec, cfg, device)
        except AssertionError as e:  # testing.EquivalenceError
            add(cfg, "rejected", f"reference check: {str(e).splitlines()[0]}", resources=summary)
        except Exception as e:  # compile errors, out of resources: recorded, not fatal
            add(cfg, "failed", describe_error(e), resources=summary)
        else:
            add(cfg, "ok", f"reference check: worst err / bound {worst:.3g}", resources=summary)


def _timed(t: Task, live: list[Config], jr: Journal, timer: Timer, workloads: dict, device, deadline):
    """Yield (config key, outcome) for the candidates that passed the reference check: each one's distance
    to the PyTorch path at the task's shape, then the time of those close enough. From the journal where
    it has them."""
    bk = json.dumps(dataclasses.asdict(t.bucket), sort_keys=True)
    keys = [_ckey(t.kernel, cfg) for cfg in live]
    todo = [(ck, cfg) for ck, cfg in zip(keys, live) if (t.kernel, bk, ck) not in jr.times]

    def workload() -> Workload:
        if t not in workloads:
            workloads.clear()  # one shape's inputs at a time
            workloads[t] = Workload(t.kernel, t.spec, t.batch_heads, t.T, device)
        return workloads[t]

    add = lambda ck, kind, **kw: jr.add(kind=kind, kernel=t.kernel, bucket=bk, config=ck, **kw)  # noqa: E731
    for ck, cfg in todo:
        if (t.kernel, bk, ck) not in jr.distances:
            _check_budget(deadline)
            try:
                add(ck, "distance", distance=workload().distance(cfg), reason=None)
            except Exception as e:  # out of resources and the like: recorded, not fatal
                add(ck, "distance", distance=None, reason=describe_error(e))
    dists = [jr.distances[(t.kernel, bk, ck)]["distance"] for ck in keys]
    closest = min((d for d in dists if d is not None), default=None)
    for ck, cfg in zip(keys, live):
        done = jr.times.get((t.kernel, bk, ck))
        if done is not None:
            yield ck, done
            continue
        d = jr.distances[(t.kernel, bk, ck)]
        if d["distance"] is None:
            yield ck, add(ck, "time", status="failed", ms=None, reason=d["reason"])
            continue
        limit = workload().tolerance(closest)
        if not d["distance"] <= limit:
            yield ck, add(ck, "time", status="rejected", ms=None,
                          reason=f"at this shape {d['distance']:.3g} from the PyTorch path > {limit:.3g} "
                                 f"({FUDGE:g} x the closest candidate's {closest:.3g})")
            continue
        _check_budget(deadline)
        try:
            with lintx_triton.config.override(**kernel_fields(t.kernel, cfg)):
                ms = timer(workload().timed(), cfg)
        except Exception as e:  # out of resources and the like: recorded, not fatal
            yield ck, add(ck, "time", status="failed", ms=None, reason=describe_error(e))
            continue
        yield ck, add(ck, "time", status="ok", ms=float(ms), reason=None)
