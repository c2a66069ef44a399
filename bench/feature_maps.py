"""FAVOR+ at M = 2D against elu+1: forward+backward time and memory, and proof that phi never reaches memory.

    python bench/feature_maps.py                       # GPU: bf16, B*T = 32768, H = 16, D = 64, T = 1k..16k
    python bench/feature_maps.py --T 256 --H 2 --D 16  # CPU: the Triton interpreter, allocation check only

On a GPU each row gives the median forward+backward time (``triton.testing.do_bench``), the peak
memory above the inputs, and FAVOR+'s ratio to elu+1 (issue #3's target: within 1.5x). Everywhere it
records the largest tensor allocated during forward+backward (a TorchDispatchMode probe) against
B*T*H*M, the size a materialized phi(q) or phi(k) would have: the fused kernels must stay below it.
Outputs are checked against the float64 reference on a prefix before anything is timed.
"""

from __future__ import annotations

import json
import os
import sys

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lintx_triton as lx  # noqa: E402
from lintx_triton.testing import TOL, assert_within, forward_bound  # noqa: E402


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _check(fm, q, k, v, dtype_name, prefix=128):
    """The op's output on the first ``prefix`` tokens against the float64 reference (causal: a prefix is exact)."""
    P = min(prefix, q.shape[1])
    qs, ks, vs = (x[:1, :P, :2].detach() for x in (q, k, v))
    c = dict(feature_map=fm.name, causal=True, normalize=True, scale=1.0, dtype=dtype_name)
    o = lx.linear_attention(qs, ks, vs, feature_map=fm)
    ref, bound = forward_bound(c, qs.cpu(), ks.cpu(), vs.cpu(), None)
    assert_within(f"{fm.name} o", o.cpu(), ref, bound, TOL[dtype_name])


def run_row(fm, B, T, H, D, dtype, device, time_it: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    dtype_name = str(dtype).removeprefix("torch.")
    _check(fm, q, k, v, dtype_name)

    def step():
        o = lx.linear_attention(q, k, v, feature_map=fm)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    with _Largest() as probe:
        step()
    M = fm.feature_dim(D)
    # only a map wider than the inputs (M > D) can be told apart from q, k, dq, dk themselves
    phi_buffer = probe.numel >= B * T * H * M if M > D else None
    row = dict(map=fm.name, B=B, T=T, H=H, D=D, M=M, dtype=dtype_name, largest_alloc=probe.numel,
               phi_numel=B * T * H * M, phi_buffer=phi_buffer)
    if time_it:
        import triton

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row["ms"] = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


@click.command()
@click.option("--T", "Ts", default="1024,4096,16384", help="comma-separated sequence lengths")
@click.option("--tokens", default=32768, help="B*T")
@click.option("--H", "H", default=16)
@click.option("--D", "D", default=64)
@click.option("--dtype", default="bfloat16", type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--out", default=None, help="write the rows as JSON here (rewritten after every T)")
def main(Ts, tokens, H, D, dtype, out):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dt = getattr(torch, dtype)
    maps = [lx.feature_maps.elu(), lx.feature_maps.favor(D, num_features=2 * D, seed=0)]
    rows = []

    def save():  # after every T: a run killed at its time limit keeps the rows it finished
        if out:
            with open(f"{out}.tmp", "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                               rows=rows), f, indent=1)
            os.replace(f"{out}.tmp", out)

    for T in (int(t) for t in Ts.split(",")):
        B = max(1, tokens // T)
        pair = [run_row(fm, B, T, H, D, dt, device, time_it=cuda) for fm in maps]
        if cuda:
            pair[1]["ratio_to_elu"] = pair[1]["ms"] / pair[0]["ms"]
        rows += pair
        for r in pair:
            timing = f"{r['ms']:.3f} ms, peak {r['peak_mib']:.0f} MiB" if cuda else "not timed (no GPU)"
            print(f"{r['map']:>16} B={B} T={T} H={H} D={D} M={r['M']}: {timing}; largest allocation "
                  f"{r['largest_alloc']} elements vs phi {r['phi_numel']} -> "
                  f"{ {True: 'A PHI-SIZED BUFFER', False: 'no phi buffer', None: 'n/a (M = D)'}[r['phi_buffer']]}")
        save()
    if any(r["phi_buffer"] is True for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
