"""bench/learnable.py: a learnable map fused in the kernels against the map applied in PyTorch first (FLA's way).

End to end at a tiny shape on the CPU (the kernels in the Triton interpreter): the float64 agreement check runs
and can fail, and the memory probe sees the phi-sized [B, T, H, M] tensors that autograd keeps for the
backward in the PyTorch way and none in the fused way. Timing needs a GPU and is not exercised here.
"""

import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

click_testing = pytest.importorskip("click.testing")

from bench import learnable  # noqa: E402

# T = 72 is no other dimension of the case, so a tensor with a 72 in its shape is per token
B, T, H, D = 1, 72, 2, 16
M = 2 * D


def test_learnable_bench_end_to_end(tmp_path):
    out = tmp_path / "learnable.json"
    res = click_testing.CliRunner().invoke(
        learnable.main, ["--maps", "hedgehog", "--T", str(T), "--tokens", str(B * T), "--H", str(H), "--D", str(D),
                         "--dtype", "fp32", "--check-window", str(T), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["map"] == f"hedgehog_lolcats_d{D}_m{M}" and row["heads_of_W"] == H and row["tied"] is False
    # the check compared the output, dq, dk, dv and both parameter sets' dW with float64
    assert set(row["check"]) == {"o", "dq", "dk", "dv", "dquery.weight", "dkey.weight"}
    assert all(c["err_fused"] <= 1e-5 * c["max_ref"] for c in row["check"].values()), row["check"]  # fp32: ~1e-7
    fused, phi = row["fused"], row["torch_phi"]
    phi_shape = f"[{B}, {T}, {H}, {M}]"
    # PyTorch's way keeps phi_q and phi_k (the clamp's outputs, which the identity kernel saves) and the clamp's
    # inputs; the fused way keeps no [B, T, H, M] buffer at all
    assert phi["kept_phi_shaped"] >= 2 and all(s.startswith(phi_shape) for s in phi["kept_phi_shaped_shapes"]), phi
    assert any("clamp" in s for s in phi["kept_phi_shaped_shapes"]), phi
    assert fused["kept_phi_shaped"] == 0, fused["kept"]
    # phi, the clamp's input, the two softmax halves per side (6 phi) and x' per side (2 x M / 2): 7 phi more
    assert 6.5 <= row["kept_extra_in_phi"] <= 7.5, (row["kept_extra_in_phi"], phi["kept"], fused["kept"])
    assert phi["peak_bytes"] - fused["peak_bytes"] >= 2 * row["phi_bytes"]
    assert "fwdbwd_ms" not in fused  # no GPU: nothing timed


def test_agreement_check_fails_on_a_wrong_way(monkeypatch):
    """A fused output 0.1 % off is far outside the tests' fp32 bound (TOL 2e-5 x the magnitudes): the check says so."""
    fm = learnable.build_map("t2r", D, M, H, tied=False)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 16, H, D, generator=g) for _ in range(4))
    right = learnable.run_way
    learnable.check(fm, q, k, v, do, 16)  # passes as is
    monkeypatch.setattr(learnable, "run_way", lambda way, *a: right(way, *a) * (1.001 if way == "fused" else 1))
    with pytest.raises(AssertionError, match="fused error"):
        learnable.check(fm, q, k, v, do, 16)


def test_probe_counts_what_autograd_keeps():
    """A tensor only the autograd graph holds is live; a view or an in-place result is not a second allocation;
    a freed temporary leaves the live bytes but not the peak."""
    x = torch.randn(1000, requires_grad=True)
    with learnable.LiveBytes() as p:
        y = x.exp()  # saved by exp for its backward
        z = y.view(10, 100).sum()  # a view: no allocation; the sum's 4-byte result
        del y
        tmp = torch.ones(4000)  # 16000 bytes, then freed
        del tmp
        live = p.live_bytes()
    assert live == 4000 + 4 and p.peak == 4000 + 4 + 16000, (live, p.peak, p.live_now())
    assert z.requires_grad
