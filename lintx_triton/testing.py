"""Numerical-equivalence properties, shipped with the package.

The test suite, the benchmark harness (bench/harness.py) and ``lintx fuzz`` use the same cases, inputs
and error bounds: every output is compared with the float64 reference of
:mod:`lintx_triton.reference`, element by element, against a bound scaled by the
magnitude of the terms the exact value sums (the reference evaluated on
absolute values), so cancellation cannot make a check flaky and a tolerance
still means something.

A case is a dict (B, T, H, D, DV, dtype, feature_map, causal, normalize, initial_state, scale, seed;
optionally HKV for grouped heads, map for a random-feature draw, eps, default 1e-6). The public API:

Cases and inputs
    ``cases(...)``                  hypothesis strategy of cases; ``case_id(c)`` a readable id
    ``call_kwargs(c)``              causal, normalize, scale and eps of a case, as the ops take them
    ``make_inputs(c)``              q, k, v and the initial state (or None), deterministic in the seed
    ``signed_map(fm)``              whether phi can be negative (a normalizer can then pass through 0)
    ``positive_den_inputs(fm)``     how inputs keep every term of such a map's normalizer positive (the case
                                    key ``inputs="positive_den"``, ``cases(positive_den=True)``), or None
    ``ensure_map(c)``               the case's feature map, registered
    ``decode_steps(c, ...)``        the case's tokens one at a time through the RNN form
References and bounds (float64, on the CPU)
    ``reference(c, q, k, v, state)``           o, (S_T, z_T), num, den
    ``forward_bound(c, q, k, v, state)``       (o, bound of o's rounding error); ``state_abs`` for a
                                               carried-in state whose terms cancelled
    ``state_bound(c, k, v, state)``            ((S_T, z_T), their bounds), from the keys alone
    ``reference_grads(c, leaves, do, dS, dz)`` gradients of sum(o do) + sum(S_T dS) + sum(z_T dz)
    ``grad_bound(c, leaves, do, dS, dz)``      the bound of each of those gradients
Judging (``TOL`` for outputs and states, ``GTOL`` for gradients, by dtype name)
    ``error_ratio(name, got, want, bound, tol)``    worst err / (tol x bound), not judged
    ``assert_within(name, got, want, bound, tol)``  the same, raising EquivalenceError when > 1
    ``check_forward(c, o, q, k, v, state)``         o against forward_bound
    ``check_state(c, (S, z), q, k, v, state)``      a final state against state_bound
    ``check_grads(c, got, want, bounds, names)``    gradients against reference_grads / grad_bound
    ``forward_and_grads(c, backend)``               run a case forward and backward: the arguments of
                                                    check_grads
    ``op_grads(c, backend)``                        its first half: the op's gradients alone (no reference)
Every check returns the worst err / (tol x bound) and raises :class:`EquivalenceError` (carrying it as
``.worst``) when an element is off. The references, bounds and checks take ``cu_seqlens`` for packed
sequences (each sequence its own call); grouped heads need nothing more (k, v with fewer heads).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from hypothesis import strategies as st

from . import feature_maps
from .api import linear_attention, linear_attention_step, linear_attention_step_
from .feature_maps import LEARNABLE_FAMILIES, POLYNOMIAL_FAMILIES, RANDOM_FAMILIES
from .reference import linear_attention_reference
from .spec import DTYPES

__all__ = [
    "DTYPES", "TOL", "GTOL", "T_VALUES", "D_VALUES", "DV_VALUES", "M_VALUES", "RANDOM_FAMILIES",
    "LEARNABLE_FAMILIES", "POLYNOMIAL_FAMILIES", "ensure_map", "map_params",
    "EPS_VALUES", "cases", "case_id", "call_kwargs", "make_inputs", "decode_steps", "signed_map", "positive_den_inputs",
    "reference", "forward_bound", "state_bound", "reference_grads", "grad_bound",
    "error_ratio", "assert_within", "check_forward", "check_state", "check_grads", "forward_and_grads",
    "op_grads", "EquivalenceError",
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
# The normalizer's eps (den = scale phi(q)^T z + eps): the default, and values large enough that a misplaced eps
# (outside the scale, left out of the backward, or in the unnormalized output) moves o by more than its bound.
EPS_DEFAULT = 1e-6
EPS_VALUES = (EPS_DEFAULT, 1e-3, 0.5)


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


@functools.lru_cache(maxsize=256)
def _learnable_map(family: str, D: int, M: int, seed: int, heads: int, key_heads) -> feature_maps.FeatureMap:
    # a learnable family with parameters drawn from the seed (not the family's init: a general W and a bias
    # away from 0 exercise every term of the gradients); W ~ N(0, 1 / D), b ~ N(0, 1 / 4)
    fm = LEARNABLE_FAMILIES[family](D, M, heads, key_heads)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (D ** -0.5 if name.endswith("weight") else 0.5))
    return fm


def _build_map(spec: dict) -> feature_maps.FeatureMap:
    if spec["family"] in POLYNOMIAL_FAMILIES:
        return POLYNOMIAL_FAMILIES[spec["family"]](spec["D"])
    if spec["family"] in LEARNABLE_FAMILIES:
        return _learnable_map(spec["family"], spec["D"], spec["M"], spec["seed"], spec["heads"], spec["key_heads"])
    return _random_map(spec["family"], spec["D"], spec["M"], spec["seed"])


def map_params(fm: feature_maps.FeatureMap) -> list:
    """A learnable map's parameters, in ``named_parameters`` order (the leaves its gradients are checked on);
    [] for a fixed map."""
    return list(fm.parameters()) if fm.learnable else []


def _map_param_names(fm: feature_maps.FeatureMap) -> list:
    return [f"map.{n}" for n, _ in fm.named_parameters()] if fm.learnable else []


def ensure_map(c: dict) -> feature_maps.FeatureMap:
    """The case's feature map, registered; a random-feature case's draw (``c["map"]``) is put back in the
    registry, since a later case may have registered another draw under the same name."""
    spec = c.get("map")
    if spec is not None:
        return feature_maps.register(_build_map(spec))
    return feature_maps.get(c["feature_map"])


# ---- a normalizer away from 0: the inputs a signed map's normalized gradients need

# |w_r^T x'| <= pi / 6 for every query and key: any two differ by at most pi / 3, whose cosine is 1 / 2
_FOURIER_HALF_WIDTH = math.pi / 6


@functools.lru_cache(maxsize=512)
def signed_map(fm: feature_maps.FeatureMap) -> bool:
    """Whether phi(x) can be negative: the normalizer phi(q)^T z is then a signed sum that can pass through 0,
    where the first-order error bound of a normalized gradient means nothing (identity, random Fourier
    features). A map declared ``positive`` is not signed; others are probed on inputs as :func:`make_inputs`
    draws them (elementwise maps on [-8, 8], projected ones on Gaussian head vectors)."""
    if getattr(fm, "positive", False):
        return False
    if fm.projected:
        # [512, 1, D]: one head, broadcast over a per-head W
        x = 2 * torch.randn(512, 1, fm.head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    else:
        x = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64)[:, None]
    return any(bool((fm.features(x, side) < 0).any()) for side in ("query", "key"))


def _half_line(fm: feature_maps.FeatureMap):
    """+1 or -1: a half-line on which an elementwise phi keeps one strict sign; None if there is none."""
    if fm.projected:
        return None
    x = torch.logspace(-30.0, math.log10(8.0), 400, dtype=torch.float64)
    for side in (1.0, -1.0):
        f = fm.reference(side * x)
        if bool((f > 0).all()) or bool((f < 0).all()):
            return side
    return None


def positive_den_inputs(fm: feature_maps.FeatureMap):
    """How :func:`make_inputs` draws q, k (and the keys behind an initial state) under
    ``inputs="positive_den"`` so that every term phi(q_t)^T phi(k_s) of the normalizer is positive (a
    sentence), or None when no way is known for this map.

    * An elementwise map with one strict sign on a half-line (identity: x > 0): every element of q and k
      on that half-line (|x| or -|x| of a Gaussian), so each product phi(q)_m phi(k)_m > 0 and the
      normalizer is a sum of positive terms (den equals the magnitude it is bounded with).
    * Random Fourier features: each q, k scaled down until |w_r^T x'| <= pi / 6 for every direction, so
      phi(q)^T phi(k) = (2 / M) sum_r cos(w_r^T (q' - k')) >= 1 / 2.
    """
    side = _half_line(fm)
    if side is not None:
        return f"every q, k element drawn as {'' if side > 0 else '-'}|x|, where phi keeps one sign"
    if isinstance(fm, feature_maps.RandomFeatureMap) and fm.kind == "fourier":
        return "q, k scaled so that |w_r^T x'| <= pi/6 for every direction: each phi(q)^T phi(k) >= 1/2"
    return None


def _positive_den(fm: feature_maps.FeatureMap, x: torch.Tensor) -> torch.Tensor:
    """Gaussian head vectors ``x`` [..., D] made into inputs as :func:`positive_den_inputs` says."""
    side = _half_line(fm)
    if side is not None:
        return side * x.abs()
    if positive_den_inputs(fm) is None:
        raise ValueError(f"no inputs are known that keep the normalizer of {fm.name!r} positive "
                         f"(lintx_triton.testing.positive_den_inputs)")
    u = (x.double() * fm.input_scale) @ fm.weight  # [..., M]
    widest = u.abs().amax(-1, keepdim=True)
    return x * (_FOURIER_HALF_WIDTH / widest).clamp(max=1.0).to(x.dtype)


@st.composite
def cases(draw, maps=("elu", "relu", "identity"), dtypes=tuple(DTYPES), t_values=T_VALUES, causal=None,
          normalize=None, initial_state=None, d_values=D_VALUES, dv_values=DV_VALUES, positive_den=False,
          eps_values=(EPS_DEFAULT,)):
    """A random call: shapes, dtype, map and flags (a dict; fixed flags when given).

    ``maps`` holds registered names and/or the families of :data:`RANDOM_FAMILIES`,
    :data:`LEARNABLE_FAMILIES` (whose W is drawn per head or shared, tied or untied; parameters from the seed)
    and :data:`POLYNOMIAL_FAMILIES` (blocked families draw D at most 12).
    ``positive_den``: a normalized case of a signed map (:func:`signed_map`) draws its inputs so that every
    term of its normalizer is positive (``inputs="positive_den"``, see :func:`positive_den_inputs`), as a
    gradient check needs; raises ValueError for a signed map with no such inputs.
    ``eps_values``: the normalizer's eps is drawn from them (e.g. :data:`EPS_VALUES`; the case key ``eps``, drawn
    last, so the other draws stay as they were); the default, 1e-6 alone, leaves the key out, for callers that
    do not pass a case's eps to the op (pass :func:`call_kwargs` to the op to draw others)."""
    c = draw(st.booleans()) if causal is None else causal
    D = draw(st.sampled_from(d_values))
    name = draw(st.sampled_from(maps))
    extra = {}
    H = None
    if name in feature_maps.BLOCKED_FAMILIES:
        # M grows as D^2: D up to 12 (M = 157 for the Taylor map: five feature blocks; the tests' explicit
        # examples take Based's D = 16, M = 273)
        D = min(D, 12)
    if name in LEARNABLE_FAMILIES:
        # W per head or shared; tied, or a key set of its own (per head or shared)
        H = draw(st.integers(1, 3))
        heads = draw(st.sampled_from([1, H]))
        key_heads = None if draw(st.booleans()) else draw(st.sampled_from([1, H]))
        extra["map"] = dict(family=name, D=D, M=draw(st.sampled_from(M_VALUES)), seed=draw(st.integers(0, 99)),
                            heads=heads, key_heads=key_heads)
        fm = _build_map(extra["map"])
        name = fm.name
    elif name in POLYNOMIAL_FAMILIES:
        extra["map"] = dict(family=name, D=D)
        fm = _build_map(extra["map"])
        name = fm.name
    elif name in RANDOM_FAMILIES:
        extra["map"] = dict(family=name, D=D, M=draw(st.sampled_from(M_VALUES)), seed=draw(st.integers(0, 99)))
        fm = _random_map(name, D, extra["map"]["M"], extra["map"]["seed"])
        name = fm.name
    else:
        fm = feature_maps.get(name)
        if fm.projected:  # a registered projected map is built for one D
            D = fm.head_dim
    case = dict(
        B=draw(st.integers(1, 2)),
        T=draw(st.sampled_from(t_values)),
        H=draw(st.integers(1, 3)) if H is None else H,
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
    if tuple(eps_values) != (EPS_DEFAULT,):
        case["eps"] = draw(st.sampled_from(eps_values))
    if positive_den and case["normalize"] and signed_map(fm):  # decided after the draws: their order is kept
        if positive_den_inputs(fm) is None:
            raise ValueError(f"feature map {name!r} is signed and no inputs are known that keep its normalizer "
                             f"positive (lintx_triton.testing.positive_den_inputs); draw it with normalize=False")
        case["inputs"] = "positive_den"
    return case


def case_id(c: dict) -> str:
    """``B2-T63-H3-D48-DV80-bfloat16-elu-causal-norm-h0-scale1.0`` (``-eps0.5`` when eps is not the default)."""
    return (
        f"B{c['B']}-T{c['T']}-H{c['H']}-D{c['D']}-DV{c['DV']}-{c['dtype']}-{c['feature_map']}"
        f"-{'causal' if c['causal'] else 'full'}-{'norm' if c['normalize'] else 'raw'}"
        f"{'-h0' if c['initial_state'] else ''}-scale{c['scale']}{_eps_id(c)}"
        f"{'-' + c['inputs'] if c.get('inputs') else ''}"
        f"{_heads_id(c.get('map') or {})}"
    )


def _eps_id(c: dict) -> str:
    eps = c.get("eps", EPS_DEFAULT)
    return "" if eps == EPS_DEFAULT else f"-eps{eps}"


def _heads_id(spec: dict) -> str:
    # a learnable map's W heads: -W3 tied, -W3.k1 untied (key set with 1 head)
    if spec.get("heads") is None:
        return ""
    return f"-W{spec['heads']}" + ("" if spec.get("key_heads") is None else f".k{spec['key_heads']}")


def make_inputs(c: dict, requires_grad: bool = False, device="cpu"):
    """q, k, v and the initial state (or None) of a case, deterministic in ``c['seed']``.

    Gaussian, except with ``c["inputs"] == "positive_den"``: q, k and the keys behind the initial state are then
    drawn as :func:`positive_den_inputs` says, so that every term of the normalizer is positive."""
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]].torch
    B, T, H, D, DV = c["B"], c["T"], c["H"], c["D"], c["DV"]
    HKV = c.get("HKV", H)  # key/value heads (grouped-query when fewer than H)
    fm = ensure_map(c)
    qk = _positive_den if c.get("inputs") == "positive_den" else (lambda fm, x: x)  # the draws stay as they were
    q = qk(fm, torch.randn(B, T, H, D, generator=g)).to(dt)
    k = qk(fm, torch.randn(B, T, HKV, D, generator=g)).to(dt)
    v = torch.randn(B, T, HKV, DV, generator=g).to(dt)
    state = None
    if c["initial_state"]:
        # a state as a previous segment of 5 tokens would leave it
        # a leaf, not a map's output; a learnable map through its CPU copy (the map itself may live on the GPU)
        kk = _map64(c).reference(qk(fm, torch.randn(B, 5, HKV, D, generator=g))).detach().float()
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


