"""The side-by-side benchmark: lintx_triton against SDPA, FLA and plain PyTorch on the same inputs.

A *row* is one problem (mode, B, T, H, D, DV, dtype) and its inputs, made once from a seed; a *cell*
is one implementation run on a row. Every cell is checked against a float64 reference before it is
timed (``check_*``): a linear attention with the tests' checks (``lintx_triton.testing``: its float64
reference, error bounds and ``TOL`` / ``GTOL``) on slices of the very inputs that are timed; SDPA
against a float64 softmax. A slice is one (batch, head) pair and a window of W tokens at the start
(output and, for ``fwdbwd``, every gradient, with do zero outside the window) and at the end (output,
the float64 state of the tokens before it carried in). lintx must pass; an alternative whose worst
error is within ``LOOSE`` times its bound is timed and marked ``loose`` (its numerics are not ours to
gate: FLA rounds its normalizer's key sums to bf16), and one further off is not timed at all, since a
wrongly called alternative computes something else.

Modes (inputs ``[B, T, H, D]``; elu(x) + 1, causal, ``scale = 1``):
    fwd      forward, no autograd
    fwdbwd   forward and ``torch.autograd.grad`` of q, k, v
    prefill  forward from an initial state ``(S_0, z_0)``, returning the final state (SDPA: its forward)
    decode   one token for B sequences with a context of T tokens: the RNN step on a float32 state
             (lintx ``linear_attention_step_``), or SDPA of one query over a KV cache of T tokens

Per cell: the median time (``triton.testing.do_bench`` on CUDA; decode inside a CUDA graph with
``do_bench_cudagraph``, eager beside it; the median of ``perf_counter`` on a CPU), the peak memory
above the inputs (``torch.cuda.max_memory_allocated``; None on a CPU), and the fraction of the
memory-traffic floor: the bytes each input is read once and each output written once, over a
device-to-device copy bandwidth measured in the same process.

Only the public API is used: ``lintx_triton.linear_attention``, ``linear_attention_step_`` and
``lintx_triton.testing``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import lintx_triton as lx
from lintx_triton import testing
from lintx_triton.spec import DTYPES as SPEC_DTYPES

MODES = ("fwd", "fwdbwd", "prefill", "decode")
# the dtypes by short name (bf16), from lintx_triton.spec.DTYPES
DTYPES = {d.short: d for d in SPEC_DTYPES.values()}
# issue #6: H200, bf16, elu+1, normalize=True, B*T = 32768 tokens, H = 16, D = 64; decode B = 16, in a CUDA graph
TARGETS_MS = {"fwd": 0.13, "fwdbwd": 0.5, "decode": 0.006}
TARGET_SHAPE = dict(H=16, D=64, dtype="bf16", tokens=32768, decode_batch=16)
# an alternative within LOOSE x its error bound is timed and marked "loose"; further off, not timed
LOOSE = 8.0
EPS = 1e-6


def phi(x: Tensor) -> Tensor:
    """elu(x) + 1, applied in PyTorch as FLA's and plain PyTorch's users do."""
    return F.elu(x) + 1


# ---------------------------------------------------------------------------------------------------
# implementations


@dataclasses.dataclass(frozen=True)
class Impl:
    """One way to compute attention, in the harness's calling conventions.

    ``attend(q, k, v, state, return_state)`` takes ``[B, T, H, D]`` tensors and returns o ``[B, T, H, DV]``,
    and with ``return_state`` also ``(S [B, H, M, DV], z [B, H, M] or None)``. ``step(q, k, v, state)``
    (linear) takes one token ``[B, H, D]`` and a float32 state, returns ``(o [B, H, DV], state)``
    (updated in place or new); softmax's ``step(q, k_cache, v_cache)`` takes ``[B, H, D]`` and
    ``[B, H, N, D]`` and returns o. ``unavailable(mode, row, device)`` says why a cell cannot run, or
    None. ``late``: runtime autotuning makes its first call at each shape cost seconds to minutes, so
    its cells run after all others (on the same inputs, rebuilt from the same seed).
    """

    name: str
    label: str
    family: str  # "linear" | "softmax"
    normalize: bool = True
    attend: Optional[Callable] = None
    step: Optional[Callable] = None
    unavailable: Callable[[str, "Row", torch.device], Optional[str]] = lambda mode, row, device: None
    late: bool = False


def _lintx_attend(q, k, v, state=None, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, return_state=return_state)


def _lintx_step(q, k, v, state):
    return lx.linear_attention_step_(q, k, v, state), state


def _sdpa_attend(q, k, v, state=None, return_state=False):
    # [B, T, H, D] viewed as [B, H, T, D]: no copy, FlashAttention takes the strides
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def _sdpa_step(q, k_cache, v_cache):
    # one query per sequence over the whole cache: [B, H, 1, D] x [B, H, N, D]
    return F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache).squeeze(2)


def torch_attend(q, k, v, state=None, return_state=False, normalize=True):
    """Plain PyTorch causal linear attention as written from the paper: O(T^2) masked scores."""
    a, b = phi(q).transpose(1, 2), phi(k).transpose(1, 2)  # [B, H, T, D]
    vv = v.transpose(1, 2)  # [B, H, T, DV]
    A = (a @ b.transpose(-1, -2)).tril()  # [B, H, T, T]
    num, den = A @ vv, A.sum(-1)
    if state is not None:
        S0, z0 = state
        num = num.float() + a.float() @ S0
        den = den.float() + (a.float() @ z0[..., None]).squeeze(-1)
    o = (num / (den[..., None] + EPS) if normalize else num).to(q.dtype).transpose(1, 2)
    if not return_state:
        return o
    S = b.float().transpose(-1, -2) @ vv.float()
    z = b.float().sum(2)
    if state is not None:
        S, z = S + state[0], z + state[1]
    return o, (S, z)


def torch_step(q, k, v, state, normalize=True):
    """Plain PyTorch recurrent step, elementwise, updating (S, z) in place."""
    S, z = state
    a, b = phi(q.float()), phi(k.float())  # [B, H, D]
    S += b[..., :, None] * v.float()[..., None, :]
    z += b
    num = (a[..., None, :] @ S).squeeze(-2)
    o = num / ((a * z).sum(-1, keepdim=True) + EPS) if normalize else num
    return o.to(q.dtype), state


def _torch_chunked_attend(q, k, v, state=None, return_state=False):
    return lx.linear_attention(q, k, v, initial_state=state, return_state=return_state, backend="torch")


def _quadratic_gib(mode: str, row: "Row") -> float:
    # scores, their tril and (fwdbwd) the saved copies and their gradients: ~3 / ~6 [B, H, T, T] tensors
    n = 6 if mode == "fwdbwd" else 3
    return n * row.B * row.H * row.T * row.T * DTYPES[row.dtype].torch.itemsize / 2**30


def _torch_unavailable(max_gib: float):
    def why(mode, row, device):
        if mode != "decode" and _quadratic_gib(mode, row) > max_gib:
            return f"O(T^2) scores need ~{_quadratic_gib(mode, row):.0f} GiB > {max_gib:g} GiB (--torch-max-gib)"
        return None

    return why


_FLA: dict[str, Any] = {}


def fla_module():
    """FLA's linear-attention ops, or the reason they cannot be imported (cached; FLA is optional)."""
    if "mod" not in _FLA:
        try:
            import fla
            from fla.ops import linear_attn

            _FLA["mod"], _FLA["why"] = linear_attn, None
            _FLA["version"] = getattr(fla, "__version__", "?")
        except Exception as e:  # ModuleNotFoundError where absent; anything else where it breaks on import
            _FLA["mod"], _FLA["why"], _FLA["version"] = None, f"FLA not importable ({type(e).__name__}: {e})", None
    return _FLA["mod"], _FLA["why"]


