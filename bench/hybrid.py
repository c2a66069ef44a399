"""LoLCATs' sliding-window + linear hybrid on the CPU: the chunked torch path against the quadratic PyTorch way and
SDPA with a sliding-window mask, time and peak memory of one forward + backward.

    python bench/hybrid.py                                   # T = 1k..8k (bench/RESULTS.md)
    python bench/hybrid.py --T 16384,32768 --repeat 1        # long T: LoLCATs' quadratic way is not run
    python bench/hybrid.py --T 64 --H 1 --D 16 --window 16 --repeat 1   # tiny (what the tests run)
    python bench/hybrid.py --device cuda --T 4096,8192,16384,32768 --quad-max-T 16384   # a GPU: the fused kernels too

Rows (fp32, B = 1, elu(x) + 1, f = sigmoid(alpha) with alpha = logit(0.1), g = 1, softmax scale 1/sqrt(D)):

* ``hybrid (triton)`` (``--device cuda``, or ``--triton``): the fused Triton kernels (``backend="triton"``), checked
  against the float64 reference first (forward and every gradient).
* ``hybrid (chunked)``: ``lx.linear_attention(..., window=w, backend="torch")``, the terraced window
  (lintx_triton.hybrid).
* ``lolcats quadratic``: LoLCATs' ``hybrid_attention_quadratic`` (HazyResearch/lolcats 375df84,
  src/model/linear_attention/linear_window_attention_tk.py lines 25-84) transcribed: [T, T] masks and scores.
* ``sdpa sliding``: ``F.scaled_dot_product_attention`` with a [T, T] boolean sliding-window mask (the last w
  tokens): softmax alone, no linear part; what a model without the hybrid would run.
* ``sdpa causal``: ``is_causal=True`` over the whole sequence (the softmax attention being replaced).

Time: the minimum (and the median) of ``--repeat`` forward + backward runs after one warm-up, ``--chunked-repeat``
for the chunked hybrid (perf_counter; the minimum, as the least disturbed run on a shared machine; the ratios
are of minima). ``--threads 1`` on a machine shared with other work: two threads' small batched products wait
on a descheduled thread (bench/NOTES.md, 2026-12-01). Memory: the peak of
the bytes alive during one forward + backward beyond the inputs, counted by bench/learnable.py's
TorchDispatchMode probe (every storage allocated, until freed), run apart from the timed runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lintx_triton as lx  # noqa: E402
from bench.learnable import LiveBytes  # noqa: E402

ALPHA = math.log(0.1 / 0.9)  # LoLCATs' distillation configs: init_window_factor = -2.1972 (f = 0.1)


def lolcats_quadratic(q, k, f_q, f_k, v, window_factor, linear_factor, window_size):
    """LoLCATs' ``get_masks`` + ``hybrid_attention_quadratic`` (no prior state), as written there; [B, H, T, *]."""
    l, T = window_size, q.shape[-2]  # noqa: E741
    m = math.ceil(T / window_size)
    mask = torch.block_diag(*[torch.ones((l, l), )] * m)
    mask += torch.roll(mask, -l, -1)
    mask = mask[-T:, -T:][None, None]
    mask_window, mask_linear = torch.tril(mask).to(dtype=int), torch.tril(1 - mask).to(dtype=int)
    a_sm = torch.einsum('bhmd,bhnd->bhmn', q.float(), k.float()) * (k.shape[-1] ** -0.5)
    a_sm = a_sm.masked_fill(~mask_window.bool(), -1e8)
    a_sm_max = torch.amax(a_sm, dim=-1, keepdim=True)
    a_sm = window_factor * torch.exp(a_sm - a_sm_max)
    sum_sm = a_sm.sum(dim=-1, keepdim=True)
    a_ln = torch.einsum('bhmd,bhnd->bhmn', f_q.float(), f_k.float())
    a_ln = linear_factor * a_ln.masked_fill(~mask_linear.bool(), 0)
    sum_ln = a_ln.sum(dim=-1, keepdim=True)
    y = torch.einsum('bhmn,bhnd->bhmd', a_sm + a_ln, v.float())
    return y / (sum_sm + sum_ln)


def ways(T: int, w: int, device="cpu", triton: bool = False):
    """name -> fn(q, k, v, alpha) -> o, on [B, T, H, D] inputs; ``triton``: the fused kernels first."""
    fm = lx.feature_maps.get("elu")
    i = torch.arange(T, device=device)
    tr = lambda x: x.transpose(1, 2)  # noqa: E731

    def fused(q, k, v, alpha):
        return lx.linear_attention(q, k, v, window=w, window_mix=alpha, backend="triton")

    def chunked(q, k, v, alpha):
        return lx.linear_attention(q, k, v, window=w, window_mix=alpha, backend="torch")

    def quadratic(q, k, v, alpha):
        wf = torch.sigmoid(alpha)[None, :, None, None]
        return tr(lolcats_quadratic(tr(q), tr(k), tr(fm.features(q)), tr(fm.features(k)), tr(v), wf, 1, w))

    def sdpa_sliding(q, k, v, alpha):
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
        return tr(F.scaled_dot_product_attention(tr(q), tr(k), tr(v), attn_mask=mask))

    def sdpa_causal(q, k, v, alpha):
        return tr(F.scaled_dot_product_attention(tr(q), tr(k), tr(v), is_causal=True))

    return {**({"hybrid (triton)": fused} if triton else {}), "hybrid (chunked)": chunked,
            "lolcats quadratic": quadratic, "sdpa sliding": sdpa_sliding, "sdpa causal": sdpa_causal}


