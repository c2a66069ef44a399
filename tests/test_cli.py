"""The `lintx` command line: fuzz (passing and failing), emit, info."""

import json
import os
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from lintx_triton.cli import main
from lintx_triton.feature_maps import base as fm_base

BAD_MAP = textwrap.dedent('''
    import lintx_triton as lx
    # phi in Triton adds 0.01 that the reference does not: every check must catch it
    lx.feature_maps.register(lx.feature_maps.ElementwiseFeatureMap(
        name="off_by_a_bit", phi="x + 0.01", vjp="g", reference=lambda x: x), overwrite=True)
''')


def test_fuzz_passes_and_reports_json():
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "elu", "--dtype", "fp32", "--kernel", "forward",
                                  "--normalize", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    res = data["results"]
    assert {x["backend"] for x in res} == {"triton", "torch"} and {x["state"] for x in res} == {True, False}
    assert all(x["status"] == "ok" and x["examples"] == 2 and 0 <= x["worst"] <= 1 for x in res)


def test_fuzz_table_backward():
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "relu", "--dtype", "bf16", "--kernel", "backward",
                                  "--backend", "triton", "--raw", "--no-state"])
    assert r.exit_code == 0, r.output
    assert "backward" in r.stdout and "relu" in r.stdout and "ok" in r.stdout


def test_fuzz_failure_is_shrunk_to_a_snippet_that_reproduces(tmp_path, monkeypatch):
    (tmp_path / "badmap_mod.py").write_text(BAD_MAP)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the map it registers, and the module, last for this test only (later runs see the package's own maps)
    monkeypatch.setattr(fm_base, "_REGISTRY", dict(fm_base._REGISTRY))
    monkeypatch.delitem(sys.modules, "badmap_mod", raising=False)
    r = CliRunner().invoke(main, ["fuzz", "-n", "5", "--map", "off_by_a_bit", "--dtype", "fp32", "--kernel",
                                  "forward", "--backend", "triton", "--raw", "--no-state", "--import", "badmap_mod",
                                  "--json"])
    sys.modules.pop("badmap_mod", None)
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    (res,) = data["results"]
    assert res["status"] == "FAIL" and "EquivalenceError" in res["error"]
    assert res["fault"] == "mismatch" and data["exit_code"] == 1 and data["counts"]["FAIL"] == 1
    # shrunk: the smallest shape hypothesis can reach still fails
    assert res["case"]["T"] == 1 and res["case"]["B"] == 1 and res["case"]["H"] == 1
    script = tmp_path / "repro.py"
    script.write_text(res["snippet"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "EquivalenceError" in out.stderr, out.stderr[-2000:]


def test_fuzz_usage_errors():
    r = CliRunner().invoke(main, ["fuzz", "--map", "nope"])
    assert r.exit_code == 2 and "unknown feature map" in r.output and "elu" in r.output
    r = CliRunner().invoke(main, ["fuzz", "--dtype", "int8"])
    assert r.exit_code == 2 and "bf16" in r.output


def test_emit_prints_and_writes(tmp_path):
    r = CliRunner().invoke(main, ["emit", "--map", "relu", "--dtype", "fp16", "-D", "48", "-DV", "80"])
    assert r.exit_code == 0, r.output
    assert "tl.maximum(x, 0.0)" in r.stdout and "D = tl.constexpr(48)" in r.stdout and "DV = tl.constexpr(80)" in r.stdout
    r = CliRunner().invoke(main, ["emit", "--full", "--raw", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    (f,) = (tmp_path / "k").iterdir()
    # under the interpreter a bf16 call upcasts its products: the tag says so (-fp32dot)
    assert f.name.startswith("elu-full-raw-bfloat16-D64-DV64") and "def chunk_fwd_kernel_o(" in f.read_text()
    r = CliRunner().invoke(main, ["emit", "--full", "--initial-state"])
    assert r.exit_code == 2 and "--causal" in r.output


def test_info_json():
    r = CliRunner().invoke(main, ["info", "-B", "2", "-T", "100", "-D", "128", "--dtype", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["device"] == "cpu" and d["triton_interpret"] is True and d["auto_backend"] == "triton"
    assert d["shape"]["D"] == 128 and d["config"]["path"] in ("fused", "chunked") and d["config_source"] == "heuristic"
    assert d["kernel_cache"].endswith("kernels")


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "lintx_triton", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fuzz" in out.stdout and "emit" in out.stdout and "info" in out.stdout


def test_resources_json_in_a_fresh_process():
    # compiles for sm_90 on this CPU; a fresh process, since interpreted kernels patch triton.language
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "lintx_triton", "resources", "--dtype", "bf16", "-D", "64", "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    stages = {k["stage"]: k for k in d["kernels"]}
    assert len(stages) == 10 and d["arch"] == 90
    assert stages["fwd output (fused)"]["hgmma"] > 0 and not stages["fwd output (fused)"]["spills"]
    assert all(k["registers"] > 0 for k in d["kernels"])


def test_fuzz_decode_kernel():
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--kernel", "decode", "--map", "elu", "--dtype", "fp32",
                                  "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert {x["kernel"] for x in res} == {"decode"} and all(x["status"] == "ok" for x in res)


def test_fuzz_random_feature_families():
    """favor / fourier draw a fresh D, M and projection per example; the case carries them for the snippet."""
    r = CliRunner().invoke(main, ["fuzz", "-n", "2", "--map", "favor_hyp", "--map", "fourier", "--dtype", "fp32",
                                  "--kernel", "forward", "--backend", "triton", "--state", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["results"]
    assert {row["feature_map"] for row in rows} == {"favor_hyp", "fourier"}
    assert all(row["status"] == "ok" and row["examples"] == 2 for row in rows)


def test_emit_random_feature_map_with_m():
    r = CliRunner().invoke(main, ["emit", "--map", "favor_hyp:24", "-D", "16", "--dtype", "fp16"])
    assert r.exit_code == 0, r.output
    assert "'favor_hyp_d16_m24'" in r.output and "def phi_proj(" in r.output and "FEAT_TF32 = tl.constexpr(True)" in r.output
    r = CliRunner().invoke(main, ["emit", "--map", "fourier:15", "-D", "8"])
    assert r.exit_code == 2 and "even" in r.output


def test_emit_and_info_do_not_import_hypothesis():
    """lintx emit / info (random-feature maps included) need neither lintx_triton.testing nor hypothesis."""
    code = textwrap.dedent('''
        import sys
        from click.testing import CliRunner
        from lintx_triton.cli import main
        for args in (["emit", "--map", "favor:128", "-D", "64"], ["info", "--map", "fourier", "-D", "16", "--json"]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, r.output
        print(sorted(m for m in sys.modules if m.split(".")[0] == "hypothesis" or m == "lintx_triton.testing"))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