def _fla_unavailable(mode, row, device):
    mod, why = fla_module()
    if mod is None:
        return why
    if device.type != "cuda":
        return "FLA runs on CUDA only"
    return None


def _fla_state(state, normalize):
    if state is None:
        return None
    return (state[0], state[1][:, None]) if normalize else state[0]  # z as FLA's [B, 1, H, K]


def _fla_final(fs, normalize):
    if not normalize:
        return fs, None
    S, z = fs
    return S, z[:, 0]


def _fla_attend(normalize):
    def attend(q, k, v, state=None, return_state=False):
        mod, _ = fla_module()
        o, fs = mod.chunk_linear_attn(phi(q), phi(k), v, scale=1.0, initial_state=_fla_state(state, normalize),
                                      output_final_state=return_state, normalize=normalize)
        return (o, _fla_final(fs, normalize)) if return_state else o

    return attend


def _fla_step(normalize):
    def step(q, k, v, state):
        mod, _ = fla_module()
        o, fs = mod.fused_recurrent_linear_attn(phi(q[:, None]), phi(k[:, None]), v[:, None], scale=1.0,
                                                initial_state=_fla_state(state, normalize),
                                                output_final_state=True, normalize=normalize)
        S, z = _fla_final(fs, normalize)
        return o[:, 0], (S, z if z is not None else state[1])

    return step


