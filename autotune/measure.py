"""Run, check and time one candidate, only through the public API.

A candidate is pinned with ``lintx_triton.config.override(**fields)`` around
``lintx_triton.linear_attention`` (forward; its autograd for the backward) or
``lintx_triton.linear_attention_step_`` (decode), so the tuner measures what a user's call runs.

Two correctness gates come before a time counts (a fast wrong config must never win):

- :func:`reference_check`: a small case through :mod:`lintx_triton.testing` against the float64
  reference (scale 0.5 and eps 0.5, where the defaults would hide a misplaced eps), every output and gradient
  within its bound;
- at the tuned shape itself (where the reference cannot run: it holds a [T, M, DV] state per token),
  :meth:`Workload.distance` of the candidate's outputs to the chunked PyTorch path; the tuner rejects
  a candidate further than ``FUDGE`` times the closest candidate's distance (a bar no single config,
  the default included, is trusted to set).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import lintx_triton as lx
from lintx_triton import testing
from lintx_triton.config import Config
from lintx_triton.spec import KernelSpec, dtype_of

from .space import kernel_fields

__all__ = ["FUDGE", "Timer", "Workload", "bench_timer", "reference_check", "split_batch_heads"]

# (fn, config) -> milliseconds. The config is there for injected timers (tests); do_bench ignores it.
Timer = Callable[[Callable[[], object], Config], float]
# A candidate's distance to the PyTorch path may be this many times the closest candidate's, plus
# UNITS roundings of the dtype.
FUDGE = 8.0
UNITS = 4
# How many input sets a timed function cycles through.
ROTATIONS = 3


def bench_timer(fn: Callable[[], object], cfg: Config) -> float:
    """The median of ``triton.testing.do_bench`` (it clears the L2 cache before every run), in ms."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def split_batch_heads(batch_heads: int) -> tuple[int, int]:
    """B*H as (B, H) with H a divisor of 16 (the kernels index heads within a batch)."""
    H = math.gcd(batch_heads, 16)
    return batch_heads // H, H


def _case(spec: KernelSpec, B: int, H: int, T: int, seed: int = 0) -> dict:
    return dict(B=B, T=T, H=H, D=spec.head_dim, DV=spec.value_dim, dtype=spec.dtype, feature_map=spec.feature_map,
                causal=spec.causal, normalize=spec.normalize, initial_state=spec.has_initial_state, scale=1.0,
                seed=seed)


def reference_check(kernel: str, spec: KernelSpec, cfg: Config, device) -> float:
    """Run ``kernel`` under ``cfg`` on a small case (several chunks, B = 1, H = 2) and check it against the
    float64 reference with :mod:`lintx_triton.testing`'s bounds. Returns the worst err / (tol x bound);
    raises ``testing.EquivalenceError`` when an element is off."""
    device = torch.device(device)
    fields = kernel_fields(kernel, cfg)
    c = _case(spec, 1, 2, 3 if kernel == "decode" else 2 * max(cfg.chunk, cfg.bwd_chunk) + 3)
    # scale and eps away from their defaults (1, 1e-6), as the tests draw them: eps = 1e-6 and scale = 1 hide a
    # path that drops eps or puts it inside the scale. A forward that ignores eps is rejected here (elu, D = DV =
    # 16, chunk 16, in the interpreter: float32 at 1.4e3 times its bound, bfloat16 at 1.6 times)
    c = dict(c, scale=0.5, eps=testing.EPS_VALUES[-1])
    kw = dict(feature_map=c["feature_map"], **testing.call_kwargs(c))
    with lx.config.override(**fields):
        if kernel == "backward":
            got, want, bounds, names = testing.forward_and_grads(c, "triton", device)
            return testing.check_grads(c, got, want, bounds, names)
        q, k, v, state = testing.make_inputs(c, device=device)
        if kernel == "decode":
            o, final = testing.decode_steps(c, q, k, v, state, "triton", inplace=True)
        else:
            o, final = lx.linear_attention(q, k, v, initial_state=state, return_state=True, backend="triton", **kw)
    return max(testing.check_forward(c, o, q, k, v, state), testing.check_state(c, final, q, k, v, state))


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.float(), w.float()
        if not torch.isfinite(g).all():
            return math.inf
        worst = max(worst, ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item())
    return worst