def call_kwargs(c: dict) -> dict:
    """causal, normalize, scale and eps of a case (eps 1e-6 when the case has none), as
    :func:`lintx_triton.linear_attention` and the reference take them."""
    return dict(causal=c["causal"], normalize=c["normalize"], scale=c["scale"], eps=c.get("eps", EPS_DEFAULT))


_kwargs = call_kwargs


def _detached(state):
    return tuple(x.detach() for x in state) if state is not None else None


def _sequences(cu_seqlens) -> list[tuple[slice, slice]]:
    """(its tokens, its state row) per packed sequence: ``x[:, tokens]`` and ``S[row]``."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(slice(a, b), slice(n, n + 1)) for n, (a, b) in enumerate(zip(cu, cu[1:]))]


def _rows(state, row):
    return tuple(x[row] for x in state) if state is not None else None


def reference(c: dict, q, k, v, state, absolute=False, dtype=torch.float64, fm=None):
    """The float64 reference of a case (on the CPU): o, (S_T, z_T), num, den as
    :func:`lintx_triton.reference.linear_attention_reference` returns them. ``fm``: the map to use (default the
    case's; a float64 copy of a learnable one whose parameters are leaves, see :func:`reference_grads`)."""
    cpu = lambda x: x.detach().cpu() if not x.requires_grad else x.cpu()  # noqa: E731
    st_ = tuple(cpu(x) for x in state) if state is not None else None
    return linear_attention_reference(cpu(q), cpu(k), cpu(v), fm if fm is not None else _map64(c),
                                      initial_state=st_, absolute=absolute, dtype=dtype, **_kwargs(c))


def _map64(c: dict, params=None):
    """The case's map; a learnable one as a float64 CPU copy holding the values of ``params`` (default its own):
    the copy's parameters are the leaves a float64 gradient is taken on."""
    fm = ensure_map(c)
    if not fm.learnable:
        return fm
    fm64 = copy.deepcopy(fm).to("cpu", torch.float64)
    with torch.no_grad():
        for p64, p in zip(fm64.parameters(), params if params is not None else fm.parameters()):
            p64.copy_(p.detach())
    return fm64


def forward_bound(c: dict, q, k, v, state, state_abs=None, cu_seqlens=None):
    """The reference output and the per-element scale of its rounding error: -> (o, bound), float64 on the CPU.

    N = scale |a|^T (|S_0| + sum |b||v|^T) and Dn = scale |a|^T (|z_0| + sum |b|) + eps bound the
    magnitudes the kernels add up; for o = num / den a relative error u on both moves o by
    u (N + |o| Dn) / |den|.

    Args:
        state: (S_0, z_0) or None.
        state_abs: the magnitudes summed into ``state`` when it is itself a sum of earlier tokens
            (:func:`state_bound`'s second value), so that what cancelled there still counts; default |state|.
        cu_seqlens: packed sequences (``q`` is [1, T, H, D], ``state`` [N, HKV, ...]): each is its own call.
    """
    if cu_seqlens is not None:
        parts = [forward_bound(c, q[:, t], k[:, t], v[:, t], _rows(state, n), _rows(state_abs, n))
                 for t, n in _sequences(cu_seqlens)] or [forward_bound(c, q[:, :0], k[:, :0], v[:, :0], None)]
        return tuple(torch.cat(x, 1) for x in zip(*parts))
    q, k, v = (x.detach() for x in (q, k, v))
    state = _detached(state)
    o, _, num, den = reference(c, q, k, v, state)
    _, _, n_abs, d_abs = reference(c, q, k, v, _detached(state_abs) if state_abs is not None else state,
                                   absolute=True)
    return o, _output_bound(c, o, den, n_abs, d_abs)


def _output_bound(c: dict, o, den, n_abs, d_abs):
    # N for num alone; u (N + |o| Dn) / |den| moves num / den
    return (n_abs + o.abs() * d_abs[..., None]) / den.abs()[..., None] if c["normalize"] else n_abs


def state_bound(c: dict, k, v, state, cu_seqlens=None):
    """The reference final state and the magnitudes of the terms each element sums:
    -> ((S_T, z_T), (|S_0| + sum |b||v|^T, |z_0| + sum |b|)), float64 on the CPU, b = phi(k).

    S_T [B, HKV, M, DV], z_T [B, HKV, M] (one row per sequence with ``cu_seqlens``). The state of keys
    alone (no query, no [T, M, DV] intermediate): a long prefix costs one product.
    """
    if cu_seqlens is not None:
        parts = [state_bound(c, k[:, t], v[:, t], _rows(state, n)) for t, n in _sequences(cu_seqlens)] \
            or [state_bound(c, k[:0], v[:0], None)]
        return tuple(tuple(torch.cat(x, 0) for x in zip(*pair)) for pair in zip(*parts))
    fm = _map64(c)  # a learnable map's float64 CPU copy: the map itself may live on the GPU
    k, v = (x.detach().cpu().double() for x in (k, v))
    with torch.no_grad():
        b, b_abs = fm.features(k, "key"), fm.magnitude(k, "key")  # [B, T, HKV, M]
    S, z = torch.einsum("bthm,bthv->bhmv", b, v), b.sum(1)
    S_abs, z_abs = torch.einsum("bthm,bthv->bhmv", b_abs, v.abs()), b_abs.sum(1)
    if state is not None:
        S0, z0 = (x.detach().cpu().double() for x in state)
        S, z, S_abs, z_abs = S0 + S, z0 + z, S0.abs() + S_abs, z0.abs() + z_abs
    return (S, z), (S_abs, z_abs)


def _errors(name, got, want, bound, tol):
    """|got - want| and its limit tol x bound + the subnormal spacing of got's dtype, float64 on the CPU."""
    if tuple(got.shape) != tuple(want.shape):
        raise EquivalenceError(f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}", float("inf"))
    g = got.detach().cpu().double()
    want = want.detach().cpu().double()
    err = (g - want).abs()
    # an exact value beyond the dtype's range rounds to +-inf, which is then the right answer (an fp16
    # gradient of unnormalized random features can exceed 65504)
    rounded = want.to(got.dtype).double()
    err = torch.where(torch.isinf(rounded) & (g == rounded), torch.zeros_like(err), err)
    fi = torch.finfo(got.dtype)
    # + the spacing of subnormals: a value below the smallest normal is stored with fewer bits
    return err, tol * bound.detach().cpu().double() + fi.smallest_normal * fi.eps


def _worst(err, limit) -> float:
    r = err / limit
    return torch.where(torch.isnan(r), torch.inf, r).max().item() if r.numel() else 0.0


def error_ratio(name: str, got, want, bound, tol: float) -> float:
    """The worst |got - want| / (tol x bound + the subnormal spacing of got's dtype) over the elements,
    without judging it (<= 1 is within bound; inf for NaN). An exact value beyond got's range that came out
    as the matching inf counts as exact. Raises EquivalenceError only when the shapes differ."""
    return _worst(*_errors(name, got, want, bound, tol))


def assert_within(name: str, got, want, bound, tol: float) -> float:
    """Raise EquivalenceError unless every element of ``got`` is within tol x ``bound`` (plus the subnormal
    spacing) of ``want``; returns the worst ratio, as :func:`error_ratio`."""
    err, limit = _errors(name, got, want, bound, tol)
    ratio = _worst(err, limit)
    bad = ~(err <= limit)
    if bad.any():
        raise EquivalenceError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst err {err.max().item():.3e}, "
            f"worst err / (tol x bound) {ratio:.3e} with tol {tol}",
            ratio,
        )
    return ratio