def _decode_only_in(name):
    return lambda mode, row, device: f"decode: see {name}" if mode == "decode" else None


def default_impls(torch_max_gib: float = 48.0) -> list[Impl]:
    """lintx, SDPA, FLA normalized and unnormalized, plain PyTorch (quadratic; recurrent decode), chunked PyTorch."""
    return [
        Impl("lintx", "lintx_triton", "linear", True, _lintx_attend, _lintx_step),
        Impl("sdpa", "SDPA causal (softmax)", "softmax", True, _sdpa_attend, _sdpa_step),
        Impl("fla", "FLA chunk, normalized", "linear", True, _fla_attend(True), _fla_step(True),
             _fla_unavailable, late=True),
        Impl("fla-raw", "FLA chunk, unnormalized", "linear", False, _fla_attend(False), _fla_step(False),
             _fla_unavailable, late=True),
        Impl("torch", "PyTorch, O(T^2) masked / recurrent step", "linear", True, torch_attend, torch_step,
             _torch_unavailable(torch_max_gib)),
        Impl("torch-chunked", "PyTorch chunked, O(T) (lintx backend='torch')", "linear", True,
             _torch_chunked_attend, None, _decode_only_in("torch")),
    ]


# ---------------------------------------------------------------------------------------------------
# rows and their inputs


@dataclasses.dataclass(frozen=True)
class Row:
    """One problem. For ``decode`` T is the context length (the state's prefix, SDPA's KV cache)."""

    mode: str
    B: int
    T: int
    H: int
    D: int
    DV: int
    dtype: str

    def key(self) -> str:
        return f"{self.mode}-B{self.B}-T{self.T}-H{self.H}-D{self.D}-DV{self.DV}-{self.dtype}"


