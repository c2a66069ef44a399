"""A short demo: the op against the float64 reference, then its speed on this machine.

    python bench/demo.py            # CPU: Triton kernels in the interpreter for correctness, the torch path for speed
    python bench/demo.py --T 1024 4096 --heads 16 --dim 64

On a machine with a CUDA GPU it checks and times the generated Triton kernels and
``scaled_dot_product_attention(is_causal=True)`` beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    # Must precede the first kernel generation: Triton decides interpreted vs compiled at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lintx_triton as lx  # noqa: E402
from lintx_triton import feature_maps  # noqa: E402


def _time_ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check(device: torch.device) -> bool:
    """Every backend that runs here, against the float64 reference, on a small ragged shape, with the tests' own
    checks (lintx_triton.testing: every element within its error bound)."""
    from lintx_triton import testing

    B, T, H, D, DV = 2, 77, 3, 32, 48
    backends = ["triton"] + (["torch"] if device.type == "cpu" else [])
    where = "interpreter" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"correctness: B={B} T={T} H={H} D={D} DV={DV}, fp32, against the float64 reference "
          f"(worst err / bound, must be <= 1)")
    ok = True
    for fm in ("elu", "relu", feature_maps.favor(D, num_features=2 * D, seed=0).name):  # FAVOR+: M = 2D
        c = dict(B=B, T=T, H=H, D=D, DV=DV, dtype="float32", feature_map=fm, causal=True, normalize=True,
                 initial_state=False, scale=1.0, seed=0)
        q, k, v, _ = testing.make_inputs(c, device=device)
        for backend in backends:
            o, state = lx.linear_attention(q, k, v, feature_map=fm, backend=backend, return_state=True)
            try:
                worst = max(testing.check_forward(c, o, q, k, v, None), testing.check_state(c, state, q, k, v, None))
                good = True
            except testing.EquivalenceError as e:
                worst, good = e.worst, False
            ok &= good
            label = f"{backend} ({where})" if backend == "triton" else (
                "torch (recurrence in C)" if q.device.type == "cpu" and lx.native.available() else "torch (chunked)")
            print(f"  {fm:14s} {label:32s} output and state: worst err / bound = {worst:.2e}   "
                  f"{'ok' if good else 'FAIL'}")
    return ok


def speed(device: torch.device, Ts, heads: int, dim: int, tokens: int, dtype: torch.dtype) -> None:
    backend = "triton" if device.type == "cuda" else "torch"
    reps = 20 if device.type == "cuda" else 5
    print(f"\nspeed: backend={backend} on {device.type if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
          f"{dtype}, H={heads}, D=DV={dim}, B*T={tokens}, elu+1, normalized, median ms")
    print(f"  {'T':>6} {'B':>4} {'lintx fwd':>10} {'lintx fwd+bwd':>14} {'SDPA fwd':>9} {'SDPA fwd+bwd':>13}")
    for T in Ts:
        B = max(1, tokens // T)
        q, k, v = (torch.randn(B, T, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(v)

        def fwd():
            with torch.no_grad():
                lx.linear_attention(q, k, v, backend=backend)

        def fwd_bwd():
            o = lx.linear_attention(q, k, v, backend=backend)
            torch.autograd.grad(o, (q, k, v), do)

        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

        def sdpa_fwd():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        def sdpa_fwd_bwd():
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            torch.autograd.grad(o, (qt, kt, vt), do.transpose(1, 2))

        row = [_time_ms(f, device, reps) for f in (fwd, fwd_bwd, sdpa_fwd, sdpa_fwd_bwd)]
        print(f"  {T:>6} {B:>4} {row[0]:>10.2f} {row[1]:>14.2f} {row[2]:>9.2f} {row[3]:>13.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths to time")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=None, help="B*T, kept constant across T")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    print(f"lintx_triton {lx.__version__}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, device {device}")
    ok = check(device)
    speed(
        device,
        args.T or ([1024, 4096, 16384] if gpu else [256, 1024, 4096]),
        args.heads or (16 if gpu else 4),
        args.dim,
        args.tokens or (32768 if gpu else 4096),
        torch.bfloat16 if gpu else torch.float32,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
