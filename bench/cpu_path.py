"""The CPU path (``backend="auto"`` without a GPU) against its floors, SDPA and fast-transformers, in one process.

    python bench/cpu_path.py                                   # issue #17's table: H = 8, D = 64, B*T = 8192
    python bench/cpu_path.py --ft-src ~/fast-transformers      # with fast-transformers' C++ CPU kernel beside it
    python bench/cpu_path.py --T 64,128 --tokens 256 --reps 1  # tiny (what CI runs)
    python bench/cpu_path.py --threads 1 --clock cpu           # CPU time at one thread: a loaded machine
    python bench/cpu_path.py --impls lintx --reps 11           # lintx against its floors only (no SDPA)
    python bench/cpu_path.py --base main --reps 25             # A/B: the torch path at a git ref against this tree

Per T (B = tokens // T; fp32, elu(x) + 1, causal, normalized, scale 1), the median of ``--reps`` runs of:
lintx forward and forward+backward (``lx.linear_attention``: the recurrence in C, lintx_triton/native/causal.c;
``--impls chunked``: the same call with the native code off, the chunked PyTorch products), causal
``scaled_dot_product_attention``, and fast-transformers' ``CausalLinearAttention`` (its elu feature map, its
normalizer, its CPU ``causal_dot_product``) when ``--ft-src`` names a checkout of idiap/fast-transformers (its
``fast_transformers/causal_product/causal_product_cpu.cpp`` is compiled once with torch's cpp_extension).

The floor of a row is the time batched 64 x 64 x 64 fp32 matmuls take for the same FLOPs, measured in the same
run, once before each of the row's timed runs (their median; the load average, printed with it, says how busy
the machine was): the forward's FLOPs are those of the chunked algorithm (4 D (D + C) per token and head at
D = DV = M, chunk C = 64, whatever chunk the path picks), the forward+backward's three times as many. Each figure
is also printed as a multiple of its floor. (The recurrence does 4 D DV: half the FLOPs the floor counts.)
With ``--base REF``: an A/B instead of the table, the PyTorch path at git ref REF (its lintx_triton/reference.py,
beside this tree's lintx_triton/native: refs from the commit that added causal.c on) against this tree's, forward and forward+backward, in ``--reps`` interleaved rounds of (floor, base, this tree)
(which goes first alternates); the medians, each as a multiple of the median floor, the median over rounds of
this tree's time over the base's, and the page faults per call (a fresh 16 MB buffer faults its pages in).
Decode: one ``linear_attention_step_`` and one ``LinearAttention.step`` at B = 1 and 16 against the time to
read and write the state once (a copy of the state, measured), the module also against its weights' floors:
bench/cpu_decode.py's rows (``python bench/cpu_decode.py`` for its grad modes, torch.compile and threads).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lintx_triton as lx  # noqa: E402

CHUNK = 64  # the chunk the FLOP count assumes (the path's own choice may differ; the floor does not move)


def _median_ms(fn, reps: int, clock: str = "wall", floor: "list | None" = None) -> float:
    """The median of ``reps`` runs after one warm-up: perf_counter (as bench/harness.py's CPU timer), or with
    ``clock="cpu"`` the process's CPU time (user + system of all its threads), which other processes' load moves
    far less than the wall clock: a measure of work, not of latency (use it at one thread). With ``floor`` (a
    list), the floor's matmuls (:func:`_bmm_ms`) run once before each run and their ms are appended to it."""
    clk = time.perf_counter if clock == "wall" else time.process_time
    fn()
    times = []
    for _ in range(max(1, reps)):
        if floor is not None:
            floor.append(_bmm_ms(clk))
        t0 = clk()
        fn()
        times.append((clk() - t0) * 1e3)
    return statistics.median(times)


_BMM = 4 * 2 * 256 * 64**3  # FLOPs of one _bmm_ms


def _bmm_ms(clk) -> float:
    """ms of four batched 64 x 64 x 64 fp32 matmuls of batch 256 (the shape of the chunked algorithm's products)."""
    a, b = torch.randn(256, 64, 64), torch.randn(256, 64, 64)
    t0 = clk()
    for _ in range(4):
        torch.bmm(a, b)
    return (clk() - t0) * 1e3


def _bmm_gflops(reps: int, clock: str = "wall") -> float:
    """GFLOP/s of batched 64 x 64 x 64 fp32 matmuls (the shape of the chunked algorithm's products), the median of
    ``reps`` (at least 5) runs of :func:`_bmm_ms`."""
    clk = time.perf_counter if clock == "wall" else time.process_time
    ms = statistics.median(_bmm_ms(clk) for _ in range(max(reps, 5)))
    return _BMM / (ms * 1e-3) / 1e9


def _ft_module(src: str):
    from torch.utils.cpp_extension import load

    path = os.path.join(os.path.expanduser(src), "fast_transformers", "causal_product", "causal_product_cpu.cpp")
    if not os.path.exists(path):
        raise click.BadParameter(f"no {path}", param_hint="--ft-src")
    return load("ft_causal_product_cpu", [path], extra_cflags=["-O3", "-fopenmp", "-ffast-math"],
                extra_ldflags=["-fopenmp"])


def _ft_attention(ext):
    """fast-transformers' CausalLinearAttention forward: elu + 1 features, its normalizer, its causal product."""

    class CausalDot(torch.autograd.Function):
        @staticmethod
        def forward(ctx, Q, K, V):
            ctx.save_for_backward(Q, K, V)
            out = torch.zeros(Q.shape[:3] + (V.shape[-1],))
            ext.causal_dot_product(Q, K, V, out)
            return out

        @staticmethod
        def backward(ctx, g):
            Q, K, V = ctx.saved_tensors
            gq, gk, gv = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
            ext.causal_dot_backward(Q, K, V, g.contiguous(), gq, gk, gv)
            return gq, gk, gv

    def attn(q, k, v, eps=1e-6):  # [B, T, H, D] like lintx; fast-transformers' own layout
        Q, K = F.elu(q) + 1, F.elu(k) + 1
        Z = 1 / (torch.einsum("nlhi,nlhi->nlh", Q, K.cumsum(1)) + eps)
        perm = lambda x: x.permute(0, 2, 1, 3).contiguous()  # noqa: E731
        V = CausalDot.apply(perm(Q), perm(K), perm(v)).permute(0, 2, 1, 3)
        return V * Z[:, :, :, None]

    return attn


def _torch_path_at(ref: str):
    """``linear_attention_torch`` from lintx_triton/reference.py at git ref ``ref``, beside this tree's package."""
    root = os.path.join(os.path.dirname(__file__), "..")
    src = subprocess.run(["git", "-C", root, "show", f"{ref}:lintx_triton/reference.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "reference_base.py")
    with open(path, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("lintx_triton._reference_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.linear_attention_torch


def _ab(ref, Ts, H, D, tokens, reps, clock):
    """The A/B rows of ``--base``: interleaved rounds of (floor, base, this tree), forward and forward+backward."""
    from lintx_triton import feature_maps
    from lintx_triton.reference import linear_attention_torch

    fm = feature_maps.resolve("elu")
    paths = {"base": _torch_path_at(ref), "new": linear_attention_torch}
    clk = time.process_time if clock == "cpu" else time.perf_counter
    print(f"| T | B | mode | floor | base ({ref}) | new | new / base | faults per call base / new | load |")
    for T in Ts:
        B = max(1, tokens // T)
        q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        flops = 4 * D * (D + CHUNK) * B * T * H
        for mode, mult in (("fwd", 1), ("fwd+bwd", 3)):
            def run(f):
                if mode == "fwd":
                    with torch.no_grad():
                        f(q, k, v, fm)
                else:
                    _fwd_bwd(lambda *x: f(*x, fm)[0], q, k, v)()
            for f in paths.values():
                run(f)
            ms = {n: [] for n in paths}
            faults = {n: [] for n in paths}
            floors = []
            for i in range(reps):
                floors.append(mult * flops / _BMM * _bmm_ms(clk))
                for n in (("base", "new") if i % 2 == 0 else ("new", "base")):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = clk()
                    run(paths[n])
                    ms[n].append((clk() - t0) * 1e3)
                    faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            fl = statistics.median(floors)
            med = {n: statistics.median(x) for n, x in ms.items()}
            ratio = statistics.median(y / x for x, y in zip(ms["base"], ms["new"]))
            print(f"| {T} | {B} | {mode} | {fl:.1f} | {med['base']:.1f} ({med['base'] / fl:.2f}x) | "
                  f"{med['new']:.1f} ({med['new'] / fl:.2f}x) | {ratio:.3f} | "
                  f"{statistics.median(faults['base']):.0f} / {statistics.median(faults['new']):.0f} | "
                  f"{os.getloadavg()[0]:.1f} |", flush=True)


def _chunked(q, k, v, backend):
    """lintx with lintx_triton.native off: the chunked PyTorch products (the CPU path before causal.c)."""
    lx.native.set_enabled(False)
    try:
        return lx.linear_attention(q, k, v, backend=backend)
    finally:
        lx.native.set_enabled(True)


def _fwd_bwd(f, q, k, v):
    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o = f(qq, kk, vv)
        torch.autograd.grad(o, (qq, kk, vv), torch.ones_like(o))
    return run


@click.command()
@click.option("--T", "Ts", default="256,512,1024,4096,8192", show_default=True)
@click.option("--heads", "H", default=8, show_default=True)
@click.option("--dim", "D", default=64, show_default=True)
@click.option("--tokens", default=8192, show_default=True, help="B*T")
@click.option("--reps", default=5, show_default=True)
@click.option("--ft-src", default=None, help="a checkout of idiap/fast-transformers (compiled once)")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"]),
              help="lintx's backend (auto: the PyTorch path on a CPU, unless TRITON_INTERPRET=1)")
@click.option("--threads", default=None, type=int, help="torch.set_num_threads (default: torch's own)")
@click.option("--clock", default="wall", show_default=True, type=click.Choice(["wall", "cpu"]),
              help="forward and backward timed by the wall clock, or by the process's CPU time (with --threads 1: "
                   "robust to other processes' load on a shared machine; the decode rows stay on the wall clock)")
@click.option("--impls", default="lintx,sdpa", show_default=True,
              help="which of lintx, chunked (lintx with the native code off: the chunked PyTorch products), sdpa "
                   "to time (fast-transformers joins with --ft-src)")
@click.option("--base", default=None, help="a git ref: A/B its PyTorch path against this tree's (no table)")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="write the rows here")
def main(Ts, H, D, tokens, reps, ft_src, backend, threads, clock, impls, base, json_out):
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    if base:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
              f"fp32, elu+1, causal, normalized, H = {H}, D = DV = {D}, B*T = {tokens}; median {clock} ms of {reps} "
              "interleaved rounds, (x the median floor)")
        return _ab(base, [int(t) for t in Ts.split(",")], H, D, tokens, reps, clock)
    ft = _ft_attention(_ft_module(ft_src)) if ft_src else None
    gflops = _bmm_gflops(reps, clock)
    load = os.getloadavg()[0]  # a shared machine: the load other processes put on it, printed with the rows
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}; batched 64x64x64 "
          f"matmul: {gflops:.0f} GFLOP/s (the floor; measured again before each timed run); fp32, elu+1, causal, "
          f"normalized, H = {H}, D = DV = {D}, B*T = {tokens}; median {clock} ms of {reps}, (x floor)")
    wanted = impls.split(",")
    impls = {"lintx": lambda q, k, v: lx.linear_attention(q, k, v, backend=backend),
             "chunked": lambda q, k, v: _chunked(q, k, v, backend),
             "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
                 q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)}
    impls = {n: f for n, f in impls.items() if n in wanted}
    if ft is not None:
        impls["ft"] = ft
    rows = []
    cols = " | ".join(f"{n} fwd | {n} fwd+bwd" for n in impls)
    print(f"| T | B | floor fwd | floor fwd+bwd | {cols} |")
    for T in (int(t) for t in Ts.split(",")):
        B = max(1, tokens // T)
        q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        flops = 4 * D * (D + CHUNK) * B * T * H
        # the floor's matmuls run before each timed run of the row (on a shared machine their rate moved 40 %
        # between rows a minute apart): the row's floor is the median of those, measured in the same seconds
        samples = []
        times = {}
        for name, f in impls.items():
            with torch.no_grad():
                times[name] = _median_ms(lambda: f(q, k, v), reps, clock, samples)
            times[name] = times[name], _median_ms(_fwd_bwd(f, q, k, v), reps, clock, samples)
        rate = _BMM / (statistics.median(samples) * 1e-3) / 1e9
        floor = flops / (rate * 1e9) * 1e3
        row = dict(T=T, B=B, bmm_gflops=rate, floor_fwd=floor, floor_fwdbwd=3 * floor)
        cells = []
        for name, (fwd, fb) in times.items():
            row[f"{name}_fwd"], row[f"{name}_fwdbwd"] = fwd, fb
            cells.append(f"{fwd:.1f} ({fwd / floor:.1f}x) | {fb:.1f} ({fb / (3 * floor):.1f}x)")
        rows.append(row)
        row["load"] = os.getloadavg()[0]
        print(f"| {T} | {B} | {floor:.1f} | {3 * floor:.1f} | " + " | ".join(cells) + f" | (load {row['load']:.1f})",
              flush=True)
    # decode: one step against the state's memory floor (reading and writing it once)
    from bench.cpu_decode import decode_rows, print_rows  # and the module against its weights' floors

    print()
    decode = decode_rows((1, 16), H, D, ["no_grad"], rounds=max(3, reps), calls=20, backend=backend)
    print_rows(decode)
    rows.extend(dict(decode_B=r["B"], **r) for r in decode)
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), clock=clock, bmm_gflops=gflops,
                           rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
