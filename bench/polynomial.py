"""Polynomial feature maps (issue #18): Based's Taylor map fused in the kernels against phi built in PyTorch first,
and on a GPU against FLA's three ways.

    python bench/polynomial.py --device cuda --out bench/out/polynomial.json   # GPU: bf16, H = 16, D = 16,
                                                                               # DV = 64, B*T = 32768, T = 1k..16k
    python bench/polynomial.py --T 40 --tokens 40 --H 2 --D 8 --dtype fp32 --out /tmp/p.json   # CPU, tiny

The ways, each causal and normalized (phi(q)^T phi(k) = 1 + s + s^2 / 2, s = q.k / sqrt(D)):

* ``fused``: ``lx.linear_attention(q, k, v, feature_map=lx.feature_maps.taylor(D))``: the kernels walk phi in
  blocks of 64 features built on chip (M = 273 at D = 16); phi never reaches memory.
* ``torch_phi``: phi(q), phi(k) [B, T, H, M] built in PyTorch, then ``feature_map="identity"`` (the ``chunk``
  mode of FLA's Based layer, ``fla/layers/based.py``, with lintx's kernels; past M = 256, which they do not
  take, lintx's PyTorch chunked path): autograd keeps both for the backward.
* on a GPU with FLA installed (its wheel carried, bench/README.md): ``fla_fused_chunk``
  (``fla.ops.based.fused_chunk_based``: a [K^2, V] state in the kernel, K <= 16), ``fla_parallel``
  (``parallel_based``: the scores squared on tiles, quadratic in T) and ``fla_chunk`` (FLA's
  ``TaylorFeatureMap`` in PyTorch, then ``chunk_linear_attn(..., scale=1, normalize=True)``), called as
  FLA's own code calls them (q, k, v [B, T, H, D]; ``scale=None`` is D^-1/2).

Before anything is timed, every way's output on the first ``--check-window`` tokens of batch row 0 is compared
with the float64 reference (``lintx_triton.testing.forward_bound``: every term by its magnitude, times ``TOL``);
lintx's ways must be within their bound (exit code 1 otherwise), FLA's ratios are reported. Memory: on a GPU
``torch.cuda.max_memory_allocated`` above the inputs for one forward + backward; everywhere the live-bytes probe
of bench/learnable.py for lintx's ways (peak, and the phi-shaped [B, T, H, M] tensors the forward leaves for the
backward). Timing (``triton.testing.do_bench``, forward and forward + backward) needs a GPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys

import click
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lintx_triton as lx  # noqa: E402
from bench.learnable import LiveBytes  # noqa: E402
from lintx_triton import testing  # noqa: E402
from lintx_triton.spec import MAX_TRITON_DIM  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LINTX = ("fused", "torch_phi")
FLA = ("fla_fused_chunk", "fla_parallel", "fla_chunk")


def fla_ways() -> dict:
    """FLA's three ways, or {} when FLA is not installed (or there is no GPU: its ops are CUDA only)."""
    if not torch.cuda.is_available():
        return {}
    try:
        from fla.modules.feature_map import TaylorFeatureMap
        from fla.ops.based import fused_chunk_based, parallel_based
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return {}
    maps = {}

    def chunk(q, k, v):
        fm = maps.setdefault(q.shape[-1], TaylorFeatureMap(q.shape[-1]))
        return chunk_linear_attn(fm(q), fm(k), v, scale=1, normalize=True)[0]

    return {"fla_fused_chunk": lambda q, k, v: fused_chunk_based(q, k, v, scale=None, use_norm=True),
            "fla_parallel": lambda q, k, v: parallel_based(q, k, v, scale=None, use_norm=True),
            "fla_chunk": chunk}


def run_way(way: str, fm, q, k, v, fla: dict):
    if way == "fused":
        return lx.linear_attention(q, k, v, feature_map=fm)
    if way == "torch_phi":  # lintx's identity kernels take M up to 256: wider, the PyTorch chunked path
        backend = "auto" if fm.feature_dim(q.shape[-1]) <= MAX_TRITON_DIM else "torch"
        return lx.linear_attention(fm.features(q, "query"), fm.features(k, "key"), v, feature_map="identity",
                                   backend=backend)
    return fla[way](q, k, v)


