"""A small lintx case for compute-sanitizer: every kernel once, on odd shapes, checked against float64.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python bench/sanitize_case.py

Without the caching allocator each tensor is its own allocation, so an access past a tensor's end
is outside any allocation and memcheck reports it (inside PyTorch's pools it would not). Runs the
forward (fused and chunk-parallel paths: many short and one long sequence), the backward, a prefill
from a state and the in-place decode step (bf16 unless dtypes are named), then the variants the grid
does not reach: FAVOR+ (M = 2D, and M = 40 hyperbolic), grouped heads, packed sequences with an empty
one, the state alone. Exit code 1 when a result is off.
"""

from __future__ import annotations

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from lintx_triton import testing  # noqa: E402

# (mode, B, T, H, D, DV): T not a multiple of any chunk; one D != DV; few and many (batch, head) programs.
# D = DV = 64 and 128 in bf16 are the grid's kernels: compiled here, reused from the disk cache there.
CASES = [("fwd", 3, 77, 5, 64, 48), ("fwd", 1, 1000, 2, 64, 64), ("fwdbwd", 2, 200, 3, 64, 64),
         ("fwdbwd", 1, 300, 2, 128, 128), ("prefill", 2, 130, 3, 64, 64), ("decode", 3, 50, 5, 64, 64)]


def main(argv=None) -> int:
    """``python bench/sanitize_case.py [DTYPE ...]`` (bf16, fp16, fp32; default bf16)."""
    dtypes = (argv if argv is not None else sys.argv[1:]) or ["bf16"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lintx = next(i for i in harness.default_impls() if i.name == "lintx")
    bad = 0
    for dtype in dtypes:
        for mode, B, T, H, D, DV in CASES:
            row = harness.Row(mode, B, T, H, D, DV, dtype)
            inp = harness.make_inputs(row, device, seed=1)
            try:
                worst = harness.check(lintx, row, inp, window=64)
                harness.workload(lintx, row, inp)()  # the timed call too (decode: the in-place update)
            except testing.EquivalenceError as e:
                worst = e.worst
            if device.type == "cuda":
                torch.cuda.synchronize()
            ok = worst <= 1.0
            bad += not ok
            print(f"{row.key():40s} worst err / bound {worst:.3g} {'ok' if ok else 'FAIL'}", flush=True)
    bad += _kernel_variants(device, dtypes)
    bad += _hybrid_variants(device, dtypes)
    print(f"sanitize_case: {bad} failed on {device}")
    return 1 if bad else 0


def _kernel_variants(device, dtypes) -> int:
    """The kernel variants the grid does not reach: random features (M != D, M not a power of two), packed
    sequences with empty ones, grouped heads, the state alone, decode with grouped heads; each checked
    against the float64 reference (lintx_triton.testing's bounds)."""
    import lintx_triton as lx
    from lintx_triton.spec import dtype_of

    bad = 0
    for dtype in dtypes:
        dt = dtype_of(dtype).name
        fm = lx.feature_maps.favor(64, num_features=128, seed=0)
        odd = lx.feature_maps.favor(32, num_features=40, seed=1, hyperbolic=True)
        for label, c in [
            ("favor D64 M128 fwd+bwd", dict(B=2, T=150, H=3, D=64, DV=64, feature_map=fm.name, initial_state=True)),
            ("favor D32 M40 GQA fwd+bwd", dict(B=1, T=77, H=4, HKV=2, D=32, DV=48, feature_map=odd.name,
                                               initial_state=False)),
            ("elu GQA D128 fwd+bwd", dict(B=1, T=130, H=6, HKV=2, D=128, DV=128, feature_map="elu",
                                          initial_state=True)),
        ]:
            c = dict(c, dtype=dt, causal=True, normalize=True, scale=1.0, seed=3)
            try:
                got, want, bounds, names_ = testing.forward_and_grads(c, "triton", device=device)
                worst = testing.check_grads(c, got, want, bounds, names_)
                q, k, v, st = testing.make_inputs(c, device=device)
                o, final = testing.decode_steps(dict(c, T=min(c["T"], 9)), q[:, :9], k[:, :9], v[:, :9], st,
                                                "triton", inplace=True)
                worst = max(worst, testing.check_forward(dict(c, T=9), o, q[:, :9], k[:, :9], v[:, :9], st))
            except testing.EquivalenceError as e:
                worst = e.worst
            bad += _report(f"{label} {dt}", worst, device)
        # packed sequences (one empty, one of a single token) with grouped heads, and the state alone
        lens = [5, 0, 1, 140, 33]
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, sum(lens), 4, 64, generator=g).to(device, getattr(torch, dt))
        k, v = (torch.randn(1, sum(lens), 2, 64, generator=g).to(device, getattr(torch, dt)) for _ in range(2))
        o, (S, z) = lx.linear_attention(q, k, v, cu_seqlens=cu, return_state=True)
        S2, z2 = lx.linear_attention_state(k, v, cu_seqlens=cu)
        c = dict(B=1, T=sum(lens), H=4, HKV=2, D=64, DV=64, dtype=dt, feature_map="elu", causal=True,
                 normalize=True, initial_state=False, scale=1.0)
        try:  # each sequence against its own reference
            worst = max(testing.check_forward(c, o, q, k, v, None, cu_seqlens=cu),
                        testing.check_state(c, (S, z), q, k, v, None, cu_seqlens=cu),
                        testing.check_state(c, (S2, z2), q, k, v, None, cu_seqlens=cu))
        except testing.EquivalenceError as e:
            worst = e.worst
        bad += _report(f"packed lens {lens} GQA 4/2 + state alone {dt}", worst, device)
    return bad