def grid(modes: Sequence[str], Ts: Sequence[int], Ds: Sequence[int], H: int, tokens: int, decode_batch: int,
         dtype: str) -> list[Row]:
    """B = tokens // T (at least 1) for the sequence modes; B = decode_batch for decode."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    rows = []
    for D in Ds:
        for m in modes:
            for T in Ts:
                B = decode_batch if m == "decode" else max(1, tokens // T)
                rows.append(Row(m, B, T, H, D, D, dtype))
    return rows


def make_inputs(row: Row, device: torch.device, seed: int = 0) -> dict:
    """The row's inputs, the same for every implementation and every run with this seed."""
    g = torch.Generator(device=device).manual_seed(seed + zlib.crc32(row.key().encode()))
    dt = DTYPES[row.dtype].torch
    B, T, H, D, DV = row.B, row.T, row.H, row.D, row.DV

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    if row.mode == "decode":
        k_cache, v_cache = randn(B, H, T, D), randn(B, H, T, DV)  # [B, H, N, *]
        S = phi(k_cache.float()).transpose(-1, -2) @ v_cache.float()  # [B, H, D, DV]: the context's state
        z = phi(k_cache.float()).sum(2)
        return dict(q=randn(B, H, D), k=randn(B, H, D), v=randn(B, H, DV), k_cache=k_cache, v_cache=v_cache,
                    state=(S.contiguous(), z.contiguous()))
    q, k = (randn(B, T, H, D).requires_grad_() for _ in range(2))
    v = randn(B, T, H, DV).requires_grad_()
    inp = dict(q=q, k=k, v=v)
    if row.mode == "fwdbwd":
        inp["do"] = randn(B, T, H, DV)
    if row.mode == "prefill":
        kp, vp = phi(randn(B, 64, H, D, dtype=torch.float32)), randn(B, 64, H, DV, dtype=torch.float32)
        # the state a previous segment of 64 tokens leaves
        inp["state"] = (torch.einsum("bthm,bthv->bhmv", kp, vp).contiguous(), kp.sum(1).contiguous())
    return inp


def workload(impl: Impl, row: Row, inp: dict) -> Callable[[], Any]:
    """The function that is timed: one call of ``impl`` in the row's mode."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    if row.mode == "fwd":
        def run():
            with torch.no_grad():
                return impl.attend(q, k, v)
    elif row.mode == "fwdbwd":
        do = inp["do"]

        def run():
            o = impl.attend(q, k, v)
            return torch.autograd.grad(o, (q, k, v), do)
    elif row.mode == "prefill":
        state = inp["state"]

        def run():
            with torch.no_grad():
                if impl.family == "softmax":
                    return impl.attend(q, k, v)
                return impl.attend(q, k, v, state, True)
    else:
        if impl.family == "softmax":
            kc, vc = inp["k_cache"], inp["v_cache"]

            def run():
                return impl.step(q, kc, vc)
        else:
            work = tuple(x.clone() for x in inp["state"])  # stepped on by every timed call

            def run():
                return impl.step(q, k, v, work)
    return run


# ---------------------------------------------------------------------------------------------------
# correctness


def _case(row: Row, normalize: bool) -> dict:
    """The dict lintx_triton.testing keys its tolerances and references on."""
    return dict(dtype=DTYPES[row.dtype].name, feature_map="elu",
                causal=True, normalize=normalize, scale=1.0, initial_state=False)


def _picks(row: Row):
    return sorted({(0, 0), (row.B - 1, row.H - 1)})


def check_linear(impl: Impl, row: Row, inp: dict, window: int = 128) -> float:
    """Worst error / bound of a linear attention on slices of the row's inputs (see the module doc)."""
    c = _case(row, impl.normalize)
    tol = testing.TOL[c["dtype"]]
    if row.mode == "decode":
        return _check_linear_decode(impl, inp, c, tol)
    q, k, v = inp["q"], inp["k"], inp["v"]
    state = inp.get("state")
    T, W = row.T, min(row.T, window)
    worst = 0.0
    with torch.no_grad():
        o, final = impl.attend(q, k, v, state, True) if row.mode == "prefill" else (impl.attend(q, k, v), None)
    if not torch.isfinite(o).all():
        raise testing.EquivalenceError("non-finite output", math.inf)
    for b, h in _picks(row):
        def sl(x, t0, t1, b=b, h=h):  # [1, t1 - t0, 1, *]
            return x[b:b + 1, t0:t1, h:h + 1]

        st0 = tuple(x[b:b + 1, h:h + 1] for x in state) if state is not None else None
        # the first W tokens
        ref, bound = testing.forward_bound(c, sl(q, 0, W), sl(k, 0, W), sl(v, 0, W), st0)
        worst = max(worst, testing.error_ratio("o[:W]", sl(o, 0, W), ref, bound, tol))
        # the last W tokens, the float64 state of the T - W before them carried in
        if T > W:
            pre, pre_abs = testing.state_bound(c, sl(k, 0, T - W), sl(v, 0, T - W), st0)
            ref, bound = testing.forward_bound(c, sl(q, T - W, T), sl(k, T - W, T), sl(v, T - W, T), pre,
                                               state_abs=pre_abs)
            worst = max(worst, testing.error_ratio("o[T-W:]", sl(o, T - W, T), ref, bound, tol))
        if final is not None:  # prefill: the final state
            (S_ref, z_ref), (S_abs, z_abs) = testing.state_bound(c, sl(k, 0, T), sl(v, 0, T), st0)
            worst = max(worst, testing.error_ratio("S_T", final[0][b:b + 1, h:h + 1], S_ref, S_abs, tol))
            if final[1] is not None:
                worst = max(worst, testing.error_ratio("z_T", final[1][b:b + 1, h:h + 1], z_ref, z_abs, tol))
    if row.mode == "fwdbwd":
        worst = max(worst, _check_linear_grads(impl, row, inp, c, W))
    return worst


