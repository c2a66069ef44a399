"""Numerical-equivalence properties, shipped with the package.

The test suite and ``lintx fuzz`` use the same cases, inputs and error bounds:
every output is compared with the float64 reference of
:mod:`lintx_triton.reference`, element by element, against a bound scaled by the
magnitude of the terms the exact value sums (the reference evaluated on
absolute values), so cancellation cannot make a check flaky and a tolerance
still means something.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import strategies as st

from . import feature_maps
from .api import linear_attention, linear_attention_step, linear_attention_step_
from .feature_maps import RANDOM_FAMILIES
from .reference import linear_attention_reference
from .spec import DTYPES

__all__ = [
    "DTYPES", "TOL", "GTOL", "T_VALUES", "D_VALUES", "DV_VALUES", "M_VALUES", "RANDOM_FAMILIES", "ensure_map",
    "cases", "case_id", "make_inputs",
    "reference", "forward_bound", "grad_bound", "check_forward", "check_state", "check_grads",
    "forward_and_grads", "decode_steps", "EquivalenceError",
]

# Forward: |o - ref| <= TOL * bound. fp32 runs IEEE products; fp16 rounds product operands to 11 bits;
# bf16 rounds them to 8 bits on the GPU (upcast in the interpreter, whose fp32 -> bf16 cast truncates).
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 1.6e-2}
# Gradients: |g - ref| <= GTOL * bound + the dtype's subnormal spacing.
GTOL = {"float32": 5e-5, "float16": 5e-3, "bfloat16": 2e-2}
# Sequence lengths around the interpreter's chunk sizes (16, 32) and some primes.
T_VALUES = (1, 2, 7, 15, 16, 17, 31, 32, 33, 47, 61)
D_VALUES = (1, 4, 8, 13, 16, 32, 48)
DV_VALUES = (1, 3, 8, 16, 24, 48, 80)


class EquivalenceError(AssertionError):
    """An output or gradient is further from the float64 reference than its bound allows."""

    def __init__(self, msg: str, worst: float):
        super().__init__(msg)
        self.worst = worst


# A case may draw a random-feature family (feature_maps.RANDOM_FAMILIES): D, M and the seed drawn with it.
M_VALUES = (2, 6, 16, 24, 40)  # even (the paired maps), rarely powers of two


@functools.lru_cache(maxsize=256)
def _random_map(family: str, D: int, M: int, seed: int) -> feature_maps.FeatureMap:
    # one draw per (family, D, M, seed): a case's inputs, reference and bounds all ask for its map
    return RANDOM_FAMILIES[family](D, M, seed)


def ensure_map(c: dict) -> feature_maps.FeatureMap:
    """The case's feature map, registered; a random-feature case's draw (``c["map"]``) is put back in the
    registry, since a later case may have registered another draw under the same name."""
    spec = c.get("map")
    if spec is not None:
        return feature_maps.register(_random_map(spec["family"], spec["D"], spec["M"], spec["seed"]))
    return feature_maps.get(c["feature_map"])


@st.composite
def cases(draw, maps=("elu", "relu", "identity"), dtypes=tuple(DTYPES), t_values=T_VALUES, causal=None,
          normalize=None, initial_state=None, d_values=D_VALUES, dv_values=DV_VALUES):
    """A random call: shapes, dtype, map and flags (a dict; fixed flags when given).

    ``maps`` holds registered names and/or the families of :data:`RANDOM_FAMILIES`."""
    c = draw(st.booleans()) if causal is None else causal
    D = draw(st.sampled_from(d_values))
    name = draw(st.sampled_from(maps))
    extra = {}
    if name in RANDOM_FAMILIES:
        extra["map"] = dict(family=name, D=D, M=draw(st.sampled_from(M_VALUES)), seed=draw(st.integers(0, 99)))
        name = _random_map(name, D, extra["map"]["M"], extra["map"]["seed"]).name
    elif feature_maps.get(name).projected:  # a registered projected map is built for one D
        D = feature_maps.get(name).head_dim
    return dict(
        B=draw(st.integers(1, 2)),
        T=draw(st.sampled_from(t_values)),
        H=draw(st.integers(1, 3)),
        D=D,
        DV=draw(st.sampled_from(dv_values)),
        dtype=draw(st.sampled_from(dtypes)),
        feature_map=name,
        **extra,
        causal=c,
        normalize=draw(st.booleans()) if normalize is None else normalize,
        initial_state=c and (draw(st.booleans()) if initial_state is None else initial_state),
        scale=draw(st.sampled_from([1.0, 0.125, 0.5])),
        seed=draw(st.integers(0, 2**16)),
    )


def case_id(c: dict) -> str:
    """``B2-T63-H3-D48-DV80-bfloat16-elu-causal-norm-h0-scale1.0``."""
    return (
        f"B{c['B']}-T{c['T']}-H{c['H']}-D{c['D']}-DV{c['DV']}-{c['dtype']}-{c['feature_map']}"
        f"-{'causal' if c['causal'] else 'full'}-{'norm' if c['normalize'] else 'raw'}"
        f"{'-h0' if c['initial_state'] else ''}-scale{c['scale']}"
    )


def make_inputs(c: dict, requires_grad: bool = False, device="cpu"):
    """q, k, v and the initial state (or None) of a case, deterministic in ``c['seed']``."""
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]].torch
    B, T, H, D, DV = c["B"], c["T"], c["H"], c["D"], c["DV"]
    HKV = c.get("HKV", H)  # key/value heads (grouped-query when fewer than H)
    q = torch.randn(B, T, H, D, generator=g).to(dt)
    k = torch.randn(B, T, HKV, D, generator=g).to(dt)
    v = torch.randn(B, T, HKV, DV, generator=g).to(dt)
    state = None
    fm = ensure_map(c)
    if c["initial_state"]:
        # a state as a previous segment of 5 tokens would leave it
        kk = fm.reference(torch.randn(B, 5, HKV, D, generator=g))
        vv = torch.randn(B, 5, HKV, DV, generator=g)
        state = (torch.einsum("bthm,bthv->bhmv", kk, vv).contiguous(), kk.sum(1).contiguous())
    q, k, v = (x.to(device) for x in (q, k, v))
    if state is not None:
        state = tuple(x.to(device) for x in state)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        if state is not None:
            state = tuple(x.requires_grad_() for x in state)
    return q, k, v, state


def _kwargs(c: dict) -> dict:
    return dict(causal=c["causal"], normalize=c["normalize"], scale=c["scale"])


def reference(c: dict, q, k, v, state, absolute=False, dtype=torch.float64):
    """The float64 reference of a case (on the CPU)."""
    cpu = lambda x: x.detach().cpu() if not x.requires_grad else x.cpu()  # noqa: E731
    st_ = tuple(cpu(x) for x in state) if state is not None else None
    return linear_attention_reference(cpu(q), cpu(k), cpu(v), ensure_map(c),
                                      initial_state=st_, absolute=absolute, dtype=dtype, **_kwargs(c))


def forward_bound(c: dict, q, k, v, state):
    """The reference output and the per-element scale of its rounding error.

    N = scale |a|^T (|S_0| + sum |b||v|^T) and Dn = scale |a|^T (|z_0| + sum |b|) + eps bound the
    magnitudes the kernels add up; for o = num / den a relative error u on both moves o by
    u (N + |o| Dn) / |den|.
    """
    q, k, v = (x.detach() for x in (q, k, v))
    state = tuple(x.detach() for x in state) if state is not None else None
    o, _, num, den = reference(c, q, k, v, state)
    _, _, n_abs, d_abs = reference(c, q, k, v, state, absolute=True)
    if not c["normalize"]:
        return o, n_abs
    return o, (n_abs + o.abs() * d_abs[..., None]) / den.abs()[..., None]


def _assert_within(name, got, want, bound, tol):
    g = got.detach().cpu().double()
    err = (g - want).abs()
    # an exact value beyond the dtype's range rounds to +-inf, which is then the right answer (an fp16
    # gradient of unnormalized random features can exceed 65504)
    rounded = want.to(got.dtype).double()
    err = torch.where(torch.isinf(rounded) & (g == rounded), torch.zeros_like(err), err)
    fi = torch.finfo(got.dtype)
    # + the spacing of subnormals: a value below the smallest normal is stored with fewer bits
    limit = tol * bound + fi.smallest_normal * fi.eps
    ratio = (err / limit).max().item() if err.numel() else 0.0
    bad = ~(err <= limit)
    if bad.any():
        raise EquivalenceError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst err {err.max().item():.3e}, "
            f"worst err / (tol x bound) {ratio:.3e} with tol {tol}",
            ratio,
        )
    return ratio


def check_forward(c: dict, out, q, k, v, state, name="o") -> float:
    """Raise EquivalenceError unless ``out`` is within bound; returns the worst err / (tol x bound)."""
    ref, bound = forward_bound(c, q, k, v, state)
    if out.dtype != q.dtype or tuple(out.shape) != tuple(ref.shape):
        raise EquivalenceError(f"{name}: got {out.dtype} {tuple(out.shape)}, want {q.dtype} {tuple(ref.shape)}",
                               float("inf"))
    return _assert_within(name, out, ref, bound, TOL[c["dtype"]])


def check_state(c: dict, got, q, k, v, state) -> float:
    """The final state (S_T, z_T) against the reference; returns the worst ratio."""
    dq = lambda t: tuple(x.detach() for x in t) if t is not None else None  # noqa: E731
    _, (S_ref, z_ref), _, _ = reference(c, q.detach(), k.detach(), v.detach(), dq(state))
    _, (S_abs, z_abs), _, _ = reference(c, q.detach(), k.detach(), v.detach(), dq(state), absolute=True)
    worst = 0.0
    for name, x, ref, bound in (("S_T", got[0], S_ref, S_abs), ("z_T", got[1], z_ref, z_abs)):
        if x.dtype != torch.float32 or tuple(x.shape) != tuple(ref.shape):
            raise EquivalenceError(f"{name}: got {x.dtype} {tuple(x.shape)}", float("inf"))
        worst = max(worst, _assert_within(name, x, ref, bound, TOL[c["dtype"]]))
    return worst


def grad_bound(c: dict, leaves, do, dS, dz):
    """Per-element scale of the rounding error of each gradient.

    The float64 reference on absolute values, with |do|, |dS|, |dz|, differentiated: every term of
    every gradient enters with its magnitude. For normalized outputs the loss is linearized as
    |do| (N + |o| Dn) / |den| with o and den held fixed.
    """
    leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    state = tuple(leaves[3:]) if len(leaves) > 3 else None
    o, _, _, den = reference(c, *(x.detach() for x in leaves[:3]),
                             tuple(x.detach() for x in state) if state else None)
    _, (S_abs, z_abs), n_abs, d_abs = reference(c, *leaves[:3], state, absolute=True)
    out = (n_abs + o.abs() * d_abs[..., None]) / den.abs()[..., None] if c["normalize"] else n_abs
    loss = (out * do.double().cpu().abs()).sum() + (S_abs * dS.double().cpu().abs()).sum() \
        + (z_abs * dz.double().cpu().abs()).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [g.abs() if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def check_grads(c: dict, got, want, bounds, names) -> float:
    worst = 0.0
    for name, g, w, b in zip(names, got, want, bounds):
        if g is None:
            raise EquivalenceError(f"no gradient for {name}", float("inf"))
        if tuple(g.shape) != tuple(w.shape) or torch.isnan(g.detach()).any():
            raise EquivalenceError(f"d{name}: shape {tuple(g.shape)} (want {tuple(w.shape)}) or NaN values",
                                   float("inf"))
        worst = max(worst, _assert_within(f"d{name}", g, w, b, GTOL[c["dtype"]]))
    return worst


def forward_and_grads(c: dict, backend: str, device="cpu", final_state_grad: bool = True):
    """Run a case forward and backward; -> (got, want, bounds, names) for :func:`check_grads`."""
    q, k, v, state = make_inputs(c, requires_grad=True, device=device)
    o, (S, z) = linear_attention(q, k, v, feature_map=c["feature_map"], initial_state=state, backend=backend,
                                 return_state=True, **_kwargs(c))
    g = torch.Generator().manual_seed(c["seed"] + 1)
    # the op receives do in o's dtype: round it once so that every evaluation sees the same do
    do = torch.randn(o.shape, generator=g).to(o.dtype).float()
    dS = torch.randn(S.shape, generator=g) if final_state_grad else torch.zeros(S.shape)
    dz = torch.randn(z.shape, generator=g) if final_state_grad else torch.zeros(z.shape)
    leaves = [q, k, v] + (list(state) if state is not None else [])
    loss = (o.float() * do.to(device)).sum() + (S * dS.to(device)).sum() + (z * dz.to(device)).sum()
    got = torch.autograd.grad(loss, leaves)

    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    rstate = tuple(ref_leaves[3:]) if state is not None else None
    ro, (rS, rz), _, _ = reference(c, *ref_leaves[:3], rstate)
    rloss = (ro * do.double()).sum() + (rS * dS.double()).sum() + (rz * dz.double()).sum()
    want = torch.autograd.grad(rloss, ref_leaves, allow_unused=True)  # z_0 is unused unnormalized
    want = [w if w is not None else torch.zeros_like(x) for w, x in zip(want, ref_leaves)]
    bounds = grad_bound(c, leaves, do, dS, dz)
    return got, want, bounds, ["q", "k", "v", "S_0", "z_0"][: len(leaves)]


def decode_steps(c: dict, q, k, v, state, backend: str, inplace: bool = False):
    """The case's tokens one at a time through the RNN form; -> (o [B, T, H, DV], final state)."""
    kw = dict(feature_map=c["feature_map"], normalize=c["normalize"], scale=c["scale"], backend=backend)
    B, T, H, D = q.shape
    outs = []
    if inplace:
        M = feature_maps.get(c["feature_map"]).feature_dim(D)
        HKV = k.shape[2]  # the state is per key/value head
        S = state[0].clone() if state else torch.zeros(B, HKV, M, v.shape[-1], device=q.device)
        z = state[1].clone() if state else torch.zeros(B, HKV, M, device=q.device)
        for t in range(T):
            outs.append(linear_attention_step_(q[:, t], k[:, t], v[:, t], (S, z), **kw))
        final = (S, z)
    else:
        final = state
        for t in range(T):
            o, final = linear_attention_step(q[:, t], k[:, t], v[:, t], final, **kw)
            outs.append(o)
    return torch.stack(outs, 1), final