def check_forward(c: dict, out, q, k, v, state, name="o", cu_seqlens=None) -> float:
    """Raise EquivalenceError unless ``out`` (q's dtype and shape) is within TOL x :func:`forward_bound`;
    returns the worst err / (tol x bound)."""
    ref, bound = forward_bound(c, q, k, v, state, cu_seqlens=cu_seqlens)
    if out.dtype != q.dtype or tuple(out.shape) != tuple(ref.shape):
        raise EquivalenceError(f"{name}: got {out.dtype} {tuple(out.shape)}, want {q.dtype} {tuple(ref.shape)}",
                               float("inf"))
    return assert_within(name, out, ref, bound, TOL[c["dtype"]])


def check_state(c: dict, got, q, k, v, state, cu_seqlens=None) -> float:
    """The final state ``got = (S_T, z_T)`` (float32) within TOL x :func:`state_bound` of the call on q, k, v
    from ``state`` (q is not needed: it is taken for symmetry with :func:`check_forward`); returns the worst
    ratio."""
    (S_ref, z_ref), (S_abs, z_abs) = state_bound(c, k, v, state, cu_seqlens=cu_seqlens)
    worst = 0.0
    for name, x, ref, bound in (("S_T", got[0], S_ref, S_abs), ("z_T", got[1], z_ref, z_abs)):
        if x.dtype != torch.float32 or tuple(x.shape) != tuple(ref.shape):
            raise EquivalenceError(f"{name}: got {x.dtype} {tuple(x.shape)}", float("inf"))
        worst = max(worst, assert_within(name, x, ref, bound, TOL[c["dtype"]]))
    return worst