def _check_linear_grads(impl: Impl, row: Row, inp: dict, c: dict, W: int) -> float:
    """dq, dk, dv of the first W tokens of each pick, with do zero elsewhere (so nothing later feeds them)."""
    q, k, v, do = inp["q"], inp["k"], inp["v"], inp["do"]
    mask = torch.zeros_like(do)
    for b, h in _picks(row):
        mask[b, :W, h] = 1
    do_w = do * mask
    o = impl.attend(q, k, v)
    got = torch.autograd.grad(o, (q, k, v), do_w.to(o.dtype))
    for name, g in zip("qkv", got):
        if not torch.isfinite(g).all():
            raise testing.EquivalenceError(f"d{name}: non-finite values", math.inf)
    worst = 0.0
    for b, h in _picks(row):
        leaves = [x[b:b + 1, :W, h:h + 1] for x in (q, k, v)]
        d = do_w[b:b + 1, :W, h:h + 1].to(o.dtype)
        want, bounds = testing.reference_grads(c, leaves, d), testing.grad_bound(c, leaves, d)
        for name, g, w, bd in zip("qkv", got, want, bounds):
            worst = max(worst, testing.error_ratio(f"d{name}[:W]", g[b:b + 1, :W, h:h + 1], w, bd,
                                                   testing.GTOL[c["dtype"]]))
    return worst


def _check_linear_decode(impl: Impl, inp: dict, c: dict, tol: float) -> float:
    q, k, v = (inp[x][:, None] for x in "qkv")  # one token: [B, 1, H, *]
    S0, z0 = inp["state"]
    o, (S, z) = impl.step(inp["q"], inp["k"], inp["v"], (S0.clone(), z0.clone()))
    ref, bound = testing.forward_bound(c, q, k, v, (S0, z0))
    (S_ref, z_ref), (S_abs, z_abs) = testing.state_bound(c, k, v, (S0, z0))
    worst = testing.error_ratio("o", o[:, None], ref, bound, tol)
    worst = max(worst, testing.error_ratio("S", S, S_ref, S_abs, tol))
    if impl.normalize:
        worst = max(worst, testing.error_ratio("z", z, z_ref, z_abs, tol))
    return worst


def _softmax_ref(q, k, v, q0: int):
    """float64 causal softmax of queries q0.. over keys 0..; q [Wq, D], k [N, D], v [N, DV]; -> o, bound."""
    s = (q @ k.T) / math.sqrt(q.shape[-1])  # [Wq, N]
    pos = torch.arange(q.shape[0])[:, None] + q0
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos, -math.inf)
    p = torch.softmax(s, -1)
    return p @ v, p @ v.abs()


