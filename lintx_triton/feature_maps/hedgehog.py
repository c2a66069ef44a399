"""Built-in learnable maps: Hedgehog (softmax of a learned projection) and T2R (relu of one).

Hedgehog (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
Mimicry", ICLR 2024) learns W and b so that phi(q)^T phi(k) mimics softmax attention. Two codebases
carry it, and they differ; both are built here, side by side (e = x W + b, W [D, M/2], M features):

=================  ==============================================  ==============================================
                   ``variant="lolcats"``                           ``variant="fla"``
=================  ==============================================  ==============================================
phi(x)             [softmax(e), softmax(-e)], each half its own     softmax([2e, -2e]): one softmax over all M
                   softmax, clamped below at 1e-12                  features (each half sums to < 1)
source             HazyResearch/lolcats ``src/model/feature_map.py``  fla-org/flash-linear-attention
                   lines 122-129 (``SoftmaxDim``), 247-252            ``fla/modules/feature_map.py`` lines 50-74
                   (``FeatureMapMLP.forward``: ``einsum('hdf,bhld->   (``HedgehogFeatureMap``: ``nn.Linear(D, D)``,
                   bhlf') + bias``), 57-73 (``FeatureMap``, eps       then ``y = 2 * x``,
                   1e-12 from every config)                         ``cat([y, -y]).softmax(-1)``)
W                  per head ``[H, D, feature_dim]`` (``num_heads``    one ``nn.Linear`` shared by every head
                   of the layer); here ``heads=H`` (default 1)      (``heads=1``, the default), M / 2 = D there
bias               a scalar per head, shape (1, H, 1, 1) (the       per feature (``nn.Linear``'s), zero at init
                   per-feature shape is commented out, line 217),   (default ``bias=True``)
                   and every config sets ``bias: false``; a
                   scalar cancels in both softmaxes, so here
                   ``bias=False`` by default and ``bias=True``
                   adds a per-feature one (zeros at init)
init               ``kaiming_uniform_`` of the [H, D, M/2] tensor   identity: ``nn.init.eye_`` on the weight,
                   (lines 209-213: fan_in = D M/2, so U(+-sqrt(6 /  zeros on the bias (``init_weights_``,
                   (D M/2)))), what every config runs               lines 66-69)
                   (``zero_init: false``); ``zero_init: true`` is
                   the identity (``eye_`` per head, lines 231-245)
q / k maps         untied in every config (``tie_qk_kernels:        untied by default (``fla/layers/
                   false``): the key map is ``copy.deepcopy`` of     linear_attn.py`` lines 69-73,
                   the query map (``src/model/linear_attention/     ``tie_feature_map_qk=False``), both
                   linear_attention.py`` lines 200-206)              identity at init
=================  ==============================================  ==============================================

(Commits read: lolcats 375df84f58417a57b78c875fa3f8fa76e84ab12e, flash-linear-attention
bc3b101dcb713ddc5bd8924b66754eb68b5ccf89.) Here ``init`` picks ``"kaiming"`` or ``"identity"`` for either
variant (defaults: the variant's own), and an untied map's key parameters start as a copy of the query
ones (LoLCATs' deepcopy; FLA's two identities are equal too) whenever both sides have the same heads.

The kernels see W as [W, -W] and b as [b, -b] (:meth:`HedgehogFeatureMap.project`), so phi depends on u and
b only through u + b, as learnable maps must. The softmax of each group subtracts the group's row max over
the real features (``m_f``; padding columns never enter a max or a sum), so no exponential overflows; its
vector-Jacobian product is f (g - sum_group f g) (times 2 for FLA's logits 2e), and LoLCATs' clamp passes no
gradient where it bites, as ``torch.clamp`` does.

T2R (Kasai et al., "Finetuning Pretrained Transformers into RNNs", EMNLP 2021, eq. 5):
phi(x) = relu(x W + b), W [D, M]; FLA's ``T2RFeatureMap`` (``fla/modules/feature_map.py`` lines 77-105):
``nn.Linear(head_dim, dot_dim, bias=bias)`` then ``.relu()``, nn.Linear's init (U(+-1/sqrt(D)) for W and b).
The paper has the bias; FLA's default leaves it out (``bias=False``); here ``bias=True`` by default.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import register
from .learnable import LearnableFeatureMap, Projection
from .projected import head_matmul

__all__ = ["HedgehogFeatureMap", "T2RFeatureMap", "hedgehog", "t2r", "HEDGEHOG_VARIANTS", "LOLCATS_EPS"]

HEDGEHOG_VARIANTS = ("lolcats", "fla")
INITS = ("kaiming", "identity")
#: LoLCATs' clamp: ``FeatureMap(eps=1e-12)`` in every config (``feature_map_kwargs: eps: 1e-12``)
LOLCATS_EPS = 1e-12

# LoLCATs: [softmax(e), softmax(-e)], e = x W + b; the kernels' u + b is [e, -e] ($HALF = M / 2 columns each)
_LOLCATS = """
@triton.jit
def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
    # a softmax over each half of the M real features, clamped below at $EPS (LoLCATs' SoftmaxDim); no STAB
    # shift is needed: every feature is in [$EPS, 1]
    e = u + b
    o_m = tl.arange(0, e.shape[1])[None, :]  # [1, BM]
    m_1 = m_f & (o_m < $HALF)
    m_2 = m_f & (o_m >= $HALF)
    e_1 = tl.where(m_1, e, float("-inf"))
    e_2 = tl.where(m_2, e, float("-inf"))
    p_1 = tl.exp(e_1 - tl.max(e_1, 1)[:, None])  # [BT, BM], 0 outside the first half
    p_2 = tl.exp(e_2 - tl.max(e_2, 1)[:, None])
    return tl.maximum(p_1 / tl.sum(p_1, 1)[:, None] + p_2 / tl.sum(p_2, 1)[:, None], $EPS)