def _grads_per_sequence(fn, c, leaves, do, dS, dz, cu_seqlens):
    """``fn`` (reference_grads or grad_bound) per packed sequence, joined: tokens on dim 1, states on dim 0, a
    learnable map's parameters summed over the sequences."""
    at = lambda x, i: x[i] if x is not None else None  # noqa: E731
    base, params = _split_leaves(c, leaves)
    parts = [fn(c, [x[:, t] for x in base[:3]] + [x[n] for x in base[3:]] + params, at(do, (slice(None), t)),
                at(dS, n), at(dz, n)) for t, n in _sequences(cu_seqlens)]
    if not parts:
        return [torch.zeros(x.shape, dtype=torch.float64) for x in leaves]
    return [torch.cat(x, 1 if i < 3 else 0) if i < len(base) else sum(x[1:], x[0])
            for i, x in enumerate(zip(*parts))]


def _split_leaves(c: dict, leaves):
    """[q, k, v(, S_0, z_0)(, the map's parameters)] -> (the first part, the parameters)."""
    n = len(leaves) - len(map_params(ensure_map(c)))
    return list(leaves[:n]), list(leaves[n:])


def _float64_leaves(c: dict, leaves):
    """[q, k, v(, S_0, z_0)(, map parameters)] as float64 CPU leaves of a new graph, the state among them (or
    None) and the map to run (a learnable one copied to float64, its parameters being the last leaves)."""
    base, params = _split_leaves(c, leaves)
    base = [x.detach().double().cpu().requires_grad_() for x in base]
    fm = _map64(c, params if params else None)
    return base + map_params(fm), (tuple(base[3:]) if len(base) > 3 else None), fm


