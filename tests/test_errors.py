"""Bad input raises a clear ValueError / TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import lintx_triton as lx

q = torch.randn(2, 5, 3, 8)
v = torch.randn(2, 5, 3, 6)
S0, z0 = torch.zeros(2, 3, 8, 6), torch.zeros(2, 3, 8)

BAD = {
    "q-rank": (dict(q=torch.randn(5, 3, 8)), ValueError, r"q must have 4 dimensions.*\(5, 3, 8\)"),
    "k-shape": (dict(k=torch.randn(2, 5, 3, 7)), ValueError, r"k must be \[B, T, HKV, D\] with B, T, D of q"),
    "v-length": (dict(v=torch.randn(2, 4, 3, 6)), ValueError, r"v must be \[B, T, HKV, DV\]"),
    "v-heads": (dict(v=torch.randn(2, 5, 2, 6)), ValueError, r"v must be \[B, T, HKV, DV\]"),
    "kv-heads": (dict(k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 6)), ValueError, r"multiple of k and v's heads HKV = 2"),
    "cu-dtype": (dict(q=q[:1], k=q[:1], v=v[:1], cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, r"cu_seqlens must be int32 or int64"),
    "cu-batch": (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, r"q must be \[1, total_T, H, D\]"),
    "cu-end": (dict(q=q[:1], k=q[:1], v=v[:1], cu_seqlens=torch.tensor([0, 2, 4])), ValueError, r"end at total_T = 5.*\[0, 2, 4\]"),
    "cu-decreasing": (dict(q=q[:1], k=q[:1], v=v[:1], cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, r"never decrease"),
    "cu-start": (dict(q=q[:1], k=q[:1], v=v[:1], cu_seqlens=torch.tensor([1, 5], dtype=torch.int32)), ValueError, r"start at 0"),
    "cu-2d": (dict(q=q[:1], k=q[:1], v=v[:1], cu_seqlens=torch.tensor([[0, 5]])), ValueError, r"1-D \[N \+ 1\]"),
    "cu-state": (dict(q=q[:1], k=q[:1], v=v[:1], cu_seqlens=torch.tensor([0, 2, 5]), initial_state=(S0[:1], z0[:1])), ValueError, r"initial_state S must have shape \[2, 3, 8, 6\]"),
    "int-dtype": (dict(q=torch.ones(2, 5, 3, 8, dtype=torch.int32)), TypeError, r"q must be float32, float16 or bfloat16"),
    "float64": (dict(v=v.double()), TypeError, r"v must be float32, float16 or bfloat16"),
    "mixed-dtype": (dict(v=v.half()), TypeError, r"share one dtype"),
    "not-tensor": (dict(k=[1, 2]), TypeError, r"k must be a torch.Tensor"),
    "meta-device": (dict(v=torch.empty(2, 5, 3, 6, device="meta")), ValueError, r"one device"),
    "unknown-map": (dict(feature_map="softmax"), ValueError, r"unknown feature_map 'softmax'.*elu"),
    "map-type": (dict(feature_map=3), TypeError, r"feature_map must be a name"),
    "backend": (dict(backend="cuda"), ValueError, r"backend must be one of"),
    "eps": (dict(eps=-1.0), ValueError, r"eps must be a real number >= 0"),
    "scale": (dict(scale="1"), TypeError, r"scale must be a real number"),
    "state-not-pair": (dict(initial_state=S0), TypeError, r"initial_state must be a pair"),
    "state-S-shape": (dict(initial_state=(torch.zeros(2, 3, 8, 5), z0)), ValueError, r"initial_state S must have shape \[2, 3, 8, 6\].*\(2, 3, 8, 5\)"),
    "state-z-shape": (dict(initial_state=(S0, torch.zeros(2, 3))), ValueError, r"initial_state z must have shape \[2, 3, 8\]"),
    "state-dtype": (dict(initial_state=(S0.half(), z0)), TypeError, r"initial_state S must be float32"),
    "state-noncausal": (dict(initial_state=(S0, z0), causal=False), ValueError, r"only defined for causal=True"),
    "zero-head-dim": (dict(q=torch.randn(2, 5, 3, 0), k=torch.randn(2, 5, 3, 0)), ValueError, r"head dims must be >= 1"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_input_raises(name, backend):
    changes, exc, pattern = BAD[name]
    args = dict(q=q, k=q, v=v, backend=backend)
    args.update(changes)
    with pytest.raises(exc, match=pattern):
        lx.linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_too_wide_for_the_kernels():
    wide = torch.randn(1, 3, 1, 300)
    with pytest.raises(ValueError, match=r"up to 256.*backend='torch'"):
        lx.linear_attention(wide, wide, wide, backend="triton")
    assert lx.linear_attention(wide, wide, wide, backend="torch").shape == (1, 3, 1, 300)


@pytest.mark.parametrize("entry", ["state", "step", "step_", "favor-M"])
def test_too_wide_at_every_entry_point(entry):
    """The width limit is checked wherever a call can reach the kernels, before any launch."""
    wide, narrow = torch.randn(1, 3, 1, 300), torch.randn(1, 3, 1, 8)
    with pytest.raises(ValueError, match=r"up to 256.*backend='torch'"):
        if entry == "state":
            lx.linear_attention_state(wide, wide, backend="triton")
        elif entry == "step":
            lx.linear_attention_step(wide[:, 0], wide[:, 0], narrow[:, 0], backend="triton")
        elif entry == "step_":
            state = (torch.zeros(1, 1, 300, 8), torch.zeros(1, 1, 300))
            lx.linear_attention_step_(wide[:, 0], wide[:, 0], narrow[:, 0], state, backend="triton")
        else:  # D fits, M does not
            fm = lx.feature_maps.favor(8, num_features=300)
            lx.linear_attention(narrow, narrow, narrow, feature_map=fm, backend="triton")


def test_bad_config_override():
    with pytest.raises(TypeError, match="unknown Config fields"):
        with lx.config.override(chunks=16):
            pass
    with pytest.raises(ValueError, match="power of two"):
        lx.Config(chunk=24)
