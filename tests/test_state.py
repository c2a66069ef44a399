"""The state API: a sequence split in two and resumed equals one call; T = 1 steps equal the whole."""

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import lintx_triton as lx
from helpers import EPS_VALUES, call_kwargs, case_id, cases, check_forward, check_state, make_inputs, on


@given(c=cases(dtypes=("float32",), eps_values=EPS_VALUES), backend=st.sampled_from(["triton", "torch"]),
       data=st.data())
def test_split_and_resume(kernel_device, c, backend, data):
    c = dict(c, causal=True)
    note(case_id(c))
    q, k, v, state = make_inputs(c, device=on(kernel_device, backend))
    cut = data.draw(st.integers(0, c["T"]), label="cut")
    kw = dict(call_kwargs(c), feature_map=c["feature_map"], backend=backend)
    o, (S, z) = lx.linear_attention(q, k, v, initial_state=state, return_state=True, **kw)
    o1, st1 = lx.linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], initial_state=state, return_state=True, **kw)
    o2, (S2, z2) = lx.linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], initial_state=st1, return_state=True, **kw)
    # both halves together meet the same per-element error bound as the one call
    check_forward(c, torch.cat([o1, o2], 1), q, k, v, state, name="resumed o")
    check_forward(c, o, q, k, v, state)
    check_state(c, (S2, z2), q, k, v, state)
    check_state(c, (S, z), q, k, v, state)
    torch.testing.assert_close(S2, S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_token_by_token_equals_one_call(kernel_device, backend):
    g = torch.Generator().manual_seed(1)
    dev = on(kernel_device, backend)
    q, k = (torch.randn(2, 6, 2, 8, generator=g).to(dev) for _ in range(2))
    v = torch.randn(2, 6, 2, 5, generator=g).to(dev)
    o, (S, z) = lx.linear_attention(q, k, v, return_state=True, backend=backend)
    state, outs = None, []
    for t in range(6):
        ot, state = lx.linear_attention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], initial_state=state,
                                        return_state=True, backend=backend)
        outs.append(ot)
    torch.testing.assert_close(torch.cat(outs, 1), o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[0], S)
    torch.testing.assert_close(state[1], z)
