"""Decode on the CPU against its memory floors (issue #17): one step of ``lx.linear_attention_step_`` and of
``lx.nn.LinearAttention.step``, in one process.

    python bench/cpu_decode.py                        # B = 1 and 16, H = 8, D = DV = 64, fp32, elu+1
    python bench/cpu_decode.py --modes grad,no_grad,inference --compile   # grad modes; torch.compile's costs
    python bench/cpu_decode.py --B 2 --rounds 3 --calls 2                  # tiny (what CI runs)

Floors, measured in the same run. ``state``: a copy of S and z's bytes ([B, H, M, DV] and [B, H, M] fp32),
which a step reads and writes once. ``module``: a copy of the state's and the four projections' weights' and
biases' bytes, which ``LinearAttention.step`` has to read (the issue's floor; a copy also writes the weights,
so it is the generous one); ``module_read``: the state's copy plus one read of the weights (a sum);
``module_gemm``: the state's copy plus the projections' matmuls alone in torch (x against the concatenated
q, k, v weights, then the output projection: two calls, MKL), what torch's matmuls need once the projections'
FLOPs outweigh their bytes (the module's own projections, ``lintx_triton/native/linear.c``, run under it).

Rows: ``step_`` (the public in-place step: argument checks, then the arithmetic; the native C step of
``lintx_triton.native`` where it builds), ``step_torch`` (the same call with the native step off:
``lx.native.set_enabled(False)``, the PyTorch path), ``body`` (the PyTorch arithmetic alone:
``reference.linear_attention_step_torch_``), ``native_c`` (the C function alone, its pointers prepared outside
the timing: what the native step's Python costs is ``step_`` minus it), ``module``
(``LinearAttention.step(x, state, inplace=True)``, native where it builds: the step, and the projections in
``linear.c``) and ``module_torch`` (native off: torch's projections and step),
``module_fused_qkv`` (the same step with q, k, v from one torch matmul against a concatenated weight, built once
outside the timing: what fusing the projections would save), and the dispatch costs that bound what any
sequence of torch calls can reach: ``empty_op`` (``torch.add`` of two 1-element tensors into a third) and
``view``. Without a C compiler the native rows are left out (and ``step_``, ``module`` are the PyTorch path).
Cold rows (``--evict-mb``, default 64: twice this machine's L3): ``floor_state_cold``, ``floor_module_cold``,
``step_cold`` and ``module_cold``, one call each right after a copy of that many MB has pushed the state and the
weights out of the caches and the same call on another state (another layer's, for the module) has brought the
code back, as in a model whose layers' weights and states do not all fit in the last level: the floors are then
copies from memory, the rows' figures multiples of their cold floors.
With ``--compile``: ``compiled_body`` (``torch.compile(fullgraph=True)`` of the body, inductor's C++
kernel), ``compiled_empty`` (a compiled function of one in-place add: the per-call price of a compiled graph),
and the first call's compile time. In grad mode the module rows are left out: the in-place state would carry
each step's autograd graph into the next.

Timing: each row is timed in ``--rounds`` rounds of ``--calls`` calls, the rows interleaved round by round so
that load from other processes falls on all of them alike (the native step is switched on or off before a row's
round, outside its timing, and the row called once after a switch, so that no timed call re-checks its
arguments); the figure is the best round's mean per call (us;
``--stat median`` for the median round: on a machine shared with other work the best round is the one least
disturbed by it), and each is also printed as a multiple of its floor (the module rows: of ``module``'s and of
``module_gemm``'s).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lintx_triton as lx  # noqa: E402
from lintx_triton.reference import linear_attention_step_torch_  # noqa: E402

MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}


def _pick(ts: list, stat: str) -> float:
    """The best (``stat="min"``) or the median of the times ``ts``."""
    return min(ts) if stat == "min" else sorted(ts)[len(ts) // 2]


def interleaved_us(fns: dict, rounds: int, calls: int, stat: str = "min", before: dict = None) -> dict:
    """The best (``stat="min"``) or median round's mean us per call of each of ``fns``, of ``rounds`` rounds of
    ``calls`` calls, the rows interleaved round by round; ``before[name]()`` runs untimed before each of that
    row's rounds (and its warm-up)."""
    before = before or {}
    for name, fn in fns.items():  # warm-up
        before.get(name, lambda: None)()
        for _ in range(max(2, calls // 4)):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: _pick(ts, stat) for name, ts in times.items()}


def cold_us(fns: dict, rounds: int, evict, stat: str = "min", before: dict = None, sibling: dict = None) -> dict:
    """The best (``stat="min"``) or median of ``rounds`` single calls of each of ``fns``, each call right after
    ``evict()`` has pushed the caches' contents out and ``sibling[name]()`` (if given) has run the same code on other
    data (both untimed: the code hot, the row's data cold, as for a model's layer after the others' steps), the
    rows interleaved round by round; ``before[name]()`` as in :func:`interleaved_us`."""
    before, sibling = before or {}, sibling or {}
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: the first call's planning is not what a cold call costs
        before.get(name, lambda: None)()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            evict()
            sibling.get(name, lambda: None)()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e6)
    return {name: _pick(ts, stat) for name, ts in times.items()}


def _copy_of(numel: int):
    src, dst = torch.randn(numel), torch.empty(numel)
    return lambda: dst.copy_(src)


def _qkv_weight(layer: lx.nn.LinearAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The q, k, v projections' weights and biases, concatenated (a copy)."""
    projs = (layer.q_proj, layer.k_proj, layer.v_proj)
    return torch.cat([p.weight for p in projs]).detach(), torch.cat([p.bias for p in projs]).detach()


def _fused_step(layer: lx.nn.LinearAttention):
    """LinearAttention.step with q, k, v from one matmul against a concatenated weight (built once, here)."""
    W, b = _qkv_weight(layer)
    H, HKV, D, DV = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.value_dim
    splits = (H * D, HKV * D, HKV * DV)

    def step(x, state):
        q, k, v = F.linear(x, W, b).split(splits, -1)
        B = x.shape[0]
        o = lx.linear_attention_step_(q.view(B, H, D), k.view(B, HKV, D), v.view(B, HKV, DV), state,
                                      feature_map=layer.feature_map, normalize=layer.normalize, eps=layer.eps,
                                      backend=layer.backend)
        return layer.out_proj(o.view(B, H * DV))

    return step


def _native(flag: bool, fn):
    """Switch the native step on (True) or off before a row's round; after a switch, one untimed call of the row
    (set_enabled forgets the api's per-key plans: the next call checks its arguments again)."""
    def before():
        if lx.native.enabled() != flag:
            lx.native.set_enabled(flag)
            fn()

    return before


def _native_c(q, k, v, S, z):
    """The native step's C function on these tensors (in place, elu+1, normalized), its arguments prepared here."""
    B, H, D = q.shape
    fn = lx.native._load()
    o = torch.empty(B, H, v.shape[-1])
    a, se = lx.native.args((B, H, k.shape[1], D, v.shape[-1], lx.native.MAPS["elu"]),
                           [t.data_ptr() for t in (q, k, v, S, z, S, z, o)], 1.0, 1e-6)
    return lambda: (fn(a, se, 1), o)  # o held by the closure: the C function writes into it


def decode_rows(Bs, H: int, D: int, modes, rounds: int, calls: int, compile_: bool = False,
                stat: str = "min", backend: str = "auto", evict_mb: int = 64) -> list[dict]:
    """One dict per (B, grad mode): the floors and the rows of the module docstring, in us per call; ``backend``
    for the step and the module (the body is the PyTorch path's); ``evict_mb``: the size of the copy that empties
    the caches before each cold call (0: no cold rows)."""
    rows = []
    big = torch.empty(evict_mb << 18), torch.empty(evict_mb << 18)  # two buffers of evict_mb MB

    def evict():
        big[1].copy_(big[0])

    fm = lx.feature_maps.get("elu")
    has_native = lx.native.available()
    for B in Bs:
        torch.manual_seed(0)
        M = DV = D
        layer = lx.nn.LinearAttention(H * D, H, backend=backend)
        x = torch.randn(B, H * D)
        q, k, v = (torch.randn(B, H, D) for _ in range(3))
        S, z = torch.zeros(B, H, M, DV), torch.zeros(B, H, M)
        mS, mz = layer.init_state(B)
        state_numel = S.numel() + z.numel()
        weights = torch.cat([p.detach().reshape(-1) for p in layer.parameters()])
        one, one_out, t = torch.ones(1), torch.empty(1), torch.randn(B, H, D)
        Wqkv, bqkv = _qkv_weight(layer)
        o_in = torch.randn(B, H * DV)
        state_copy = _copy_of(state_numel)
        fns = {
            "floor_state": state_copy,
            "floor_module": _copy_of(state_numel + weights.numel()),
            "floor_module_read": lambda: (state_copy(), weights.sum()),
            "floor_module_gemm": lambda: (state_copy(), F.linear(x, Wqkv, bqkv), layer.out_proj(o_in)),
            "empty_op": lambda: torch.add(one, one, out=one_out),
            "view": lambda: t.view(B * H, D),
            "step_": lambda: lx.linear_attention_step_(q, k, v, (S, z), backend=backend),
            "body": lambda: linear_attention_step_torch_(q, k, v, fm, S, z),
            "module": lambda: layer.step(x, (mS, mz), inplace=True),
            "module_fused_qkv": (lambda f: lambda: f(x, (mS, mz)))(_fused_step(layer)),
        }
        before = {}
        if has_native:
            fns["step_torch"] = fns["step_"]
            fns["native_c"] = _native_c(q, k, v, S, z)
            fns["module_torch"] = fns["module"]
            # the public rows' order: native, then torch, beside each other
            order = ("floor_state", "floor_module", "floor_module_read", "floor_module_gemm", "empty_op", "view",
                     "step_", "step_torch", "body", "native_c", "module", "module_torch", "module_fused_qkv")
            fns = {n: fns[n] for n in order}
            for name in ("step_", "module", "module_fused_qkv"):
                before[name] = _native(True, fns[name])
            for name in ("step_torch", "module_torch"):
                before[name] = _native(False, fns[name])
        cold = {"floor_state_cold": state_copy, "floor_module_cold": fns["floor_module"], "step_cold": fns["step_"],
                "module_cold": fns["module"]} if evict_mb else {}
        # the layer before this one in a model: the same code on its own data
        layer2, q2, k2, v2 = lx.nn.LinearAttention(H * D, H, backend=backend), *(torch.randn(B, H, D) for _ in range(3))
        S2, z2, state2 = torch.zeros(B, H, M, DV), torch.zeros(B, H, M), layer2.init_state(B)
        sibling = {"step_cold": lambda: lx.linear_attention_step_(q2, k2, v2, (S2, z2), backend=backend),
                   "module_cold": lambda: layer2.step(x, state2, inplace=True)}
        cold_before = {n: _native(True, f) for n, f in cold.items() if has_native and not n.startswith("floor")}
        extra = {"native": has_native}
        if compile_:
            body = torch.compile(linear_attention_step_torch_, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                body(q, k, v, fm, S, z)
            extra["compile_s"] = time.perf_counter() - t0

            def add_(a):
                a.add_(1)

            empty = torch.compile(add_, fullgraph=True, dynamic=False)
            with torch.no_grad():
                empty(one_out)
            fns["compiled_body"] = lambda: body(q, k, v, fm, S, z)
            fns["compiled_empty"] = lambda: empty(one_out)
        for mode in modes:
            # with grad the module's in-place state would take each step's autograd graph into the next: its rows
            # would time a growing graph, so grad mode times the step alone
            def kept(row_fns: dict) -> dict:
                return {n: f for n, f in row_fns.items() if mode != "grad" or not n.startswith("module")}

            with MODES[mode]():
                us = interleaved_us(kept(fns), rounds, calls, stat, before)
                us.update(cold_us(kept(cold), rounds, evict, stat, cold_before, sibling))
            if has_native:
                lx.native.set_enabled(True)
            rows.append(dict(B=B, H=H, D=D, mode=mode, state_bytes=4 * state_numel,
                             weight_bytes=4 * weights.numel(), **extra, **us))
    return rows


def print_rows(rows: list[dict]) -> None:
    meta = ("B", "H", "D", "mode", "state_bytes", "weight_bytes", "compile_s", "native")
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in meta))  # grad mode has no module rows
    print("| B | mode | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        cells = []
        for k in keys:
            if k not in r:
                cells.append("-")
            elif k.startswith(("floor", "empty", "view")):
                cells.append(f"{r[k]:.1f}")
            elif k.endswith("_cold"):
                floor = r["floor_module_cold" if k.startswith("module") else "floor_state_cold"]
                cells.append(f"{r[k]:.1f} ({r[k] / floor:.1f}x)")
            elif k.startswith("module"):
                cells.append(f"{r[k]:.1f} ({r[k] / r['floor_module']:.1f}x / {r[k] / r['floor_module_gemm']:.1f}x)")
            else:
                cells.append(f"{r[k]:.1f} ({r[k] / r['floor_state']:.1f}x)")
        print(f"| {r['B']} | {r['mode']} | " + " | ".join(cells) + " |")
    for r in rows:
        if "compile_s" in r and r["mode"] == rows[0]["mode"]:
            print(f"B = {r['B']}: first compiled call (compile) {r['compile_s']:.1f} s")


@click.command()
@click.option("--B", "Bs", default="1,16", show_default=True)
@click.option("--heads", "H", default=8, show_default=True)
@click.option("--dim", "D", default=64, show_default=True)
@click.option("--modes", default="no_grad", show_default=True, help="grad modes, of grad,no_grad,inference")
@click.option("--rounds", default=31, show_default=True)
@click.option("--calls", default=20, show_default=True)
@click.option("--stat", default="min", show_default=True, type=click.Choice(["min", "median"]),
              help="the best or the median round")
@click.option("--threads", default=0, show_default=True, help="torch.set_num_threads (0: torch's default)")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"]),
              help="the step's and the module's backend (auto: the PyTorch path on a CPU, unless TRITON_INTERPRET=1)")
@click.option("--compile", "compile_", is_flag=True, help="also torch.compile the body (a C++ compiler needed)")
@click.option("--evict-mb", default=64, show_default=True,
              help="MB copied before each cold row's call, to empty the caches (at least the last level's size; "
                   "0: no cold rows)")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="write the rows here")
def main(Bs, H, D, modes, rounds, calls, stat, threads, backend, compile_, evict_mb, json_out):
    if threads:
        torch.set_num_threads(threads)
    modes = [m for m in modes.split(",") if m]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, elu+1, normalized, H = {H}, "
          f"D = DV = {D}; us per call, {'best' if stat == 'min' else 'median'} of {rounds} rounds of {calls}; "
          f"(x floor: the state's; for the module rows floor_module's / floor_module_gemm's)")
    print(f"native C step: {'built' if lx.native.available() else 'not available (no C compiler?): PyTorch path'}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) before")
    rows = decode_rows([int(b) for b in Bs.split(",")], H, D, modes, rounds, calls, compile_, stat, backend,
                       evict_mb)
    print_rows(rows)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} after")
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), stat=stat, rounds=rounds,
                           calls=calls, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
