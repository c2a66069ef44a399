"""Modules: :class:`LinearAttention`, multi-head linear attention with a training/prefill ``forward``
and a constant-time generation ``step`` sharing one set of weights.

Swapping it in for softmax attention in an existing model: replace the attention block
(e.g. ``torch.nn.MultiheadAttention(E, H, batch_first=True)`` called as ``attn(x, x, x, is_causal=True)``)
by ``LinearAttention(E, H)`` called as ``attn(x)``; no mask is needed (``causal=True`` is built in).
For generation, run the prompt through ``forward(x, return_state=True)`` once per layer, keep each
layer's state, and feed one token at a time through ``step(x_t, state)``: no KV cache, constant
time and memory per token.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import native
from .api import linear_attention, linear_attention_step, linear_attention_step_
from .feature_maps import FeatureMap, LearnableFeatureMap
from .feature_maps.learnable import HeadParams

__all__ = ["LinearAttention"]


_hooks = nn.modules.module  # the global module hooks' registries
_LINEAR_FORWARD = nn.Linear.forward


def _step_projection(proj: nn.Module, x: Tensor) -> Tensor:
    """proj(x) for a decode step: on the CPU, a plain nn.Linear (its forward neither replaced on the instance, as
    accelerate's hooks do, nor patched on the class) with no hook, its own or global, and nothing for autograd to
    record runs lintx_triton.native.linear (a C kernel for a few rows: 427 against MKL's 481-505 us for the four
    512 x 512 projections of a step at B = 16, bench/NOTES.md); anything else calls the module."""
    if (type(proj) is nn.Linear and nn.Linear.forward is _LINEAR_FORWARD and "forward" not in proj.__dict__
            and not (proj._forward_hooks or proj._forward_pre_hooks or _hooks._global_forward_hooks
                     or _hooks._global_forward_pre_hooks)):
        y = native.linear(x, proj.weight, proj.bias)
        if y is not None:
            return y
    return proj(x)


class LinearAttention(nn.Module):
    """Multi-head linear attention (Katharopoulos et al., 2020).

    Args:
        embed_dim (int): model width E.
        num_heads (int): heads H; E must be divisible by H unless ``head_dim`` is given.
        feature_map (str | FeatureMap): as in :func:`lintx_triton.linear_attention`. A learnable map (an
            ``nn.Module``, e.g. :func:`lintx_triton.feature_maps.hedgehog`) becomes a submodule: its parameters
            are the module's, trained with it. Default: ``"elu"``.
        causal (bool): Default: ``True``.
        normalize (bool): Default: ``True``.
        head_dim (int | None): D per head. Default: ``embed_dim // num_heads``.
        value_dim (int | None): DV per head. Default: ``head_dim``.
        bias (bool): biases in the projections. Default: ``True``.
        eps (float): Default: ``1e-6``.
        backend (str): Default: ``"auto"``.
        num_kv_heads (int | None): key/value heads HKV (grouped-query attention; HKV divides H, 1 is
            multi-query): smaller k, v projections and a state per kv head. Default: ``num_heads``.
        query_map, key_map (LearnableFeatureMap | ReBasedFeatureMap | None): separate (untied) learnable maps for
            queries and keys, of the same kind (as LoLCATs trains them), instead of ``feature_map``; both or
            neither. Default: ``None``.
        window (int | None): LoLCATs' hybrid: softmax over a window of w recent tokens, linear attention over
            older ones (:func:`lintx_triton.linear_attention`'s ``window``); the mix alpha is the parameter
            ``window_mix [H]``, initialised to ``window_mix_init`` (LoLCATs' ``init_window_factor``; its
            distillation configs use -2.1972 = logit(0.1): f = 0.1). The state of ``forward(return_state=True)``
            and ``step`` is then a :class:`lintx_triton.hybrid.WindowState`. Default: ``None``.
        window_kind, window_affine: as in :func:`lintx_triton.linear_attention`. Defaults: ``"terraced"``,
            ``False``.
        window_mix_init (float): Default: ``-2.1972245773362196``.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> attn = lx.nn.LinearAttention(64, 4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = attn(x[:, :9], return_state=True)     # training / prefill
        >>> y_last, state = attn.step(x[:, 9], state)        # generation, one token
        >>> torch.allclose(y_last, attn(x)[:, 9], atol=1e-5)
        True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        feature_map: Union[str, FeatureMap] = "elu",
        causal: bool = True,
        normalize: bool = True,
        head_dim: Optional[int] = None,
        value_dim: Optional[int] = None,
        bias: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
        num_kv_heads: Optional[int] = None,
        query_map: Optional[LearnableFeatureMap] = None,
        key_map: Optional[LearnableFeatureMap] = None,
        window: Optional[int] = None,
        window_kind: str = "terraced",
        window_affine: bool = False,
        window_mix_init: float = -2.1972245773362196,
    ):
        super().__init__()
        if (query_map is None) != (key_map is None):
            raise ValueError("give both query_map and key_map (untied learnable maps), or neither")
        if query_map is not None:
            if not isinstance(query_map, HeadParams):
                raise TypeError(f"query_map must be a learnable map (LearnableFeatureMap, ReBasedFeatureMap), got "
                                f"{type(query_map).__name__}")
            if feature_map != "elu":
                raise ValueError("give feature_map or query_map/key_map, not both")
            feature_map = query_map.untied_with(key_map)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.num_kv_heads = num_kv_heads
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pass head_dim")
            head_dim = embed_dim // num_heads
        value_dim = value_dim or head_dim
        self.embed_dim, self.num_heads, self.head_dim, self.value_dim = embed_dim, num_heads, head_dim, value_dim
        self.feature_map, self.causal, self.normalize, self.eps, self.backend = (
            feature_map, causal, normalize, eps, backend
        )
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * value_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * value_dim, embed_dim, bias=bias)
        self.window, self.window_kind, self.window_affine = window, window_kind, window_affine
        if window is not None:  # LoLCATs: init_window_factor * torch.ones(1, num_heads, 1, 1), a parameter
            if not causal:
                raise ValueError("window= (the hybrid) is causal: build the module with causal=True")
            self.window_mix = nn.Parameter(torch.full((num_heads,), float(window_mix_init)))

    def _kw(self) -> dict:
        kw = dict(feature_map=self.feature_map, normalize=self.normalize, eps=self.eps, backend=self.backend)
        if self.window is not None:
            kw.update(window=self.window, window_mix=self.window_mix, window_kind=self.window_kind,
                      window_affine=self.window_affine)
        return kw

    def _qkv(self, x: Tensor, project=nn.Module.__call__):
        lead = x.shape[:-1]
        q = project(self.q_proj, x).view(*lead, self.num_heads, self.head_dim)
        k = project(self.k_proj, x).view(*lead, self.num_kv_heads, self.head_dim)
        v = project(self.v_proj, x).view(*lead, self.num_kv_heads, self.value_dim)
        return q, k, v

    def forward(self, x: Tensor, state: Optional[tuple[Tensor, Tensor]] = None, return_state: bool = False):
        """x ``[B, T, E]`` -> y ``[B, T, E]`` (and the final state ``(S, z)`` when ``return_state``)."""
        q, k, v = self._qkv(x)
        out = linear_attention(q, k, v, causal=self.causal, initial_state=state, return_state=return_state,
                               **self._kw())
        o, st = out if return_state else (out, None)
        y = self.out_proj(o.reshape(*x.shape[:-1], self.num_heads * self.value_dim))
        return (y, st) if return_state else y

    def step(self, x: Tensor, state: Optional[tuple[Tensor, Tensor]] = None, inplace: bool = False):
        """One token x ``[B, E]`` -> (y ``[B, E]``, new state); ``inplace`` updates ``state`` instead."""
        if not self.causal:
            raise ValueError("step() is the causal RNN form; this module was built with causal=False")
        q, k, v = self._qkv(x, _step_projection)
        if inplace:
            o = linear_attention_step_(q, k, v, state, **self._kw())
        else:
            o, state = linear_attention_step(q, k, v, state, **self._kw())
        return _step_projection(self.out_proj, o.reshape(x.shape[0], self.num_heads * self.value_dim)), state

    def init_state(self, batch: int, device=None) -> tuple[Tensor, Tensor]:
        """A zero state, for :meth:`step` with ``inplace=True``."""
        from .feature_maps import resolve

        M = resolve(self.feature_map).feature_dim(self.head_dim)
        dev = device if device is not None else self.q_proj.weight.device
        if self.window is not None:  # the hybrid's state: (S, z) and the window's ring buffer
            from .hybrid import empty_window_state

            return empty_window_state(batch, self.num_kv_heads, M, self.head_dim, self.value_dim, self.window,
                                      self.window_kind, self.q_proj.weight.dtype, dev)
        return (torch.zeros(batch, self.num_kv_heads, M, self.value_dim, device=dev),
                torch.zeros(batch, self.num_kv_heads, M, device=dev))