def check_fused(T: int, w: int, device, H: int, D: int) -> float:
    """The fused kernels' forward and gradients at (1, T, H, D) against float64 autograd of the quadratic reference
    (lintx_triton.testing.hybrid_error_ratios: testing's bounds): the worst error / (tol x bound), before anything
    is timed (<= 1 is within bound)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, T, H, D, generator=g).to(device).requires_grad_() for _ in range(3))
    alpha = torch.full((H,), ALPHA, device=device, requires_grad=True)
    do = torch.randn(1, T, H, D, generator=g).to(device)
    o = lx.linear_attention(q, k, v, window=w, window_mix=alpha, backend="triton")
    grads = torch.autograd.grad(o, (q, k, v, alpha), do)
    ratios = lx.testing.hybrid_error_ratios(q, k, v, alpha, lx.feature_maps.get("elu"), o.detach(), grads, do,
                                            window=w)
    return max(ratios.values())


def fwd_bwd(fn, q, k, v, alpha, do):
    o = fn(q, k, v, alpha)
    return torch.autograd.grad(o, (q, k, v, alpha) if alpha.requires_grad else (q, k, v), do, allow_unused=True)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def times_ms(fn, repeat: int, device="cpu") -> tuple[float, float]:
    """(min, median) of ``repeat`` runs after one warm-up, in ms."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", default="1024,2048,4096,8192", help="sequence lengths, comma-separated")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each way (after a warm-up)")
    ap.add_argument("--chunked-repeat", type=int, default=10, help="timed runs of the chunked hybrid (cheap)")
    ap.add_argument("--quad-max-T", type=int, default=8192,
                    help="longest T LoLCATs' quadratic way runs at (its [B, H, T, T] fp32 tensors)")
    ap.add_argument("--sdpa-max-T", type=int, default=16384,
                    help="longest T the SDPA rows run at (quadratic time; the sliding one a [T, T] mask)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: adds the fused Triton kernels' row (checked "
                    "against the float64 reference first) and measures memory with torch.cuda's peak")
    ap.add_argument("--triton", action="store_true", help="the Triton row on the CPU too (the interpreter: tiny T)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    triton = a.triton or dev.type == "cuda"
    if triton:
        err = check_fused(min(int(a.T.split(",")[0]), 1024), a.window, dev, a.H, a.D)
        print(f"fused kernels against float64 (forward and gradients, T <= 1024): worst error / bound {err:.3g}")
        if not err <= 1.0:
            raise SystemExit(f"the fused hybrid is off: worst error / bound {err:.3g}; not timed")
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={a.B} H={a.H} D={a.D} w={a.window}, "
          f"fp32, forward + backward")
    print(f"{'T':>6} {'way':<18} {'min ms':>10} {'median':>10} {'peak MiB':>10} {'ms / first':>13} "
          f"{'MiB / first':>14}")
    for T in (int(t) for t in a.T.split(",")):
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(a.B, T, a.H, a.D, generator=g).to(dev).requires_grad_() for _ in range(3))
        alpha = torch.full((a.H,), ALPHA, device=dev, requires_grad=True)
        do = torch.randn(a.B, T, a.H, a.D, generator=g).to(dev)
        base = None
        for name, fn in ways(T, a.window, dev, triton).items():
            note = None
            if name == "lolcats quadratic" and T > a.quad_max_T:
                note = f"not run: its [B, H, T, T] fp32 tensors are {a.B * a.H * T * T * 4 / 2**30:.1f} GiB each"
            elif name.startswith("sdpa") and T > a.sdpa_max_T:
                note = "not run (--sdpa-max-T)"
            if note:
                print(f"{T:>6} {name:<18} {note}")
                rows.append(dict(T=T, way=name, ms=None, peak_mib=None, note=note))
                continue
            run = lambda: fwd_bwd(fn, q, k, v, alpha, do)  # noqa: E731
            if dev.type == "cuda":  # the allocator's peak beyond what is allocated before the run
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            elif name == "hybrid (triton)":  # the probe does not see inside a custom op: no CPU figure
                peak = float("nan")
            else:
                with LiveBytes() as p:
                    run()
                peak = p.peak / 2**20
            n = a.chunked_repeat if name.startswith("hybrid") else a.repeat
            ms, med = times_ms(run, n, dev)
            if base is None:
                base = (ms, peak)
            rows.append(dict(T=T, way=name, ms=ms, median_ms=med, runs=n, peak_mib=peak, B=a.B, H=a.H, D=a.D,
                             window=a.window))
            print(f"{T:>6} {name:<18} {ms:>10.1f} {med:>10.1f} {peak:>10.1f} {ms / base[0]:>13.2f} "
                  f"{peak / base[1]:>14.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), device=str(dev),
                           gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, rows=rows), fh,
                      indent=1)


if __name__ == "__main__":
    main()