def check_softmax(impl: Impl, row: Row, inp: dict, window: int = 128) -> float:
    """SDPA's output on slices against a float64 softmax (forward only: SDPA is the ground truth here)."""
    tol = testing.TOL[_case(row, True)["dtype"]]
    worst = 0.0
    if row.mode == "decode":
        o = impl.step(inp["q"], inp["k_cache"], inp["v_cache"])
        for b, h in _picks(row):
            qq, kk, vv = (x.detach().double().cpu() for x in (inp["q"][b, h][None], inp["k_cache"][b, h],
                                                                inp["v_cache"][b, h]))
            ref, bound = _softmax_ref(qq, kk, vv, row.T)
            worst = max(worst, testing.error_ratio("o", o[b, h][None], ref, bound, tol))
        return worst
    q, k, v = inp["q"], inp["k"], inp["v"]
    with torch.no_grad():
        o = impl.attend(q, k, v)
    T, W = row.T, min(row.T, window)
    for b, h in _picks(row):
        qq, kk, vv = (x[b, :, h].detach().double() for x in (q, k, v))
        for q0 in sorted({0, T - W}):
            ref, bound = _softmax_ref(qq[q0:q0 + W].cpu(), kk[:q0 + W].cpu(), vv[:q0 + W].cpu(), q0)
            worst = max(worst, testing.error_ratio(f"o[{q0}:{q0 + W}]", o[b, q0:q0 + W, h], ref, bound, tol))
    return worst


def check(impl: Impl, row: Row, inp: dict, window: int = 128) -> float:
    """Worst error / bound (<= 1 passes); raises lintx_triton.testing.EquivalenceError only for non-finite or
    misshapen results."""
    return (check_softmax if impl.family == "softmax" else check_linear)(impl, row, inp, window)


# ---------------------------------------------------------------------------------------------------
# timing, memory, floors


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup_ms: float = 25.0  # do_bench's warm-up and repetition budgets (CUDA)
    rep_ms: float = 100.0
    graph_rep_ms: float = 20.0  # do_bench_cudagraph unrolls rep / (one call's time) calls into one graph
    cpu_warmup: int = 0  # calls before the perf_counter median (CPU); the check's call already warmed up
    cpu_reps: int = 5


