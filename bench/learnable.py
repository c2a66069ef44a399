"""Learnable feature maps (issue #16) fused in the kernels against the same map applied in PyTorch first.

    python bench/learnable.py --device cuda --out bench/out/learnable.json   # GPU: bf16, H = 16, D = 64, M = 128,
                                                                             # B*T = 32768, T = 1k, 4k, 16k
    python bench/learnable.py --T 72 --tokens 72 --H 2 --D 16 --dtype fp32 --out /tmp/l.json   # CPU, tiny

Two ways to train a learnable map (Hedgehog as LoLCATs writes it, per-head W [H, D, M/2]; T2R, per-head
W [H, D, M]), forward + backward including the map's dL/dW and dL/db:

* ``fused``: ``lx.linear_attention(q, k, v, feature_map=fm)``: the kernels build phi(q), phi(k) on chip from
  W and reduce dW, db per chunk (fp32 atomics into a per-head accumulator); phi never reaches memory.
* ``torch_phi`` (FLA's way, ``fla/layers/linear_attn.py``: the feature map is an nn.Module applied before
  the kernel): ``phi_q = fm.features(q, "query")``, ``phi_k = fm.features(k, "key")`` in PyTorch, then
  ``lx.linear_attention(phi_q, phi_k, v, feature_map="identity")``. Autograd keeps phi_q, phi_k [B, T, H, M]
  (and the map's own intermediates) for the backward.

Before anything is measured, both ways are checked on the first ``--check-window`` tokens of batch row 0
(every head: W is per head) against float64 with the tests' own criterion (``lintx_triton.testing``:
``forward_bound`` and ``grad_bound``, every term of every sum by its magnitude, times ``TOL`` / ``GTOL``):
the output, dq, dk, dv and every parameter gradient. The fused way must be within its bound, as in the
tests; the PyTorch way within ``LOOSE`` (8) x its bound (in bf16 it rounds W, phi and dL/dphi to bf16 before
the projection's backward sums over tokens). T2R's dW in bf16 is judged on the same slice in fp32 and
reported in bf16 (``run_row`` says why). The exit code is 1 when a check fails.

Memory, everywhere: a TorchDispatchMode probe (:class:`LiveBytes`) follows every storage the step allocates
(also inside the lintx custom ops, whose internal buffers it sees by redispatching them under the probe)
and reports the peak of the live bytes, the bytes still live when the forward returns (what the backward
keeps) and those of the kept tensors shaped B, T, H, M in any order: phi_q, phi_k and their copies. On a
CPU the kernels run in the Triton interpreter (tiny shapes only), whose tile arithmetic lives in numpy and is
not counted: what the probe counts is what a GPU would hold in memory. On a GPU, also the median time
(``triton.testing.do_bench``, forward alone and forward + backward) and ``torch.cuda.max_memory_allocated``
above the inputs for one forward + backward (outside do_bench, whose 256 MB cache-flush buffer would count).
The JSON is rewritten after every row, so a run killed at its time limit keeps what it measured.
"""

from __future__ import annotations

import gc
import os
import pathlib
import platform
import sys

import click
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lintx_triton as lx  # noqa: E402
from bench import harness  # noqa: E402
from lintx_triton import testing  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WAYS = ("fused", "torch_phi")
# the PyTorch way may be this many times its bound (the harness's LOOSE for alternatives): in bf16 it rounds
# W, phi and dL/dphi to bf16 before the projection's backward sums over tokens
LOOSE = harness.LOOSE


def build_map(name: str, D: int, M: int, H: int, tied: bool):
    """The benchmarked maps, per-head W (LoLCATs' layout), untied by default as in both papers' code."""
    if name == "hedgehog":  # LoLCATs: two softmaxes over M/2 projections each, no bias, kaiming init
        return lx.feature_maps.hedgehog(D, M, heads=H, variant="lolcats", tied=tied)
    if name == "hedgehog_fla":
        return lx.feature_maps.hedgehog(D, M, heads=H, variant="fla", tied=tied)
    if name == "t2r":
        return lx.feature_maps.t2r(D, M, heads=H, tied=tied)
    raise click.BadParameter(f"map must be hedgehog, hedgehog_fla or t2r, got {name!r}")


def run_way(way: str, fm, q, k, v):
    """The output of one way (causal, normalized, scale 1: the defaults)."""
    if way == "fused":
        return lx.linear_attention(q, k, v, feature_map=fm)
    phi_q, phi_k = fm.features(q, "query"), fm.features(k, "key")
    return lx.linear_attention(phi_q, phi_k, v, feature_map="identity")