def check(ways, fm, q, k, v, fla: dict, window: int) -> dict:
    """Each way's output on the first ``window`` tokens of batch row 0 against float64: worst error / (TOL x
    bound). Raises AssertionError when one of lintx's ways is outside its bound."""
    P = min(window, q.shape[1])
    qs, ks, vs = (x[:1, :P].detach() for x in (q, k, v))
    dtype = str(q.dtype).removeprefix("torch.")
    c = dict(feature_map=fm.name, causal=True, normalize=True, scale=1.0, dtype=dtype)
    ref, bound = testing.forward_bound(c, qs, ks, vs, None)
    out, bad = {}, []
    for way in ways:
        o = run_way(way, fm, qs, ks, vs, fla).detach()
        ratio = testing.error_ratio("o", o, ref, bound, testing.TOL[dtype])
        out[way] = dict(ratio=ratio, err=(o.double().cpu() - ref).abs().max().item(), max_ref=ref.abs().max().item())
        if way in LINTX and not ratio <= 1.0:
            bad.append(f"{way}: o is {ratio:.3g} x its tolerance x bound")
    if bad:
        raise AssertionError(f"{fm.name}: the first {P} tokens against float64: " + "; ".join(bad))
    return out


def measure(way, fm, q, k, v, do, fla: dict, B, T, H, M) -> dict:
    row = {}
    if way in LINTX:  # the live-bytes probe follows lintx's custom ops inside; FLA's autograd Functions it would not
        with LiveBytes() as p:
            o = run_way(way, fm, q, k, v, fla)
            kept = p.live_now()
            torch.autograd.grad(o, (q, k, v), do)
        phi_like = [n for n, shape, _ in kept if sorted(shape) == sorted((B, T, H, M))]
        kept_bytes = sum(n for n, _, _ in kept)
        # in units of one fp32 phi [B, T, H, M]: the PyTorch path keeps its copies in a chunked layout too
        row.update(peak_bytes=p.peak, kept_bytes=kept_bytes, kept_phi_shaped=len(phi_like),
                   kept_in_phis=kept_bytes / (4 * B * T * H * M))
    if q.is_cuda:
        import triton.testing

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        o = run_way(way, fm, q, k, v, fla)
        torch.autograd.grad(o, (q, k, v), do)
        torch.cuda.synchronize()
        row["cuda_peak_above_inputs_bytes"] = torch.cuda.max_memory_allocated() - base
        del o
        row["fwd_ms"] = triton.testing.do_bench(lambda: run_way(way, fm, q, k, v, fla))
        row["fwd_bwd_ms"] = triton.testing.do_bench(
            lambda: torch.autograd.grad(run_way(way, fm, q, k, v, fla), (q, k, v), do))
    return row


@click.command()
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True)
@click.option("--D", "D", default=16, show_default=True, help="head width (Based's feature dimension)")
@click.option("--DV", "DV", default=64, show_default=True)
@click.option("--H", "H", default=16, show_default=True)
@click.option("--tokens", default=32768, show_default=True, help="B * T")
@click.option("--T", "Ts", multiple=True, type=int, help="sequence lengths [default: 1024, 4096, 16384]")
@click.option("--compressed", is_flag=True, help="the upper-triangle map (M = 1 + D + D(D+1)/2)")
@click.option("--check-window", default=128, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def main(device, dtype, D, DV, H, tokens, Ts, compressed, check_window, out):
    """Time and memory of Based's Taylor map: fused, phi in PyTorch, and FLA's three ways (GPU)."""
    fm = lx.feature_maps.taylor(D, compressed=compressed)
    M = fm.feature_dim(D)
    fla = fla_ways() if device == "cuda" else {}
    ways = LINTX + tuple(w for w in FLA if w in fla)
    res = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, dtype=dtype, D=D, DV=DV, H=H, M=M, map=fm.name, ways=ways, rows=[])
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    failed = False
    for T in Ts or (1024, 4096, 16384):
        B = max(1, tokens // T)
        g = torch.Generator().manual_seed(0)
        q, k = ((torch.randn(B, T, H, D, generator=g) * 0.5).to(device, DTYPES[dtype]).requires_grad_()
                for _ in range(2))
        v = torch.randn(B, T, H, DV, generator=g).to(device, DTYPES[dtype]).requires_grad_()
        do = torch.randn(B, T, H, DV, generator=g).to(device, DTYPES[dtype])
        row = dict(T=T, B=B)
        try:
            row["check"] = check(ways, fm, q, k, v, fla, check_window)
        except AssertionError as e:
            row["check_failed"] = str(e)
            failed = True
        for way in ways:
            try:
                row[way] = measure(way, fm, q, k, v, do, fla, B, T, H, M)
            except Exception as e:  # an FLA way that cannot run this shape (its asserts), or out of memory
                row[way] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        res["rows"].append(row)
        pathlib.Path(out).write_text(json.dumps(res, indent=1))
        click.echo(json.dumps(row))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
