"""Prune candidates by what they compile to, before any GPU time is spent on them.

Each candidate's kernels are compiled for the device's ``sm_<arch>`` on the CPU
(:mod:`lintx_triton.compile_report`: no GPU needed) and read from the cubin; a candidate whose
kernels spill beyond a threshold, need more shared memory than a block may have, or use so many
registers that no block fits on a multiprocessor is dropped.

Compiling for a target does not mix with kernels decorated for Triton's interpreter, which patches
``triton.language`` in-process: the compiles run in a child process (JSON in and out) with
``TRITON_INTERPRET=0``, spread over ``workers`` processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence

from lintx_triton.compile_report import STAGES, KernelResources, family_launches
from lintx_triton.config import Config
from lintx_triton.spec import KernelSpec

from .space import DeviceLimits

__all__ = ["MAX_SPILLS", "describe_error", "compile_resources", "prune_by_compile", "resource_verdict", "launches_of"]

# Spill instructions (LDL + STL) tolerated across a candidate's kernels: a few spills can be cheaper than
# halving the tiles (the fp16 D = 128 (dk, dv) default keeps 48 LDL / 48 STL on sm_90; bench/NOTES.md).
# The heuristic default itself is timed whatever it compiles to (tuner.tune), as the baseline.
MAX_SPILLS = 64


def launches_of(kernel: str, spec: KernelSpec, cfg: Config) -> list:
    """The launches one call of the family ``kernel`` makes under ``cfg``, as the launchers plan them (the
    compile report's :data:`~lintx_triton.compile_report.STAGES`)."""
    return [L for L in family_launches(kernel, spec, cfg) if L.stage in STAGES]


def resource_verdict(resources: Sequence[KernelResources], limits: DeviceLimits,
                     max_spills: int = MAX_SPILLS) -> str | None:
    """Why a candidate whose kernels compiled to ``resources`` should not be timed; None if it should."""
    spills = sum(r.spill_loads + r.spill_stores for r in resources)
    if spills > max_spills:
        worst = max(resources, key=lambda r: r.spill_loads + r.spill_stores)
        return (f"{spills} spill instructions > {max_spills} ({worst.kernel}: {worst.registers} registers, "
                f"{worst.stack}-byte stack)")
    for r in resources:
        if r.shared > limits.smem_per_block:
            return f"{r.kernel} needs {r.shared} bytes of shared memory > {limits.smem_per_block}"
        if r.blocks_per_sm < 1:
            return f"{r.kernel}: no block fits on a multiprocessor ({r.registers} registers x {r.num_warps} warps)"
    return None


def _compile_one(job):
    from lintx_triton.compile_report import kernel_resources

    spec, family, cfg, stage, arch = job  # the launch is planned again here: a worker process gets plain data
    (L,) = [L for L in launches_of(family, spec, cfg) if L.stage == stage]
    return kernel_resources(spec, L, arch=arch)


def _worker_main() -> int:
    """The child: JSON {"spec", "kernel", "configs", "arch", "workers"} on stdin -> one JSON list on stdout,
    per config {"resources": [...]} or {"error": "..."}."""
    req = json.load(sys.stdin)
    spec = KernelSpec(**req["spec"])
    configs = [Config(**c) for c in req["configs"]]
    jobs, owners = {}, []
    for cfg in configs:
        keys = []
        for L in launches_of(req["kernel"], spec, cfg):
            # one compile per distinct launch: many candidates share the scan or the chunk sums
            key = (L.kernel, tuple(sorted(L.plan.constexprs.items())), L.plan.num_warps, L.plan.num_stages)
            jobs.setdefault(key, (spec, req["kernel"], cfg, L.stage, req["arch"]))
            keys.append(key)
        owners.append(keys)
    workers = max(1, min(int(req.get("workers") or 1), len(jobs)))
    if workers == 1:
        run = map
        pool = None
    else:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers)
        run = pool.map
    try:
        outs = list(run(_safe_compile, jobs.values()))
    finally:
        if pool is not None:
            pool.shutdown()
    results = dict(zip(jobs, outs))
    reply = []
    for keys in owners:
        errors = [results[k] for k in keys if isinstance(results[k], str)]
        reply.append({"error": errors[0]} if errors else {"resources": [results[k] for k in keys]})
    json.dump(reply, sys.stdout)
    return 0


def describe_error(e: Exception) -> str:
    """An exception in one short line, for the journal and the files."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _safe_compile(job):
    try:
        return _compile_one(job).as_dict()
    except Exception as e:  # a candidate that does not compile is recorded, not fatal
        return describe_error(e)


_CHILD = "from lintx_triton.autotune.prune import _worker_main; raise SystemExit(_worker_main())"


def compile_resources(spec: KernelSpec, kernel: str, configs: Sequence[Config], arch: int,
                      workers: int | None = None, timeout: float = 3600) -> list[list[KernelResources] | str]:
    """Compile every launch of ``kernel`` under each config for ``sm_<arch>`` in a child process; per config,
    the resources of its kernels, or the compile error as a string."""
    if not configs:
        return []
    req = dict(spec=dataclasses.asdict(spec), kernel=kernel, configs=[dataclasses.asdict(c) for c in configs],
               arch=arch, workers=workers or max(1, (os.cpu_count() or 2) - 1))
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(req), capture_output=True,
                         text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"compiling for sm_{arch} failed:\n{out.stderr[-3000:]}")
    return [r["error"] if "error" in r else [KernelResources(**x) for x in r["resources"]]
            for r in json.loads(out.stdout)]


def prune_by_compile(spec: KernelSpec, kernel: str, configs: Sequence[Config], limits: DeviceLimits,
                     max_spills: int = MAX_SPILLS, workers: int | None = None) -> list[tuple[str | None, str]]:
    """Per config: (why it is pruned or None, a one-line summary of what it compiled to)."""
    out = []
    for res in compile_resources(spec, kernel, configs, limits.arch, workers):
        if isinstance(res, str):
            out.append((f"compile error: {res}", res))
            continue
        summary = ", ".join(f"{r.kernel} {r.registers}r/{r.stack}s/{r.spill_loads + r.spill_stores}sp/{r.shared}B"
                            for r in res)
        out.append((resource_verdict(res, limits, max_spills), summary))
    return out