def grads(fm, o, q, k, v, do) -> tuple:
    return torch.autograd.grad(o, (q, k, v, *fm.parameters()), do)


# ---------------------------------------------------------------------------------------------------
# the agreement check


def check(fm, q, k, v, do, window: int) -> dict:
    """Both ways on the first ``window`` tokens of batch row 0 against float64, with the tests' bounds; -> per
    output and gradient the worst error / (tolerance x bound) of each way and the largest errors. Raises
    AssertionError when the fused way is outside its bound or the PyTorch way outside ``LOOSE`` x its bound."""
    P = min(window, q.shape[1])
    qs, ks, vs, dos = (x[:1, :P].detach() for x in (q, k, v, do))
    dtype = str(q.dtype).removeprefix("torch.")
    c = dict(feature_map=fm.name, causal=True, normalize=True, scale=1.0, dtype=dtype)  # run_way's defaults
    params = list(fm.parameters())
    names = ["o", "dq", "dk", "dv"] + [f"d{n}" for n, _ in fm.named_parameters()]
    o_ref, o_bound = testing.forward_bound(c, qs, ks, vs, None)
    want = [o_ref] + testing.reference_grads(c, [qs, ks, vs] + params, do=dos.float())
    bounds = [o_bound] + testing.grad_bound(c, [qs, ks, vs] + params, do=dos.float())
    tols = [testing.TOL[dtype]] + [testing.GTOL[dtype]] * (len(names) - 1)
    got = {}
    for way in WAYS:
        xs = [x.clone().requires_grad_() for x in (qs, ks, vs)]
        o = run_way(way, fm, *xs)
        got[way] = [o] + list(torch.autograd.grad(o, xs + params, dos))
    out, bad = {}, []
    for i, name in enumerate(names):
        r = want[i].double().cpu()
        e = {way: got[way][i].detach().double().cpu() - r for way in WAYS}
        out[name] = dict(max_ref=r.abs().max().item(), **{f"err_{w}": e[w].abs().max().item() for w in WAYS},
                         **{f"ratio_{w}": testing.error_ratio(name, got[w][i], r, bounds[i], tols[i]) for w in WAYS})
        for way, limit in zip(WAYS, (1.0, LOOSE)):
            if not out[name][f"ratio_{way}"] <= limit:
                bad.append(f"{name}: {way} error {out[name][f'err_{way}']:.3g} is {out[name][f'ratio_{way}']:.3g} "
                           f"x its tolerance x bound (allowed {limit:g}; max |ref| {out[name]['max_ref']:.3g})")
    if bad:
        raise AssertionError(f"{fm.name}: the first {P} tokens against float64:\n  " + "\n  ".join(bad))
    return out