def time_ms(fn: Callable, device: torch.device, timing: Timing = Timing(), graph: bool = False) -> tuple[float, str]:
    """Median ms of ``fn`` (warm-up excluded) and the timer used."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return (triton.testing.do_bench_cudagraph(fn, rep=timing.graph_rep_ms, return_mode="median"),
                    "do_bench_cudagraph")
        return triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms,
                                       return_mode="median"), "do_bench"
    for _ in range(timing.cpu_warmup):
        fn()
    times = []
    for _ in range(max(1, timing.cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "perf_counter"


def peak_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory one call allocates above what was allocated before it (outputs included); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, timing: Timing = Timing()) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**25)
    x = torch.ones(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms, _ = time_ms(lambda: y.copy_(x), device, timing)
    return 2 * nbytes / (ms * 1e-3)


def floor_bytes(row: Row, family: str) -> int:
    """Bytes each input is read once and each output written once (bf16 activations, fp32 states)."""
    e = DTYPES[row.dtype].torch.itemsize
    B, T, H, D, DV = row.B, row.T, row.H, row.D, row.DV
    M = D  # elu+1
    state = B * H * (M * DV + M) * 4
    if row.mode == "decode":
        tokens = B * H * (2 * D + 2 * DV) * e  # q, k, v in, o out
        if family == "softmax":
            return B * H * (D + DV) * e + B * H * T * (D + DV) * e  # q in, o out, the KV cache read
        return tokens + 2 * state  # the state read and written
    n = B * T * H
    fwd = n * (2 * D + 2 * DV) * e
    if row.mode == "fwd":
        return fwd
    if row.mode == "fwdbwd":
        return fwd + n * (2 * D + 2 * DV) * e + n * (2 * D + DV) * e  # q, k, v, do in; dq, dk, dv out
    return fwd + (2 * state if family == "linear" else 0)  # prefill


# ---------------------------------------------------------------------------------------------------
# the run


def device_info(device: torch.device) -> dict:
    import triton

    info = dict(device=str(device), torch=torch.__version__, triton=triton.__version__, lintx_triton=lx.__version__,
                python=platform.python_version(), host_cpu=platform.processor() or platform.machine(),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, sms=p.multi_processor_count,
                    gpu_mib=p.total_memory // 2**20, capability=f"{p.major}.{p.minor}")
    else:
        info.update(gpu=None, cpu_threads=torch.get_num_threads())
    _, why = fla_module()
    info["fla"] = _FLA.get("version") or why
    # what backend="auto" runs for lintx here
    info["lintx_backend"] = "triton" if (device.type == "cuda" or info["triton_interpret"]) else "torch"
    return info


def _cells(rows: Sequence[Row], impls: Sequence[Impl]):
    """(row, impl) in run order: per head width (in the rows' order), the non-late cells row by row, then
    the late ones; so a run cut short by its budget has whole head widths, the first one first."""
    order = []
    for D in dict.fromkeys(r.D for r in rows):
        for late in (False, True):
            for row in rows:
                if row.D == D:
                    order += [(row, impl) for impl in impls if impl.late == late]
    return order


def run_cell(impl: Impl, row: Row, inp: dict, device: torch.device, timing: Timing, window: int,
             time_failures: bool = False) -> dict:
    """Check, measure memory, time: one result dict. A failed check is not timed unless ``time_failures``."""
    res: dict[str, Any] = dict(status="ok")
    t0 = time.perf_counter()
    try:
        worst = check(impl, row, inp, window)
    except testing.EquivalenceError as e:
        worst, res["reason"] = e.worst, str(e)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res["first_call_s"] = round(time.perf_counter() - t0, 3)  # compile / autotune, plus the float64 check
    res["check_worst"] = worst
    if not worst <= 1.0:
        res.setdefault("reason", f"worst error {worst:.3g} x its bound (tol {testing.TOL[_case(row, True)['dtype']]})")
        if impl.name == "lintx" or not worst <= LOOSE:
            res["status"] = "fail"
            if not time_failures:
                return res
        else:
            res["status"] = "loose"
    fn = workload(impl, row, inp)
    res["peak_mib"] = peak_mib(fn, device)
    graph = row.mode == "decode" and device.type == "cuda"
    if graph:
        res["eager_ms"], _ = time_ms(fn, device, timing)
        try:
            res["time_ms"], res["timer"] = time_ms(fn, device, timing, graph=True)
        except Exception as e:  # a capture that fails: report eager, say why
            try:
                torch.cuda.synchronize(device)
            except Exception:
                pass
            res["time_ms"], res["timer"] = res["eager_ms"], "do_bench (CUDA graph capture failed)"
            res["reason"] = f"graph capture: {type(e).__name__}: {e}"[:300]
    else:
        res["time_ms"], res["timer"] = time_ms(fn, device, timing)
    return res


def run(rows: Sequence[Row], impls: Sequence[Impl], device: torch.device, *, timing: Timing = Timing(),
        window: int = 128, seed: int = 0, budget_s: Optional[float] = None, meta: Optional[dict] = None,
        time_failures: bool = False, on_cell: Optional[Callable[[dict, dict], None]] = None) -> dict:
    """Run every cell; ``on_cell(result, results)`` after each (the CLI saves and draws progress there).

    ``time_failures``: time cells whose check failed too (still marked "fail"; for a GPU session that
    must not come back without timings because a tolerance, never tried on that GPU, was missed).

    Returns ``{"meta": ..., "results": [...], "targets": [...], "ok": bool}`` (see :func:`summarize`).
    """
    start = time.perf_counter()
    out = dict(meta=dict(device_info(device), **(meta or {})), results=[])
    out["meta"]["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out["meta"]["copy_GBps"] = copy_bandwidth(device, timing=timing) / 1e9
    cur_key, inp = None, None
    for row, impl in _cells(rows, impls):
        res = dict(dataclasses.asdict(row), impl=impl.name, label=impl.label, family=impl.family)
        res["floor_ms"] = floor_bytes(row, impl.family) / (out["meta"]["copy_GBps"] * 1e9) * 1e3
        why = impl.unavailable(row.mode, row, device)
        if why is None and row.mode == "decode" and impl.step is None:
            why = "no decode step"
        if why is None and budget_s is not None and time.perf_counter() - start > budget_s:
            why = f"time budget ({budget_s:g} s) spent"
        if why is not None:
            res.update(status="skip", reason=why)
        else:
            try:
                if cur_key != row.key():
                    inp, cur_key = None, None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    inp, cur_key = make_inputs(row, device, seed), row.key()
                res.update(run_cell(impl, row, inp, device, timing, window, time_failures))
            except torch.cuda.OutOfMemoryError as e:
                res.update(status="skip", reason=f"out of memory: {str(e)[:200]}")
                torch.cuda.empty_cache()
            except Exception as e:  # one broken cell must not lose the grid
                res.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
        if res.get("time_ms") is not None and res["floor_ms"]:
            res["floor_frac"] = res["floor_ms"] / res["time_ms"]
        out["results"].append(res)
        summarize(out)
        if on_cell is not None:
            on_cell(res, out)
    out["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    return summarize(out)


def _row_key(r: dict) -> tuple:
    return (r["mode"], r["B"], r["T"], r["H"], r["D"], r["DV"], r["dtype"])


def summarize(out: dict) -> dict:
    """Fill in each lintx cell's ``speedup`` (alternative's time / lintx's, same row) and the targets."""
    by_row: dict[tuple, dict[str, dict]] = {}
    for r in out["results"]:
        by_row.setdefault(_row_key(r), {})[r["impl"]] = r
    targets = []
    gpu = out["meta"].get("gpu")
    for cells in by_row.values():
        lx_cell = cells.get("lintx")
        if lx_cell is None or lx_cell.get("time_ms") is None:
            continue
        lx_cell["speedup"] = {name: c["time_ms"] / lx_cell["time_ms"] for name, c in cells.items()
                              if name != "lintx" and c.get("time_ms") is not None}
        mode = lx_cell["mode"]
        ts = TARGET_SHAPE
        if (mode in TARGETS_MS and lx_cell["D"] == ts["D"] and lx_cell["H"] == ts["H"]
                and lx_cell["dtype"] == ts["dtype"]
                and (lx_cell["B"] == ts["decode_batch"] if mode == "decode"
                     else lx_cell["B"] * lx_cell["T"] in (ts["tokens"], lx_cell["T"]))):
            t = lx_cell["time_ms"]
            targets.append(dict(mode=mode, T=lx_cell["T"], B=lx_cell["B"], target_ms=TARGETS_MS[mode], time_ms=t,
                                timer=lx_cell.get("timer"), check=lx_cell["status"],
                                met=(t <= TARGETS_MS[mode]) if gpu and lx_cell["status"] == "ok" else None))
    out["targets"] = targets
    fails = [r for r in out["results"] if r["status"] in ("fail", "error") and r["impl"] == "lintx"]
    out["ok"] = not fails
    return out


def save_json(out: dict, path) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, default=str)
    os.replace(tmp, path)


def load_json(path) -> dict:
    with open(path) as f:
        return summarize(json.load(f))
