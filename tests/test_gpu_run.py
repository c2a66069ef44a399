"""bench/gpu_run.sh's dry run on the CPU: every stage leaves its file, a stage cut at its budget leaves the
others' files as they were, and a correctness failure stops the timing stages.

The script is what the lent GPU runs first (issue #15); here it runs with tiny shapes, the GPU-only parts
reporting ``skipped: no GPU``, so that what the GPU session depends on (budgets, files, statuses, the
summary line) is exercised before any device time is spent.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_run.sh"
FILES = {1: "env.txt", 2: "correctness.txt", 3: "first_call.json", 4: "results.json", 5: "autotune.tar",
         6: "feature_maps.json"}

# loose budgets (caps, not durations: the dry run takes well under a minute), so that a loaded CI machine
# does not cut a stage the test expects to finish
TOTAL_S = 1200

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(out, total_s, **env):
    e = dict(os.environ, GPU_RUN_CPU="1", PYTHON=sys.executable)
    e.update(env)
    e.pop("TRITON_INTERPRET", None)  # as from a plain shell: each process picks the interpreter itself
    p = subprocess.run(["bash", str(SCRIPT), str(out), str(total_s)], env=e, capture_output=True, text=True,
                       timeout=300)
    summary = [line for line in p.stdout.splitlines() if line.startswith("gpu_run SUMMARY")]
    assert len(summary) == 1, p.stdout + p.stderr
    return p, summary[0]


def _status(out, k):
    """The status a stage wrote into its own file."""
    path = out / FILES[k]
    if path.suffix == ".json":
        return json.loads(path.read_text())["gpu_run"]["status"]
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            text = tar.extractfile("./autotune.txt").read().decode()
        return text.split(": ")[1].split(" (")[0]
    last = path.read_text().splitlines()[-1]
    assert last.startswith(f"== gpu_run: stage {k} "), last
    return last.split(": ")[2].split(" (")[0]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    p, summary = _run(out, TOTAL_S)
    return out, p, summary


def test_dry_run_writes_every_stage_file(dry_run):
    out, p, summary = dry_run
    assert p.returncode == 0, p.stdout + p.stderr
    names = sorted(f.name for f in out.rglob("*") if f.is_file())
    assert names == sorted(list(FILES.values()) + ["log.txt"])  # 7: the device tool brings back 8 at most
    assert all((out / f).stat().st_size > 0 for f in names)
    for k in (1, 2, 3, 4, 6):
        assert _status(out, k) == "finished", (k, (out / FILES[k]).read_text()[-500:])
    assert _status(out, 5) == "skipped"
    assert ("finished: 1 env, 2 correctness, 3 first_call, 4 grid, 6 feature_maps | cut: - | failed: - | "
            "skipped (no GPU): 5 autotune | not run: -") in summary

    env = (out / "env.txt").read_text()
    assert "torch" in env and "lintx_triton" in env and "device: no GPU" in env
    corr = (out / "correctness.txt").read_text()
    assert "case set, memcheck: skipped: no GPU" in corr
    assert "VERDICT finished" in corr and "ok 6" in corr  # the fuzzer's JSON was read: 3 kernels x 2 backends
    first = json.loads((out / "first_call.json").read_text())
    heur = [r for r in first["runs"] if r["configs"] == "heuristic"]
    assert [r["mode"] for r in heur] == ["fwd", "fwdbwd"] and all(r["status"] == "ok" for r in heur)
    assert all(r["first_s"] > 0 and r["check_worst"] <= 1 and r["goal_met"] is None for r in heur)
    grid = json.loads((out / "results.json").read_text())
    assert grid["ok"] and {r["mode"] for r in grid["results"]} == {"fwd", "fwdbwd", "decode"}
    assert {r["impl"] for r in grid["results"] if r["status"] == "ok"} == {"lintx", "sdpa"}
    impls = [r["impl"] for r in grid["results"]]  # --fla-last: FLA's cells (skipped here) after all the others
    assert impls.index("fla") == len(impls) - impls.count("fla") == 12
    fm = json.loads((out / "feature_maps.json").read_text())
    assert [r["map"] for r in fm["rows"]][:1] == ["elu"] and len(fm["rows"]) == 2
    log = (out / "log.txt").read_text()
    assert all(f"== stage {k} " in log for k in range(1, 7)) and log.rstrip().endswith(summary)


def test_a_stage_cut_at_its_budget_leaves_the_others_files(dry_run, tmp_path):
    src, _, _ = dry_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = {k: (out / f).read_bytes() for k, f in FILES.items()}
    # stage 4 gets 6 s for a grid that would time each cell a million times: `timeout` stops it; stage 6 runs
    p, summary = _run(out, TOTAL_S, STAGES="4 6", BUDGET_4="6", GRID_ARGS="--cpu-reps 1000000")
    assert p.returncode == 0, p.stdout + p.stderr  # cut is not failed
    assert "cut: 4 grid" in summary and "finished: 6 feature_maps" in summary
    for k in (1, 2, 3, 5):
        assert (out / FILES[k]).read_bytes() == before[k], FILES[k]
    grid = json.loads((out / "results.json").read_text())
    assert grid["gpu_run"]["status"] == "cut" and "budget of 6 s" in grid["gpu_run"]["note"]
    assert _status(out, 6) == "finished"
    assert not list(out.glob("*.tmp"))


def test_a_correctness_failure_stops_the_timing_stages(tmp_path):
    # a python that answers `-m lintx_triton fuzz` with a planted FAIL, and is python otherwise
    fake = tmp_path / "python"
    fail = dict(kernel="forward", backend="triton", feature_map="elu", dtype="float32", normalize=True, state=False,
                examples=1, worst=7.0, status="FAIL", error="EquivalenceError: planted",
                case={"T": 5}, snippet="raise AssertionError('planted')")
    (tmp_path / "fuzz.json").write_text(json.dumps(dict(device="cpu", seed=0, examples_per_round=1, results=[fail])))
    fake.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m lintx_triton fuzz" && "$*" != *--help* ]]; then cat '{tmp_path / "fuzz.json"}'; exit 1; fi
exec '{sys.executable}' "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    p, summary = _run(out, TOTAL_S, STAGES="2 3 4", PYTHON=str(fake))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "failed: 2 correctness" in summary and "not run: 3 first_call, 4 grid" in summary
    corr = (out / "correctness.txt").read_text()
    assert "EquivalenceError: planted" in corr and "raise AssertionError('planted')" in corr
    for k in (3, 4):
        doc = json.loads((out / FILES[k]).read_text())["gpu_run"]
        assert doc["status"] == "not run" and "stage 2" in doc["note"]
