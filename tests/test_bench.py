"""bench/: the side-by-side harness end to end at tiny shapes on a CPU, its checks, floors and targets.

The pytest-benchmark benchmarks of ``bench/benchmarks.py`` are imported here, so that this suite
runs each of them (one round, nothing gated on time). The numbers are for a GPU; here only the code
is exercised, the Triton kernels in the interpreter.
"""

import dataclasses
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("pytest_benchmark")
click_testing = pytest.importorskip("click.testing")

from bench import harness, report  # noqa: E402
from bench import side_by_side as cli  # noqa: E402
from bench.benchmarks import test_side_by_side  # noqa: E402, F401  (collected here: CI runs them)

TINY = ["--T", "16,40", "--D", "16", "--H", "2", "--tokens", "80", "--decode-batch", "2", "--check-window", "16",
        "--cpu-reps", "1", "--impls", "lintx,sdpa,fla,torch,torch-chunked"]


def _invoke(args):
    return click_testing.CliRunner().invoke(cli.main, args, catch_exceptions=False)


def test_side_by_side_cli_end_to_end(tmp_path):
    res = _invoke(TINY + ["--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "results.json").read_text())
    cells = {(r["mode"], r["T"], r["impl"]): r for r in out["results"]}
    assert len(cells) == 4 * 2 * 5
    for mode in harness.MODES:
        for T in (16, 40):
            lx = cells[(mode, T, "lintx")]
            assert lx["status"] == "ok" and lx["check_worst"] <= 1 and lx["time_ms"] > 0, lx
            assert lx["floor_ms"] > 0 and 0 < lx["floor_frac"]
            assert lx["peak_mib"] is None  # a CPU has no allocator statistics
            assert "sdpa" in lx["speedup"] and lx["speedup"]["sdpa"] > 0
            # FLA is absent here or needs CUDA: skipped, with the reason, and the run goes on
            assert cells[(mode, T, "fla")]["status"] == "skip" and cells[(mode, T, "fla")]["reason"]
    assert cells[("decode", 40, "sdpa")]["status"] == "ok"
    assert cells[("decode", 40, "torch-chunked")]["status"] == "skip"
    assert out["ok"] and out["meta"]["gpu"] is None and out["meta"]["copy_GBps"] > 0
    assert out["targets"] == []  # D = 16, H = 2: not the targets' shape

    md = (tmp_path / "results.md").read_text()
    for mode in harness.MODES:
        assert f"## {mode}:" in md
    assert "| T | B | lintx | SDPA causal |" in md and "not GPU numbers" in md
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # a run cut short leaves its JSON: the table and plot are redrawn from it
    (tmp_path / "again").mkdir()
    res = _invoke(["--report-only", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "results.md").read_text() == md


def _lagged(q, k, v, state=None, return_state=False):
    """A planted bug: each output mixes in 10% of the previous token's."""
    r = harness.torch_attend(q, k, v, state, return_state)
    o = r[0] if return_state else r
    o2 = o.clone()
    o2[:, 1:] = 0.9 * o[:, 1:] + 0.1 * o[:, :-1]
    return (o2, r[1]) if return_state else o2


def test_a_wrong_lintx_fails_its_check_and_is_not_timed(tmp_path, monkeypatch):
    real = harness.default_impls

    def planted(torch_max_gib=48.0):
        impls = real(torch_max_gib)
        return [dataclasses.replace(i, attend=_lagged) if i.name == "lintx" else i for i in impls]

    monkeypatch.setattr(harness, "default_impls", planted)
    res = _invoke(TINY + ["--modes", "fwd,prefill", "--impls", "lintx,sdpa", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "lintx failed its check" in res.output
    out = json.loads((tmp_path / "results.json").read_text())
    bad = [r for r in out["results"] if r["impl"] == "lintx"]
    assert bad and all(r["status"] == "fail" and r.get("time_ms") is None and r["check_worst"] > 1 for r in bad)
    assert all(r["status"] == "ok" for r in out["results"] if r["impl"] == "sdpa")
    assert "FAIL" in (tmp_path / "results.md").read_text()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 1.05 * g


@pytest.mark.parametrize("window", [16, 64], ids=["tail-window", "all-tokens"])
def test_checks_catch_a_wrong_gradient_and_a_lost_state(window):
    torch_impl = next(i for i in harness.default_impls() if i.name == "torch")
    row = harness.Row("fwdbwd", 2, 48, 2, 16, 16, "bf16")
    inp = harness.make_inputs(row, torch.device("cpu"))
    assert harness.check(torch_impl, row, inp, window) <= 1
    bad_grad = dataclasses.replace(torch_impl, attend=lambda q, k, v, s=None, r=False: harness.torch_attend(
        q, k, _ScaleGrad.apply(v), s, r))
    assert harness.check(bad_grad, row, inp, window) > 1

    # the state restarted every 16 tokens: the first window is right, the tokens after it are not
    def restarting(q, k, v, state=None, return_state=False):
        return torch.cat([harness.torch_attend(q[:, i:i + 16], k[:, i:i + 16], v[:, i:i + 16])
                          for i in range(0, q.shape[1], 16)], 1)

    row = harness.Row("fwd", 2, 48, 2, 16, 16, "bf16")
    inp = harness.make_inputs(row, torch.device("cpu"))
    assert harness.check(dataclasses.replace(torch_impl, attend=restarting), row, inp, window) > 1


def test_floors_match_the_h200_anchor():
    """shared/anchors/h200.md: at 4.25 TB/s, fwd 0.063 ms, fwd+bwd about 0.17 ms, decode state 0.002 ms."""
    bw = 4.25e12
    ms = lambda row, fam="linear": harness.floor_bytes(row, fam) / bw * 1e3  # noqa: E731
    assert ms(harness.Row("fwd", 32, 1024, 16, 64, 64, "bf16")) == pytest.approx(0.063, abs=5e-4)
    assert ms(harness.Row("fwdbwd", 32, 1024, 16, 64, 64, "bf16")) == pytest.approx(0.17, abs=6e-3)
    assert ms(harness.Row("decode", 16, 1024, 16, 64, 64, "bf16")) == pytest.approx(0.002, abs=2e-4)
    # SDPA's decode reads its KV cache: 2 x 16 x 16 x 65536 x 64 bf16 = 4 GiB
    assert ms(harness.Row("decode", 16, 65536, 16, 64, 64, "bf16"), "softmax") == pytest.approx(1.01, abs=0.01)


def test_targets_are_judged_on_a_gpu_only():
    def cell(mode, T, B, t, status="ok"):
        return dict(mode=mode, B=B, T=T, H=16, D=64, DV=64, dtype="bf16", impl="lintx", status=status, time_ms=t)

    results = [cell("fwd", 1024, 32, 0.12), cell("fwdbwd", 1024, 32, 0.7), cell("decode", 4096, 16, 0.005),
               cell("fwd", 65536, 1, 0.2), cell("fwd", 2048, 16, 0.1, status="fail"),
               dict(cell("fwd", 1024, 32, 0.3), impl="sdpa")]
    out = harness.summarize(dict(meta=dict(gpu="NVIDIA H200"), results=results))
    met = {(t["mode"], t["T"]): t["met"] for t in out["targets"]}
    assert met == {("fwd", 1024): True, ("fwdbwd", 1024): False, ("decode", 4096): True, ("fwd", 65536): False,
                   ("fwd", 2048): None}
    assert results[0]["speedup"] == {"sdpa": pytest.approx(2.5)}
    assert not out["ok"]
    assert "| fwd | 1024 | 32 | 0.1200 | 0.13 | yes |" in report.to_markdown(out)
    cpu = harness.summarize(dict(meta=dict(gpu=None), results=results[:1]))
    assert cpu["targets"][0]["met"] is None


def test_sanitize_case_kernel_variants_on_cpu():
    """The sanitizer script's extra cases (random features, packed + grouped, the state alone) pass here,
    so that on the GPU a failure under compute-sanitizer means the GPU run, not the script."""
    import importlib

    import torch

    sanitize_case = importlib.import_module("bench.sanitize_case")
    assert sanitize_case._kernel_variants(torch.device("cpu"), ["fp32"]) == 0


def test_cpu_path_benchmark_tiny(tmp_path):
    """bench/cpu_path.py (issue #17's CPU table) at a tiny size, one round: the code cannot rot; no time is gated."""
    from bench import cpu_path

    out = tmp_path / "cpu.json"
    res = click_testing.CliRunner().invoke(cpu_path.main, ["--T", "16,40", "--heads", "2", "--dim", "16", "--tokens",
                                                           "80", "--reps", "1", "--backend", "torch", "--json", str(out)],
                                           catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["T"] for r in rows if "T" in r] == [16, 40]
    assert all(r["lintx_fwd"] > 0 and r["sdpa_fwdbwd"] > 0 and r["floor_fwd"] > 0 for r in rows if "T" in r)
    assert [r["decode_B"] for r in rows if "decode_B" in r] == [1, 16]


def test_cpu_path_benchmark_cpu_clock(tmp_path):
    """bench/cpu_path.py --clock cpu (CPU time, for a loaded machine) at a tiny size: the rows say which clock
    timed them and carry a floor per row."""
    from bench import cpu_path

    out = tmp_path / "cpu.json"
    res = click_testing.CliRunner().invoke(cpu_path.main, ["--T", "16", "--heads", "2", "--dim", "16", "--tokens", "32",
                                                           "--reps", "1", "--backend", "torch", "--clock", "cpu",
                                                           "--impls", "lintx,chunked,sdpa", "--json", str(out)],
                                           catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["clock"] == "cpu" and "median cpu ms" in res.output
    rows = [r for r in data["rows"] if "T" in r]
    assert [r["T"] for r in rows] == [16] and rows[0]["bmm_gflops"] > 0 and rows[0]["lintx_fwdbwd"] > 0
    from lintx_triton import native

    assert rows[0]["chunked_fwdbwd"] > 0 and native.enabled()  # the chunked column turns the native code back on