def _loss(o, S, z, do, dS, dz, absolute: bool):
    """sum(o do) + sum(S_T dS) + sum(z_T dz) in float64, leaving out the absent terms (|dS| etc. when absolute)."""
    f = (lambda x: x.double().cpu().abs()) if absolute else (lambda x: x.double().cpu())  # noqa: E731
    terms = [(y * f(w)).sum() for y, w in ((o, do), (S, dS), (z, dz)) if w is not None]
    if not terms:
        raise ValueError("give at least one of do, dS, dz")
    return sum(terms[1:], terms[0])


def reference_grads(c: dict, leaves, do=None, dS=None, dz=None, cu_seqlens=None) -> list:
    """The float64 gradients of L = sum(o do) + sum(S_T dS) + sum(z_T dz) through the reference, with respect
    to ``leaves`` = [q, k, v] or [q, k, v, S_0, z_0], then a learnable map's parameters (:func:`map_params`);
    a term whose weight is None is left out, and a leaf L does not depend on gets zeros (z_0 unnormalized). ``cu_seqlens``: packed sequences, each its own call."""
    if cu_seqlens is not None:
        return _grads_per_sequence(reference_grads, c, leaves, do, dS, dz, cu_seqlens)
    leaves, state, fm = _float64_leaves(c, leaves)
    o, (S, z), _, _ = reference(c, *leaves[:3], state, fm=fm)
    grads = torch.autograd.grad(_loss(o, S, z, do, dS, dz, absolute=False), leaves, allow_unused=True)
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def grad_bound(c: dict, leaves, do=None, dS=None, dz=None, cu_seqlens=None) -> list:
    """Per-element scale of the rounding error of each gradient of :func:`reference_grads` (same arguments).

    The float64 reference on absolute values, with |do|, |dS|, |dz|, differentiated: every term of
    every gradient enters with its magnitude. For normalized outputs the loss is linearized as
    |do| (N + |o| Dn) / |den| with o and den held fixed.
    """
    if cu_seqlens is not None:
        return _grads_per_sequence(grad_bound, c, leaves, do, dS, dz, cu_seqlens)
    leaves, state, fm = _float64_leaves(c, leaves)
    with torch.no_grad():  # o and den held fixed, also with respect to a learnable map's parameters
        o, _, _, den = reference(c, *(x.detach() for x in leaves[:3]), _detached(state), fm=fm)
    _, (S_abs, z_abs), n_abs, d_abs = reference(c, *leaves[:3], state, absolute=True, fm=fm)
    out = _output_bound(c, o, den, n_abs, d_abs)
    grads = torch.autograd.grad(_loss(out, S_abs, z_abs, do, dS, dz, absolute=True), leaves, allow_unused=True)
    return [g.abs() if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def check_grads(c: dict, got, want, bounds, names) -> float:
    """Raise EquivalenceError unless each gradient in ``got`` is within GTOL x its bound of ``want``
    (``names``: q, k, v, S_0, z_0, as :func:`forward_and_grads` returns them); returns the worst ratio."""
    worst = 0.0
    for name, g, w, b in zip(names, got, want, bounds):
        if g is None:
            raise EquivalenceError(f"no gradient for {name}", float("inf"))
        if tuple(g.shape) != tuple(w.shape) or torch.isnan(g.detach()).any():
            raise EquivalenceError(f"d{name}: shape {tuple(g.shape)} (want {tuple(w.shape)}) or NaN values",
                                   float("inf"))
        worst = max(worst, assert_within(f"d{name}", g, w, b, GTOL[c["dtype"]]))
    return worst


def forward_and_grads(c: dict, backend: str, device="cpu", final_state_grad: bool = True, *, inputs=None,
                      cu_seqlens=None, call=linear_attention):
    """Run a case forward and backward; -> (got, want, bounds, names) for :func:`check_grads`.

    The loss is sum(o do) + sum(S_T dS) + sum(z_T dz) with do, dS, dz drawn from ``c["seed"] + 1``
    (dS = dz = 0 unless ``final_state_grad``).

    Args:
        inputs: (q, k, v, state) requiring grad; default :func:`make_inputs` of the case.
        cu_seqlens: packed sequences, passed to the call; the reference runs each sequence on its own.
        call: a function with :func:`lintx_triton.linear_attention`'s signature that runs the forward
            (default that function), e.g. one that runs it under ``lx.config.override``.
    """
    got, leaves, (do, dS, dz) = op_grads(c, backend, device, final_state_grad, inputs=inputs, cu_seqlens=cu_seqlens,
                                         call=call)
    want = reference_grads(c, leaves, do, dS, dz, cu_seqlens=cu_seqlens)
    bounds = grad_bound(c, leaves, do, dS, dz, cu_seqlens=cu_seqlens)
    base, _ = _split_leaves(c, leaves)
    return got, want, bounds, ["q", "k", "v", "S_0", "z_0"][: len(base)] + _map_param_names(ensure_map(c))


def op_grads(c: dict, backend: str, device="cpu", final_state_grad: bool = True, *, inputs=None, cu_seqlens=None,
             call=linear_attention):
    """The op's half of :func:`forward_and_grads` (same arguments): run the case forward and backward, no
    reference; -> (got, leaves, (do, dS, dz)), the gradients of the loss with respect to ``leaves`` = [q, k, v]
    or [q, k, v, S_0, z_0], then a learnable map's parameters, and the loss's weights, as :func:`reference_grads` and :func:`grad_bound` take them.
    ``lintx fuzz`` calls the halves apart: an exception here is the op's, one in the reference the harness's."""
    q, k, v, state = inputs if inputs is not None else make_inputs(c, requires_grad=True, device=device)
    o, (S, z) = call(q, k, v, feature_map=ensure_map(c), initial_state=state, backend=backend,
                     return_state=True, cu_seqlens=cu_seqlens, **_kwargs(c))
    g = torch.Generator().manual_seed(c["seed"] + 1)
    # the op receives do in o's dtype: round it once so that every evaluation sees the same do
    do = torch.randn(o.shape, generator=g).to(o.dtype).float()
    dS = torch.randn(S.shape, generator=g) if final_state_grad else torch.zeros(S.shape)
    dz = torch.randn(z.shape, generator=g) if final_state_grad else torch.zeros(z.shape)
    leaves = [q, k, v] + (list(state) if state is not None else []) + map_params(ensure_map(c))
    loss = (o.float() * do.to(o.device)).sum() + (S * dS.to(S.device)).sum() + (z * dz.to(z.device)).sum()
    got = torch.autograd.grad(loss, leaves)
    return got, leaves, (do, dS, dz)


def decode_steps(c: dict, q, k, v, state, backend: str, inplace: bool = False):
    """The case's tokens one at a time through the RNN form; -> (o [B, T, H, DV], final state)."""
    kw = dict(feature_map=ensure_map(c), normalize=c["normalize"], scale=c["scale"], eps=c.get("eps", EPS_DEFAULT),
              backend=backend)
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


# ---- LoLCATs' hybrid (window=): the bounds tests/test_hybrid.py and the GPU scripts share


def hybrid_error_ratios(q, k, v, alpha, fm, o, grads, do, *, window: int, kind: str = "terraced", affine=False,
                        initial_state=None, state=None, dS=None, dz=None) -> dict:
    """The worst error / (tol x bound) of a hybrid call's output ``o`` and its gradients ``grads`` (of q, k, v,
    alpha, and of a pair ``initial_state``'s S0, z0 when it is given as leaves that require grad) against float64
    autograd of :func:`lintx_triton.hybrid.hybrid_attention_reference`, for the loss sum(o do) + sum(S dS) +
    sum(z dz) over the returned ``state`` (dS, dz may be None; ``grads`` empty: the output and state alone, ``do``
    unread). The output's bound is the magnitudes' (testing's
    normalized bound); a gradient's is the gradient of that bound's loss, the softmax and linear parts' added in
    magnitude (their signs can differ). -> {name: ratio}, <= 1 within bound."""
    from . import hybrid as hy

    dt = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[q.dtype]
    pair = initial_state is not None and not isinstance(initial_state, hy.WindowState)
    l64 = [x.detach().double().requires_grad_() for x in (q, k, v, alpha)]
    l64 += [x.detach().clone().requires_grad_() for x in initial_state] if pair else []
    init = tuple(l64[4:]) if pair else initial_state
    kw = dict(window=window, kind=kind, affine=affine)
    fm64 = copy.deepcopy(fm).to("cpu", torch.float64) if fm.learnable else fm
    ref, st_ref, _, den = hy.hybrid_attention_reference(*l64[:3], fm64, l64[3], initial_state=init, **kw)
    dS = torch.zeros_like(st_ref.S) if dS is None else dS.to(st_ref.S)
    dz = torch.zeros_like(st_ref.z) if dz is None else dz.to(st_ref.z)
    want = ()
    if grads:
        loss = (ref * do.double()).sum() + (st_ref.S * dS).sum() + (st_ref.z * dz).sum()
        want = torch.autograd.grad(loss, l64[:len(grads)])
    names = ["q", "k", "v", "alpha", "S0", "z0"][:len(grads)]
    out = {}
    bounds = [0.0] * len(grads)
    for part in ("softmax", "linear", True) if grads else (True,):
        _, st_abs, n_abs, d_abs = hy.hybrid_attention_reference(*l64[:3], fm64, l64[3], initial_state=init,
                                                                absolute=part, **kw)
        bound = (n_abs + ref.detach().abs() * d_abs[..., None]) / den.detach().abs()[..., None]
        if part is True:  # the output's and the state's bounds
            out["o"] = error_ratio("o", o, ref, bound, TOL[dt])
            if state is not None:
                out["S"] = error_ratio("S", state.S, st_ref.S, st_abs.S, TOL[dt])
                out["z"] = error_ratio("z", state.z, st_ref.z, st_abs.z, TOL[dt])
            continue
        bl = (bound * do.double().abs()).sum()
        if part == "linear":
            bl = bl + (st_abs.S * dS.abs()).sum() + (st_abs.z * dz.abs()).sum()
        gr = torch.autograd.grad(bl, l64[:len(grads)], allow_unused=True)
        bounds = [b + (x.abs() if x is not None else 0) for b, x in zip(bounds, gr)]
    for name, g, w, b in zip(names, grads, want, bounds):
        out["d" + name] = error_ratio("d" + name, g, w, b, GTOL[dt])
    return out