def _hybrid_variants(device, dtypes, small: bool = False) -> int:
    """LoLCATs' hybrid (window=) through its Triton kernels, both windows: outputs, the state and every gradient
    (q, k, v, alpha, a pair state's S0, z0) of a grouped, packed call on odd lengths, then a prefill and decode
    steps, each against the float64 quadratic reference within testing's bounds (the parts' magnitudes, as
    tests/test_hybrid.py builds them). ``small``: the interpreter's shapes (the CPU test)."""
    import lintx_triton as lx
    from lintx_triton import hybrid as hy
    from lintx_triton.spec import dtype_of

    B, T, H, HKV, D, DV, w = (2, 21, 4, 2, 8, 5, 16) if small else (2, 333, 4, 2, 64, 48, 64)
    lens = [T - 8, 0, 8] if small else [100, 0, 1, 232]
    bad = 0
    for dtype in dtypes:
        dt = dtype_of(dtype).name
        for kind in hy.KINDS:
            g = torch.Generator().manual_seed(5)
            x = lambda *shape: torch.randn(*shape, generator=g).to(device, getattr(torch, dt))  # noqa: E731
            q, k, v = x(B, T, H, D), x(B, T, HKV, D), x(B, T, HKV, DV)
            alpha = torch.randn(H, generator=g).to(device)
            S0 = torch.rand(B, HKV, D, DV, generator=g).to(device)
            z0 = torch.rand(B, HKV, D, generator=g).to(device)
            leaves = [t.detach().requires_grad_() for t in (q, k, v, alpha, S0, z0)]
            kw = dict(window=w, kind=kind, affine=kind == "sliding")  # (both of alpha's conventions)
            try:
                o, st = lx.linear_attention(*leaves[:3], window=w, window_mix=leaves[3], window_kind=kind,
                                            window_affine=kw["affine"], initial_state=tuple(leaves[4:]),
                                            return_state=True, backend="triton")
                do = torch.randn(o.shape, generator=g).to(device)
                dS, dz = torch.ones_like(st.S), torch.ones_like(st.z)
                got = torch.autograd.grad((o.float() * do).sum() + st.S.sum() + st.z.sum(), leaves)
                fm = lx.feature_maps.get("elu")
                worst = max(testing.hybrid_error_ratios(*leaves[:4], fm, o.detach(), got, do, **kw,
                                                        initial_state=tuple(leaves[4:]), state=st, dS=dS,
                                                        dz=dz).values())
                # a prefill of 9 tokens, then 6 in-place steps, against the reference of the 15
                n = 9
                o1, st1 = lx.linear_attention(q[:, :n], k[:, :n], v[:, :n], window=w, window_mix=alpha,
                                              window_kind=kind, window_affine=kw["affine"], return_state=True,
                                              backend="triton")
                st1 = hy.WindowState(*(t.contiguous() for t in st1))
                outs = [o1] + [lx.linear_attention_step_(q[:, t], k[:, t], v[:, t], st1, window=w, window_mix=alpha,
                                                         window_kind=kind, window_affine=kw["affine"],
                                                         backend="triton")[:, None] for t in range(n, n + 6)]
                worst = max(worst, testing.hybrid_error_ratios(q[:, :n + 6], k[:, :n + 6], v[:, :n + 6], alpha, fm,
                                                               torch.cat(outs, 1), (), None, **kw)["o"])
                # packed sequences (one empty), grouped heads, the output of each against its own reference
                cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
                qp, kp, vp = x(1, sum(lens), H, D), x(1, sum(lens), HKV, D), x(1, sum(lens), HKV, DV)
                op = lx.linear_attention(qp, kp, vp, window=w, window_mix=alpha, window_kind=kind,
                                         window_affine=kw["affine"], cu_seqlens=cu, backend="triton")
                bs = cu.tolist()
                for a_, e_ in zip(bs[:-1], bs[1:]):
                    if e_ > a_:
                        sl = slice(a_, e_)
                        worst = max(worst, testing.hybrid_error_ratios(qp[:, sl], kp[:, sl], vp[:, sl], alpha, fm,
                                                                       op[:, sl], (), None, **kw)["o"])
            except testing.EquivalenceError as e:
                worst = e.worst
            bad += _report(f"hybrid {kind} w{w} GQA {H}/{HKV} D{D} DV{DV} {dt}", worst, device)
    return bad


def _report(label, worst, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
    ok = worst <= 1.0
    print(f"{label:40s} worst err / bound {worst:.3g} {'ok' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
