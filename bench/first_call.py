"""First-call latency: a cold process, empty kernel caches, time to the first output.

    python bench/first_call.py --out /tmp/first_call.json               # GPU: bf16, B*T = 32768, H = 16, D = 64, T = 4096
    python bench/first_call.py --T 64 --H 2 --D 16 --tokens 128 --out /tmp/f.json   # CPU: the Triton interpreter

Each measurement runs in a fresh Python process of its own (``--child``) with a fresh, empty
``LINTX_TRITON_CACHE_DIR`` (generated kernel sources), ``TRITON_CACHE_DIR`` (compiled kernels) and
``LINTX_TRITON_CONFIG_DIR`` (user configs), so nothing compiled or tuned earlier is reused: what a user
waits for the first time a shape runs after installing. Modes: ``fwd`` (``linear_attention`` under
``no_grad``) and ``fwdbwd`` (the forward and ``torch.autograd.grad`` of q, k, v), each from cold.
Configs: ``heuristic`` (the shipped configs hidden, ``lintx_triton.config.gpu_heuristic`` decides), then
``shipped`` when ``autotune/configs`` holds any (the source the call used is recorded).

Per run: the seconds of ``import torch`` and ``import lintx_triton``, of CUDA's start (not ours: a tiny
op before the clock starts), of the first call to its synchronized output (``first_s``: generating,
compiling and loading the kernels, and running them), of a second call (``warm_s``), and the worst error
over its bound of the first call's output (and gradients) against the float64 reference
(``bench/harness.py``'s checks, run after the clock stopped). The goal (issue #15): ``first_s`` <= 3 s
on an H200; FLA's first call costs 25 s forward and 63 s backward there (shared/anchors/h200.md).

The JSON under ``--out`` is rewritten after every run, so a run cut short keeps what finished. Exit
code: 0 when every run finished and passed its check; 1 when one failed or broke; 124 (as ``timeout``
says) when one ran out of time and none failed.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import click  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the configs the tuner ships (lintx_triton.tuned_configs.SHIPPED_CONFIG_DIR, found without importing torch)
SHIPPED = ROOT / "autotune" / "configs"
GOAL_S = 3.0
MARKER = "FIRST_CALL_RESULT "
# while time is short, each run after the one running keeps this much of it (but each gets its fair share)
RESERVE_S = 15.0


def _child(mode: str, configs: str, B: int, T: int, H: int, D: int, dtype: str, seed: int) -> dict:
    """One cold measurement, in this (fresh) process."""
    t0 = time.perf_counter()
    import torch

    res: dict = dict(mode=mode, configs=configs, B=B, T=T, H=H, D=D, dtype=dtype)
    res["torch_import_s"] = round(time.perf_counter() - t0, 3)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before lintx_triton decorates any kernel
    t0 = time.perf_counter()
    import lintx_triton as lx

    res["lintx_import_s"] = round(time.perf_counter() - t0, 3)
    if configs == "heuristic":
        # hide the shipped configs: gpu_heuristic decides (the user directory is empty and fresh already)
        from lintx_triton import tuned_configs

        tuned_configs.SHIPPED_CONFIG_DIR = pathlib.Path(tempfile.mkdtemp(prefix="no_shipped_configs_"))
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    if cuda:
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize()
    res["cuda_init_s"] = round(time.perf_counter() - t0, 3)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g, device=device).to(dt) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return lx.linear_attention(q, k, v)
        o = lx.linear_attention(q, k, v)
        return torch.autograd.grad(o, (q, k, v), do)

    def timed():
        t = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        return round(time.perf_counter() - t, 3)

    res["first_s"] = timed()  # the measurement: generate, compile, load, run
    res["warm_s"] = timed()
    res["process_s"] = round(time.perf_counter() - T_START, 3)  # the interpreter's start not included
    from lintx_triton.spec import dtype_of, products_in_fp32

    name = dtype_of(dt).name
    spec = lx.KernelSpec("elu", True, True, name, D, D, False, products_in_fp32(name, lx.config.interpreting()))
    res["config"] = str(lx.config_for(spec, B * H, T, device))
    # the first call's output against the float64 reference, after the clock stopped
    sys.path.insert(0, str(ROOT))
    from bench import harness
    from lintx_triton import testing

    lintx = next(i for i in harness.default_impls() if i.name == "lintx")
    row = harness.Row(mode, B, T, H, D, D, dtype)
    try:
        res["check_worst"] = harness.check(lintx, row, dict(q=q, k=k, v=v, do=do), window=64)
    except testing.EquivalenceError as e:
        res["check_worst"], res["reason"] = e.worst, str(e)[:300]
    res["status"] = "ok" if res["check_worst"] <= 1.0 else "fail"
    res["device"] = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    return res


def _shipped_present() -> bool:
    return SHIPPED.is_dir() and any(SHIPPED.glob("*/*.json"))


def _run_one(mode, configs, args: list[str], timeout_s: float) -> dict:
    """``mode`` in a fresh process with fresh caches; its result dict (status ok / fail / error / cut)."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lintx_first_call_"))
    env = dict(os.environ, LINTX_TRITON_CACHE_DIR=str(tmp / "lintx"), TRITON_CACHE_DIR=str(tmp / "triton"),
               LINTX_TRITON_CONFIG_DIR=str(tmp / "configs"), CUDA_CACHE_DISABLE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.pop("LINTX_TRITON_ONLINE_TUNE", None)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", mode, "--configs", configs] + args
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return dict(mode=mode, configs=configs, status="cut", wall_s=round(time.perf_counter() - t0, 1),
                    reason=f"no result within {timeout_s:.0f} s", stderr_tail=tail[-1500:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = round(time.perf_counter() - t0, 1)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARKER):
            return dict(json.loads(line[len(MARKER):]), wall_s=wall)
    return dict(mode=mode, configs=configs, status="error", wall_s=wall, reason=f"exit code {p.returncode}",
                stderr_tail=(p.stderr or p.stdout)[-1500:])


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--modes", default="fwd,fwdbwd", show_default=True, help="fwd and/or fwdbwd, each from cold")
@click.option("--configs", "configs", default="heuristic,shipped", show_default=True,
              help="heuristic (shipped configs hidden) and/or shipped (skipped when autotune/configs holds none)")
@click.option("--T", "T", default=4096, show_default=True)
@click.option("--tokens", default=32768, show_default=True, help="B*T (B = tokens // T, at least 1)")
@click.option("--H", "H", default=16, show_default=True)
@click.option("--D", "D", default=64, show_default=True, help="D = DV")
@click.option("--dtype", default="bf16", type=click.Choice(["bf16", "fp16", "fp32"]), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--budget-s", default=600.0, show_default=True,
              help="for all runs; each run may use what is left less 15 s per run after it")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="write the runs as JSON here")
@click.option("--child", default=None, hidden=True)
def main(modes, configs, T, tokens, H, D, dtype, seed, budget_s, out, child):
    """First-call latency of lintx_triton in cold processes with empty kernel caches."""
    B = max(1, tokens // T)
    if child:
        print(MARKER + json.dumps(_child(child, configs, B, T, H, D, dtype, seed)), flush=True)
        return
    deadline = time.monotonic() + budget_s
    args = ["--T", str(T), "--tokens", str(tokens), "--H", str(H), "--D", str(D), "--dtype", dtype, "--seed", str(seed)]
    plan = []
    for c in (x for x in configs.split(",") if x):
        if c not in ("heuristic", "shipped"):
            raise click.BadParameter(f"heuristic or shipped, got {c!r}", param_hint="--configs")
        for m in (x for x in modes.split(",") if x):
            if m not in ("fwd", "fwdbwd"):
                raise click.BadParameter(f"fwd or fwdbwd, got {m!r}", param_hint="--modes")
            plan.append((m, c))
    doc = dict(goal_s=GOAL_S, anchor_fla_s=dict(fwd=25.0, fwdbwd=63.0, source="shared/anchors/h200.md (H200)"),
               shape=dict(B=B, T=T, H=H, D=D, dtype=dtype), runs=[])

    def save():
        if out:
            with open(f"{out}.tmp", "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(f"{out}.tmp", out)

    runs = [(m, c) for m, c in plan if c != "shipped" or _shipped_present()]
    for m, c in plan:
        if (m, c) not in runs:
            r = dict(mode=m, configs=c, status="skip", reason=f"no shipped configs in {SHIPPED.relative_to(ROOT)}")
        else:
            later = len(runs) - runs.index((m, c)) - 1
            left = deadline - time.monotonic()
            limit = max(left / (later + 1), left - RESERVE_S * later)
            r = _run_one(m, c, args, limit) if limit >= 1 else dict(mode=m, configs=c, status="cut",
                                                                     reason="no time left in --budget-s")
        gpu = "device" in r and not r["device"].startswith("cpu")
        if r.get("first_s") is not None:
            r["goal_met"] = (r["first_s"] <= GOAL_S) if gpu else None
        doc["runs"].append(r)
        save()
        line = f"first call {m:6s} {c:9s} B={B} T={T} H={H} D={D} {dtype}: "
        if r.get("first_s") is not None:
            goal = {True: "goal met", False: "GOAL MISSED", None: "goal n/a (no GPU)"}[r["goal_met"]]
            line += (f"{r['first_s']:.2f} s (warm {r['warm_s']:.3f} s; imports {r['torch_import_s']:.1f} + "
                     f"{r['lintx_import_s']:.1f} s, CUDA start {r['cuda_init_s']:.1f} s) vs {GOAL_S:g} s: {goal}; "
                     f"check {r['check_worst']:.3g} {r['status']}; config {r.get('config', '')[:160]}")
        else:
            line += f"{r['status']}: {r.get('reason', '')}"
        click.echo(line)
        if r.get("stderr_tail"):
            click.echo("  " + r["stderr_tail"].strip().replace("\n", "\n  ")[-1200:], err=True)
    statuses = [r["status"] for r in doc["runs"]]
    if any(s in ("fail", "error") for s in statuses):
        sys.exit(1)
    if "cut" in statuses:
        sys.exit(124)


if __name__ == "__main__":
    main()