class Workload:
    """The inputs of one tuned shape and the calls a candidate is timed and checked on.

    Args:
        kernel: ``"forward"``, ``"backward"`` or ``"decode"``.
        spec: the kernel variant (its dtype, widths, map and flags).
        batch_heads: B*H, split by :func:`split_batch_heads`.
        T: tokens (ignored for decode: one token).
        device: where to run.
        rotations: input sets the timed function cycles through.
    """

    def __init__(self, kernel: str, spec: KernelSpec, batch_heads: int, T: int, device, rotations: int = ROTATIONS):
        self.kernel, self.spec, self.device = kernel, spec, torch.device(device)
        B, H = split_batch_heads(batch_heads)
        c = _case(spec, B, H, 1 if kernel == "decode" else T)
        self.kw = dict(feature_map=spec.feature_map, normalize=spec.normalize)
        if kernel != "decode":
            self.kw["causal"] = spec.causal
        self.sets = [testing.make_inputs(dict(c, seed=i), device=self.device) for i in range(rotations)]
        if kernel == "decode":
            M = spec.feature_dim
            self.sets = [(q[:, 0], k[:, 0], v[:, 0], (torch.zeros(B, H, M, spec.value_dim, device=self.device),
                                                      torch.zeros(B, H, M, device=self.device)))
                         for q, k, v, _ in self.sets]
        g = torch.Generator().manual_seed(len(self.sets))
        self.do = [torch.randn(q.shape[:-1] + (spec.value_dim,), generator=g).to(q.dtype).to(self.device)
                   for q, *_ in self.sets]
        self._graphs = None
        self._golden = None

    # ---- one call, by kernel

    def _forward(self, i: int, backend: str = "triton", requires_grad: bool = False):
        q, k, v, state = self.sets[i]
        if requires_grad:
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        o = lx.linear_attention(q, k, v, initial_state=state, backend=backend, **self.kw)
        return o, (q, k, v)

    def outputs(self, backend: str = "triton") -> list[torch.Tensor]:
        """What the candidate computes on the first input set: o; dq, dk, dv; or a step's o (fresh state)."""
        if self.kernel == "forward":
            return [self._forward(0, backend)[0]]
        if self.kernel == "decode":
            q, k, v, (S, z) = self.sets[0]
            S, z = S.clone(), z.clone()
            if backend == "torch":
                return [lx.linear_attention_step(q, k, v, (S, z), backend="torch", **self.kw)[0]]
            return [lx.linear_attention_step_(q, k, v, (S, z), backend=backend, **self.kw)]
        o, leaves = self._forward(0, backend, requires_grad=True)
        return list(torch.autograd.grad(o, leaves, self.do[0]))

    def timed(self) -> Callable[[], object]:
        """A function that runs the kernel once per call, on the next input set."""
        n = len(self.sets)
        it = iter(range(1 << 62))
        if self.kernel == "forward":
            return lambda: self._forward(next(it) % n)
        if self.kernel == "decode":
            def step():
                q, k, v, state = self.sets[next(it) % n]
                return lx.linear_attention_step_(q, k, v, state, **self.kw)
            return step
        if self._graphs is None:  # the forward runs once, under the default config; only the backward is timed
            self._graphs = [self._forward(i, requires_grad=True) for i in range(n)]

        def backward():
            i = next(it) % n
            o, leaves = self._graphs[i]
            return torch.autograd.grad(o, leaves, self.do[i], retain_graph=True)
        return backward

    def distance(self, cfg: Config) -> float:
        """max |x - x_torch| / max |x_torch| over ``cfg``'s outputs here, x_torch from the PyTorch path."""
        if self._golden is None:
            self._golden = [x.detach() for x in self.outputs("torch")]
        with lx.config.override(**kernel_fields(self.kernel, cfg)):
            return _rel_err(self.outputs(), self._golden)

    def tolerance(self, closest: float) -> float:
        """The largest distance a candidate may have when the closest one has ``closest``."""
        return FUDGE * closest + UNITS * torch.finfo(dtype_of(self.spec.dtype).torch).eps