# ---------------------------------------------------------------------------------------------------
# the memory probe


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under the probe that are still alive, after every op: their peak, and a
    snapshot on demand.

    A storage counts from the op that first returns it (views, in-place ops and ``set_`` return an input's
    storage: not an allocation) until it is freed (a weak reference to the storage, so what autograd keeps for
    the backward stays counted though no Python object holds it). The lintx custom ops run under the probe
    too (redispatched to their device kernel), so their internal buffers are counted while they live.
    """

    KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (weak ref, bytes, shape, op)
        self.peak = 0
        self.inside_ops = True  # False once a lintx op could not be redispatched: its internals went uncounted

    def live_now(self) -> list[tuple[int, tuple, str]]:
        self.live = {p: e for p, e in self.live.items() if not e[0].expired()}
        return [(n, shape, op) for _, n, shape, op in self.live.values()]

    def live_bytes(self) -> int:
        return sum(n for n, _, _ in self.live_now())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        out = None
        if func.namespace == "lintx" and tensors and tensors[0].device.type in self.KEYS:
            try:
                with self:  # the op's own allocations, under the probe
                    out = func.redispatch(torch._C.DispatchKeySet(self.KEYS[tensors[0].device.type]), *args,
                                          **kwargs)
            except (NotImplementedError, RuntimeError):  # no kernel at that key: count the outputs only
                self.inside_ops = False
            # measured: run under the probe (not otherwise), the op's internal buffers (the chunk states) are
            # left in reference cycles and would count as live until the cyclic collector runs
            gc.collect()
        if out is None:
            out = func(*args, **kwargs)
        seen = {a.untyped_storage().data_ptr() for a in tensors}
        seen |= {a.data_ptr() for a in flat if isinstance(a, torch.UntypedStorage)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if st.nbytes() == 0 or ptr in seen or (ptr in self.live and not self.live[ptr][0].expired()):
                continue
            self.live[ptr] = (StorageWeakRef(st), st.nbytes(), tuple(t.shape), str(func))
        self.peak = max(self.peak, self.live_bytes())
        return out


def probe(way: str, fm, q, k, v, do, B: int, T: int, H: int, M: int) -> dict:
    """Peak live bytes of one forward + backward, and what the forward leaves for the backward."""
    with LiveBytes() as p:
        o = run_way(way, fm, q, k, v)
        kept = p.live_now()
        fwd_peak = p.peak
        g = grads(fm, o, q, k, v, do)
    del o, g
    # phi-shaped: B, T, H, M in any order (phi_q, phi_k or a copy; not the chunk states [B*H, N, M, DV])
    phi_like = [(n, shape, op) for n, shape, op in kept if sorted(shape) == sorted((B, T, H, M))]
    return dict(peak_bytes=p.peak, fwd_peak_bytes=fwd_peak, probe_inside_ops=p.inside_ops,
                kept_bytes=sum(n for n, _, _ in kept), kept_phi_shaped=len(phi_like),
                kept_phi_shaped_bytes=sum(n for n, _, _ in phi_like),
                kept_phi_shaped_shapes=sorted({f"{list(s)} {op}" for _, s, op in phi_like}),
                kept=[f"{n} B {list(s)} {op}" for n, s, op in sorted(kept, key=lambda e: -e[0])])


# ---------------------------------------------------------------------------------------------------
# one row


def run_row(name: str, B: int, T: int, H: int, D: int, M: int, DV: int, dtype, device, tied: bool,
            window: int, timing: harness.Timing) -> dict:
    torch.manual_seed(0)  # the maps' inits draw from the global generator: the same parameters every run
    fm = build_map(name, D, M, H, tied).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(B, T, H, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g).to(device, dtype).requires_grad_()
    do = torch.randn(B, T, H, DV, generator=g).to(device, dtype)
    phi_bytes = B * T * H * M * q.element_size()
    row = dict(map=fm.name, heads_of_W=fm.heads_of("query"), tied=fm.tied, B=B, T=T, H=H, D=D, M=M, DV=DV,
               dtype=str(dtype).removeprefix("torch."), phi_bytes=phi_bytes)
    row["check"] = check(fm, q, k, v, do, window)
    for way in WAYS:
        row[way] = probe(way, fm, q, k, v, do, B, T, H, M)
    row["kept_extra_bytes"] = row["torch_phi"]["kept_bytes"] - row["fused"]["kept_bytes"]
    row["kept_extra_in_phi"] = row["kept_extra_bytes"] / phi_bytes
    if device.type == "cuda":
        for way in WAYS:
            def fwd(way=way):
                return run_way(way, fm, q, k, v)

            def step(way=way):
                o = run_way(way, fm, q, k, v)
                torch.autograd.grad(o, (q, k, v, *fm.parameters()), do)

            step()
            r = row[way]
            r["peak_mib"] = harness.peak_mib(step, device)
            r["fwd_ms"], r["timer"] = harness.time_ms(fwd, device, timing)
            r["fwdbwd_ms"], _ = harness.time_ms(step, device, timing)
        row["fwdbwd_ratio"] = row["torch_phi"]["fwdbwd_ms"] / row["fused"]["fwdbwd_ms"]
        row["fwd_ratio"] = row["torch_phi"]["fwd_ms"] / row["fused"]["fwd_ms"]
        row["peak_extra_mib"] = row["torch_phi"]["peak_mib"] - row["fused"]["peak_mib"]
    return row


def describe(r: dict) -> str:
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    lines = [f"{r['map']} B={r['B']} T={r['T']} H={r['H']} D={r['D']} M={r['M']} DV={r['DV']} {r['dtype']} "
             f"(W per head: {r['heads_of_W']}, tied={r['tied']}); phi [B, T, H, M] = {mib(r['phi_bytes'])}"]
    c = r["check"]
    lines.append("  check vs float64, worst error / (tol x bound), fused / torch_phi: " + ", ".join(
        f"{n} {e['ratio_fused']:.2g}/{e['ratio_torch_phi']:.2g}" for n, e in c.items()))
    for way in WAYS:
        w = r[way]
        timing = (f"fwd {w['fwd_ms']:.3f} ms, fwd+bwd {w['fwdbwd_ms']:.3f} ms, cuda peak {w['peak_mib']:.1f} MiB; "
                  if "fwdbwd_ms" in w else "")
        lines.append(f"  {way:>9}: {timing}probe peak {mib(w['peak_bytes'])}, kept for the backward "
                     f"{mib(w['kept_bytes'])}, of which {w['kept_phi_shaped']} phi-shaped tensors "
                     f"({mib(w['kept_phi_shaped_bytes'])})")
    lines.append(f"  torch_phi keeps {r['kept_extra_in_phi']:.2f} x phi more than fused"
                 + (f"; fwd+bwd {r['fwdbwd_ratio']:.2f}x fused's time, fwd {r['fwd_ratio']:.2f}x, "
                    f"{r['peak_extra_mib']:.0f} MiB more at peak" if "fwdbwd_ratio" in r else ""))
    return "\n".join(lines)


def _ints(ctx, param, value):
    try:
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of integers, got {value!r}") from None


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--maps", default="hedgehog,t2r", show_default=True,
              help="comma-separated: hedgehog (LoLCATs), hedgehog_fla, t2r")
@click.option("--T", "Ts", default="1024,4096,16384", callback=_ints, show_default=True, help="sequence lengths")
@click.option("--tokens", default=32768, show_default=True, help="B*T (B = tokens // T, at least 1)")
@click.option("--H", "H", default=16, show_default=True)
@click.option("--D", "D", default=64, show_default=True)
@click.option("--M", "M", default=None, type=int, help="features (default 2D)")
@click.option("--DV", "DV", default=None, type=int, help="value width (default D)")
@click.option("--dtype", default="bf16", type=click.Choice(list(DTYPES)), show_default=True)
@click.option("--tied/--untied", default=False, show_default=True,
              help="one parameter set for queries and keys, or two (LoLCATs' and FLA's configs: two)")
@click.option("--check-window", default=128, show_default=True, help="tokens checked against float64")
@click.option("--rep-ms", default=100.0, show_default=True, help="do_bench repetition budget (CUDA)")
@click.option("--warmup-ms", default=25.0, show_default=True, help="do_bench warm-up budget (CUDA)")
@click.option("--out", default=None, help="write the rows as JSON here (rewritten after every row)")
@click.option("--device", "device_name", default="auto", type=click.Choice(["auto", "cuda", "cpu"]), show_default=True,
              help="auto: cuda when there is a GPU; cpu runs the kernels in the Triton interpreter, untimed")
def main(maps, Ts, tokens, H, D, M, DV, dtype, tied, check_window, rep_ms, warmup_ms, out, device_name):
    cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    if cuda and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: torch sees no GPU here")
    if cuda and os.environ.get("TRITON_INTERPRET") == "1":
        raise click.UsageError("--device cuda with TRITON_INTERPRET=1: the kernels would run in the interpreter")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise click.UsageError("--device cpu: the fused kernels need TRITON_INTERPRET=1 (set before Python starts)")
    device = torch.device("cuda" if cuda else "cpu")
    M, DV = M or 2 * D, DV or D
    timing = harness.Timing(warmup_ms=warmup_ms, rep_ms=rep_ms)
    result = dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'unknown'}), "
                  "Triton interpreter, not timed", torch=torch.__version__, triton=_triton_version(), rows=[])
    failed = False
    for T in Ts:
        for name in (m for m in maps.split(",") if m):
            try:
                row = run_row(name, max(1, tokens // T), T, H, D, M, DV, DTYPES[dtype], device, tied,
                              check_window, timing)
            except AssertionError as e:  # a failed check: say so, measure nothing for this row
                failed = True
                row = dict(map=name, T=T, error=str(e))
                print(f"CHECK FAILED: {e}")
            except Exception as e:  # e.g. a kernel that does not fit the GPU (OutOfResources): the next row
                failed = True
                row = dict(map=name, T=T, error=f"{type(e).__name__}: {e}")
                print(f"ERROR {name} T={T}: {type(e).__name__}: {e}")
            else:
                print(describe(row))
            result["rows"].append(row)
            if out:
                harness.save_json(result, out)
            if cuda:
                torch.cuda.empty_cache()
    sys.exit(1 if failed else 0)


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
