"""bench/polynomial.py end to end at a tiny shape on the CPU (the kernels in the Triton interpreter): the float64
check runs and can fail, and the memory probe sees the phi-shaped [B, T, H, M] tensors that autograd keeps when
phi is built in PyTorch, and none in the fused way. Timing and FLA's ways need a GPU."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

click_testing = pytest.importorskip("click.testing")

from bench import polynomial  # noqa: E402


def test_polynomial_bench_end_to_end(tmp_path):
    out = tmp_path / "polynomial.json"
    res = click_testing.CliRunner().invoke(
        polynomial.main, ["--device", "cpu", "--T", "40", "--tokens", "40", "--H", "2", "--D", "8", "--DV", "4",
                          "--dtype", "fp32", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["M"] == 73 and rep["ways"] == ["fused", "torch_phi"]  # no FLA without a GPU
    (row,) = rep["rows"]
    assert all(row["check"][w]["ratio"] <= 1.0 for w in ("fused", "torch_phi")), row["check"]
    assert row["fused"]["kept_phi_shaped"] == 0 and row["torch_phi"]["kept_phi_shaped"] == 2, row
    assert row["fused"]["kept_in_phis"] < 0.5 <= 2 <= row["torch_phi"]["kept_in_phis"], row
    assert row["fused"]["peak_bytes"] < row["torch_phi"]["peak_bytes"]