@triton.jit
def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
    # f (g' - sum over f's half of f g'), g' = g where the clamp did not bite (f > $EPS), 0 where it did;
    # the kernels pass f and g as 0 on padding columns
    o_m = tl.arange(0, f.shape[1])[None, :]
    m_1 = o_m < $HALF
    gc = tl.where(f > $EPS, g, 0.0)
    fg = f * gc
    s_1 = tl.sum(tl.where(m_1, fg, 0.0), 1)[:, None]  # [BT, 1]
    s_2 = tl.sum(tl.where(m_1, 0.0, fg), 1)[:, None]
    return f * (gc - tl.where(m_1, s_1, s_2)), tl.zeros_like(n)
"""

# FLA: softmax([2e, -2e]) over all M features
_FLA = """
@triton.jit
def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
    # one softmax of 2 (u + b) over the M real features (FLA's HedgehogFeatureMap); features in (0, 1]
    e = tl.where(m_f, 2.0 * (u + b), float("-inf"))
    p = tl.exp(e - tl.max(e, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
    # d softmax(2 e) = 2 f (g - sum f g) (f and g are 0 on padding columns)
    return 2.0 * f * (g - tl.sum(f * g, 1)[:, None]), tl.zeros_like(n)
"""

_T2R = """
@triton.jit
def phi_proj(u, n, b, m_f, IS_Q: tl.constexpr, STAB: tl.constexpr):
    # relu(x W + b) (T2R)
    return tl.maximum(u + b, 0.0)


@triton.jit
def phi_proj_vjp(u, n, b, f, g, IS_Q: tl.constexpr):
    return tl.where(u + b > 0, g, 0.0), tl.zeros_like(n)
"""


def _lolcats_torch(M: int):
    half = M // 2

    def phi(u, n, b, side, stabilize):
        e = u + b
        return torch.cat([e[..., :half].softmax(-1), e[..., half:].softmax(-1)], -1).clamp(min=LOLCATS_EPS)

    return phi


def _fla_torch(u, n, b, side, stabilize):
    return (2 * (u + b)).softmax(-1)


def _t2r_torch(u, n, b, side, stabilize):
    return torch.relu(u + b)


def _check_int(what: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{what} must be a positive int, got {val!r}")
    return val


def _check_choice(what: str, val, choices) -> str:
    if val not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {val!r}")
    return val


def _abs(t: torch.Tensor) -> torch.Tensor:
    # |t| whose derivative is +-1 also at 0 (torch.abs has 0 there: a bound's gradient must not vanish)
    return t * torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


class HedgehogFeatureMap(LearnableFeatureMap):
    """Hedgehog's softmax feature map with learned W ``[HW, D, M/2]`` and b ``[HW, M/2]`` (see the module doc).

    Build it with :func:`hedgehog`. The parameters are ``query.weight``, ``query.bias`` (and ``key.*`` when
    untied); the kernels get ``[W, -W]`` and ``[b, -b]``.
    """

    def __init__(self, D: int, M: int, variant: str, *, heads: int = 1, tied: bool = True,
                 key_heads: Optional[int] = None, bias: bool = False, init: str = "kaiming"):
        _check_int("D", D)
        if _check_int("num_features", M) % 2:
            raise ValueError(f"num_features must be even for hedgehog (M / 2 projections e, each in a softmax of "
                             f"e and one of -e), got {M}; use M = {M + 1}")
        self.variant = _check_choice("variant", variant, HEDGEHOG_VARIANTS)
        self.init = _check_choice("init", init, INITS)
        if variant == "lolcats":
            src = _LOLCATS.replace("$HALF", str(M // 2)).replace("$EPS", repr(LOLCATS_EPS))
            torch_phi, doc = _lolcats_torch(M), "Hedgehog (LoLCATs): [softmax(xW + b), softmax(-(xW + b))]"
        else:
            src, torch_phi, doc = _FLA, _fla_torch, "Hedgehog (FLA): softmax([2(xW + b), -2(xW + b)])"
        super().__init__(f"hedgehog_{variant}_d{D}_m{M}", D, M, src, torch_phi, heads=heads, tied=tied,
                         key_heads=key_heads, bias=bias, positive=True, doc=doc)
        if not self.tied and self.heads_of("key") == self.heads_of("query"):
            self.key.load_state_dict(self.query.state_dict())  # LoLCATs' copy.deepcopy of the query map

    def make_params(self, heads: int) -> nn.Module:
        """W ``[heads, D, M/2]`` (``init``: kaiming or identity) and b ``[heads, M/2]`` (zeros) or no bias."""
        p = Projection(heads, self.head_dim, self.num_features // 2, self._bias)
        with torch.no_grad():
            if self.init == "identity":
                for w in p.weight:  # FLA's init_weights_, LoLCATs' zero_init_: eye_ per head
                    nn.init.eye_(w)
            else:  # LoLCATs' init_weights_: fan_in of a [H, D, F] tensor is D F
                nn.init.kaiming_uniform_(p.weight)
        return p

    def project(self, params: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """[W, -W] ``[HW, D, M]`` and [b, -b] ``[HW, M]``."""
        W, b = params()
        return torch.cat([W, -W], -1), torch.cat([b, -b], -1)

    def magnitude(self, x: torch.Tensor, side: str = "key", stabilize: bool = False) -> torch.Tensor:
        """|phi| widened by the rounding of its softmax's arguments, with a gradient free of cancellation.

        A softmax feature depends on every u of its group, so the elementwise envelope of
        :func:`~lintx_triton.feature_maps.projected.projected_magnitude` (which takes |d(sum f)/du|, 0 for a
        softmax) does not apply. With A_r = sum_d |x'_d W_dr| + |b_r| (the scale of the error of u_r + b_r),
        c the logits' factor (1; FLA's 2) and sums and maxima over f_r's group:

        * value: f_r + c f_r (A_r + sum_j f_j A_j + 2 max_j A_j): the first-order change of f_r under
          errors of c A_j in each logit (f_r (|de_r| + sum_j f_j |de_j|)), the max subtracted counted too;
        * gradient: that of c f_r (A_r + sum_j f_j A_j) with f held, i.e. c f_r (|W_dr| + sum_j f_j |W_dj|)
          |x'|'s sign for x_d (and |x'_d| (...) for W_dr, 1 (...) for b_r): the softmax's Jacobian
          f_r (delta_rj - f_j) in absolute value, bounded by f_r (delta_rj + f_j), so that a bound built on
          it covers dL/dx = s dL/du W^T however its terms cancel.
        """
        xs, W, b = self._projection(x, side)
        f = self.torch_phi(head_matmul(xs, W), None, b, side, stabilize).detach()
        A = head_matmul(_abs(xs), _abs(W)) + _abs(b)  # [..., (H,) M], differentiable
        c = 2.0 if self.variant == "fla" else 1.0
        groups = (slice(None),) if self.variant == "fla" else (slice(None, self.num_features // 2),
                                                               slice(self.num_features // 2, None))
        surrogate, value = [], []
        for s in groups:
            fs, As = f[..., s], A[..., s]
            sur = c * fs * (As + (fs * As).sum(-1, keepdim=True))
            surrogate.append(sur)
            value.append(fs + sur.detach() + 2 * c * fs * As.detach().amax(-1, keepdim=True))
        surrogate, value = torch.cat(surrogate, -1), torch.cat(value, -1)
        return value + surrogate - surrogate.detach()


class T2RFeatureMap(LearnableFeatureMap):
    """T2R's relu(x W + b) with learned W ``[HW, D, M]`` and b ``[HW, M]`` (see the module doc); built by
    :func:`t2r`. nn.Linear's init: U(+-1/sqrt(D)) for W and for b."""

    def __init__(self, D: int, M: int, *, heads: int = 1, tied: bool = True, key_heads: Optional[int] = None,
                 bias: bool = True):
        _check_int("D", D)
        _check_int("num_features", M)
        super().__init__(f"t2r_d{D}_m{M}", D, M, _T2R, _t2r_torch, heads=heads, tied=tied, key_heads=key_heads,
                         bias=bias, positive=False, doc="T2R: relu(xW + b)")

    def make_params(self, heads: int) -> nn.Module:
        """W ``[heads, D, M]`` and b ``[heads, M]``, each U(+-1/sqrt(D)) (nn.Linear's), or no bias."""
        p = Projection(heads, self.head_dim, self.num_features, self._bias)  # W: U(+-1/sqrt(D)) already
        if p.bias is not None:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(self.head_dim)
                p.bias.uniform_(-bound, bound)
        return p


def hedgehog(D: int, num_features: Optional[int] = None, heads: int = 1, variant: str = "lolcats",
             tied: bool = True, key_heads: Optional[int] = None, bias: Optional[bool] = None,
             init: Optional[str] = None) -> HedgehogFeatureMap:
    """Hedgehog's learnable softmax feature map (Zhang et al., 2024), as LoLCATs or FLA write it.

    ``variant="lolcats"``: phi(x) = [softmax(x W + b), softmax(-(x W + b))] (each half a softmax over M / 2
    features), clamped below at 1e-12. ``variant="fla"``: phi(x) = softmax([2 (x W + b), -2 (x W + b)]) (one
    softmax over all M). The module doc tabulates both against the authors' code, file and line. Features are
    positive and bounded by 1 (``positive=True``). The map is an ``nn.Module``: train its parameters through
    the kernels.

    Args:
        D (int): head width of q and k.
        num_features (int): M, the width of phi(x), even (M / 2 projections of x). Default: ``2 * D``
            (FLA's ``nn.Linear(D, D)``).
        heads (int): HW of W: ``1`` (one W shared by every head, FLA's; the default) or H (one per head,
            LoLCATs').
        variant (str): ``"lolcats"`` (default) or ``"fla"``.
        tied (bool): one parameter set for queries and keys (default), or two (both papers' code: then the key
            set starts as a copy of the query set when both have the same heads).
        key_heads (int): HW of the key set when untied: 1 or HKV. Default: ``heads``.
        bias (bool): a learned per-feature bias b ``[HW, M/2]``, zeros at init. Default: the variant's:
            ``False`` for LoLCATs (whose scalar per-head bias cancels in the softmaxes; its configs turn it
            off), ``True`` for FLA (nn.Linear's).
        init (str): ``"kaiming"`` (kaiming_uniform_ of the [HW, D, M/2] tensor, U(+-sqrt(6 / (D M/2))),
            what LoLCATs' configs run) or ``"identity"`` (``eye_`` per head: FLA's, and LoLCATs'
            ``zero_init``). Default: the variant's (``"kaiming"`` for LoLCATs, ``"identity"`` for FLA).

    The map is registered as ``hedgehog_<variant>_d<D>_m<M>``: maps of one name share kernels (the parameters
    are runtime arguments).

    Examples::

        >>> import torch, lintx_triton as lx
        >>> fm = lx.feature_maps.hedgehog(16, 32, heads=2, variant="fla")
        >>> fm.query.weight.shape, fm.name
        (torch.Size([2, 16, 16]), 'hedgehog_fla_d16_m32')
        >>> q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 4)
        >>> lx.linear_attention(q, k, v, feature_map=fm).sum().backward()
        >>> fm.query.weight.grad.shape
        torch.Size([2, 16, 16])
    """
    variant = _check_choice("variant", variant, HEDGEHOG_VARIANTS)
    if bias is None:
        bias = variant == "fla"
    if init is None:
        init = "identity" if variant == "fla" else "kaiming"
    M = 2 * _check_int("D", D) if num_features is None else num_features
    return register(HedgehogFeatureMap(D, M, variant, heads=heads, tied=tied, key_heads=key_heads, bias=bias,
                                       init=init))


def t2r(D: int, num_features: Optional[int] = None, heads: int = 1, tied: bool = True,
        key_heads: Optional[int] = None, bias: bool = True) -> T2RFeatureMap:
    """T2R's learnable feature map relu(x W + b) (Kasai et al., 2021; FLA's ``T2RFeatureMap``).

    Features are >= 0 but can all be 0 for some x (``positive=False``): with ``normalize=True`` such a query's
    normalizer is ``eps`` alone.

    Args:
        D (int): head width of q and k.
        num_features (int): M, the width of phi(x) (FLA's ``dot_dim``). Default: ``D``.
        heads (int): HW of W: ``1`` (shared, FLA's; the default) or H (one per head).
        tied (bool): one parameter set for queries and keys (default), or two (FLA's default
            ``tie_feature_map_qk=False``).
        key_heads (int): HW of the key set when untied: 1 or HKV. Default: ``heads``.
        bias (bool): a learned bias b ``[HW, M]`` (the paper's eq. 5; FLA defaults to none). Default: ``True``.

    Registered as ``t2r_d<D>_m<M>``.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> fm = lx.feature_maps.t2r(16, 32)
        >>> q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 4)
        >>> lx.linear_attention(q, k, v, feature_map=fm).shape
        torch.Size([1, 8, 2, 4])
    """
    M = _check_int("D", D) if num_features is None else num_features
    return register(T2RFeatureMap(D, M, heads=heads, tied=tied, key_heads=key_heads, bias=bias))
