"""lintx_triton: generated Triton kernels for the causal linear attention of
"Transformers are RNNs" (Katharopoulos et al., ICML 2020), with the feature map
and the normalizer fused in, registered as torch.compile-friendly custom ops.

Public API::

    lintx_triton.linear_attention(q, k, v, *, feature_map="elu", causal=True, normalize=True,
                                  scale=1.0, eps=1e-6, initial_state=None, return_state=False,
                                  backend="auto", cu_seqlens=None)
    lintx_triton.linear_attention_state(k, v)            # the state a segment leaves, without outputs
    lintx_triton.linear_attention_step(q, k, v, state)   # one token of the RNN form (and step_: in place)
    lintx_triton.nn.LinearAttention   # a drop-in attention module: forward() and step()
    lintx_triton.distributed.linear_attention(q, k, v, group)   # one sequence sharded over ranks
    lintx_triton.emit(...)            # the generated Triton source of a variant
    lintx_triton.feature_maps         # elu, relu, identity, favor, random_fourier, hedgehog, t2r, taylor,
                                      # rebased, and user-defined maps
    lintx_triton.hybrid               # WindowState: the state of LoLCATs' sliding-window hybrid (window=)
    lintx_triton.config_for(...)      # the launch config a call will use, and where it came from

Importing does nothing but register the ``torch.ops.lintx`` custom ops: no
device probing, no compilation (kernels are generated at their first call).
"""

from . import feature_maps
from . import distributed
from . import hybrid
from . import nn
from .api import emit, linear_attention, linear_attention_state, linear_attention_step, linear_attention_step_
from .config import Config, config_for
from .spec import KernelSpec

__version__ = "0.1.0"

__all__ = [
    "linear_attention",
    "linear_attention_state",
    "linear_attention_step",
    "linear_attention_step_",
    "nn",
    "distributed",
    "hybrid",
    "emit", "feature_maps", "config_for", "Config", "KernelSpec", "__version__"]
