"""The offline tuner (autotune/, installed as lintx_triton.autotune) and the runtime lookup of its configs
(lintx_triton.tuned_configs, lintx_triton.config), on a CPU.

Kernels run in Triton's interpreter and every time comes from an injected fake timer: what is tested is
the tuner's logic (candidates, pruning, the correctness gates, resume, the budget, the files) and the
lookup (order, nearest bucket, version warning, heuristic default). Pruning by compiling for sm_90 runs
in a child process with TRITON_INTERPRET=0, two compiles.
"""

import dataclasses
import json
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner

import lintx_triton as lx
from lintx_triton import autotune, testing
from lintx_triton import config as C
from lintx_triton import tuned_configs as TC
from lintx_triton.autotune import (
    DeviceLimits,
    Task,
    candidates,
    estimate_fits,
    spec_of,
    tune,
    write_config_file,
)
from lintx_triton.autotune import tuner as tuner_mod
from lintx_triton.compile_report import KernelResources
from lintx_triton.spec import FAMILIES

H200 = DeviceLimits.for_arch(90, name="NVIDIA H200")
SPEC = spec_of("elu", True, True, "float32", 8, 8)  # tiny: the interpreter runs it fast
BF16 = spec_of("elu", True, True, "bfloat16", 64, 64)
# three forward candidates: the H200 default for SPEC (chunk 32, 8 warps, 2 stages) and two more
FWD_SPACE = {"forward": dict(chunk=(16, 32), block_v=(16,), num_warps=(4,), num_stages=(1,), path=("chunked",)),
             "decode": dict(block_v=(16,))}


@pytest.fixture(autouse=True)
def fresh_lookup():
    C.clear_cache()
    yield
    C.clear_cache()


def ms_by_chunk(table):
    """A fake timer: the time of a candidate by its (forward) chunk, counting its calls."""
    def timer(fn, cfg):
        timer.calls.append(cfg)
        return table.get(cfg.chunk, 5.0)
    timer.calls = []
    return timer


def run_tune(tmp_path, tasks, timer, **kw):
    kw = dict(out_dir=tmp_path / "configs", space=FWD_SPACE, timer=timer, device="cpu", limits=H200,
              journal=tmp_path / "journal.jsonl", prune_compile=False) | kw
    return tune(tasks, **kw)


# ---------------------------------------------------------------- candidates and pruning

def test_candidates_vary_only_their_kernels_fields():
    base = C.gpu_heuristic(BF16, 512, 132, arch=90)
    fwd = candidates("forward", BF16, base)
    assert fwd[0] == base and len({autotune.kernel_fields("forward", c).values().__repr__() for c in fwd}) == len(fwd)
    assert {c.path for c in fwd} == {"fused", "chunked"}
    for c in fwd:
        assert (c.bwd_chunk, c.bwd_block_v, c.bwd_num_warps, c.bwd_num_stages) == \
            (base.bwd_chunk, base.bwd_block_v, base.bwd_num_warps, base.bwd_num_stages)
    bwd = candidates("backward", BF16, base)
    assert {(c.chunk, c.block_v, c.num_warps, c.num_stages, c.path) for c in bwd} == \
        {(base.chunk, base.block_v, base.num_warps, base.num_stages, base.path)}
    assert len({c.bwd_num_warps for c in bwd}) > 1
    full = spec_of("elu", False, True, "bfloat16", 48, 20)  # non-causal; DV 20 pads to 32
    for c in candidates("forward", full, C.gpu_heuristic(full, 512, 132), "full"):
        assert c.path == "chunked" and c.block_v <= 32
    assert [c.block_v for c in candidates("decode", full, C.gpu_heuristic(full, 64, 132), "full")] == [32, 16]
    with pytest.raises(ValueError, match="must give values for"):
        candidates("backward", BF16, base, {"backward": dict(bwd_chunk=(32,))})


def test_estimate_prunes_only_hopeless_tiles():
    base = C.gpu_heuristic(BF16, 512, 132, arch=90)
    assert estimate_fits("forward", BF16, base, H200) is None
    assert estimate_fits("backward", BF16, base, H200) is None
    wide = spec_of("elu", True, True, "float32", 128, 128)
    huge = dataclasses.replace(base, chunk=128, block_v=128, num_warps=2)
    assert "registers" in estimate_fits("forward", wide, huge, H200)
    small_smem = dataclasses.replace(H200, smem_per_block=16 * 1024)
    assert "shared memory" in estimate_fits("forward", BF16, dataclasses.replace(base, num_warps=8), small_smem)


def res(kernel="chunk_fwd_kernel_o", **kw):
    r = dict(kernel=kernel, arch=90, num_warps=8, registers=200, stack=0, spill_loads=0, spill_stores=0, shared=16384,
             hgmma=8, hmma=0, blocks_per_sm=1, warps_per_sm=8) | kw
    return KernelResources(**r)


def test_resource_verdict():
    v = autotune.resource_verdict
    assert v([res(), res("chunk_kernel_h")], H200) is None
    assert v([res(spill_loads=20, spill_stores=20, stack=64)], H200, max_spills=64) is None
    assert "spill instructions" in v([res(spill_loads=40), res("chunk_kernel_h", spill_stores=30)], H200, max_spills=64)
    assert "shared memory" in v([res(shared=H200.smem_per_block + 1)], H200)
    assert "no block fits" in v([res(registers=255, blocks_per_sm=0)], H200)


def test_prune_by_compiling_for_sm90_in_a_child_process():
    """Two compiles for sm_90 on this CPU: a decode step and a fused forward."""
    spec = lx.KernelSpec("elu", True, True, "bfloat16", 16, 16, False, False)  # bf16 products, as on a GPU
    cfg = dataclasses.replace(C.gpu_heuristic(spec, 512, 132, arch=90), block_v=16, path="fused")
    ((why, summary),) = autotune.prune_by_compile(spec, "decode", [cfg], H200, workers=1)
    assert why is None and "decode_kernel_step" in summary
    ((r,),) = autotune.compile_resources(spec, "forward", [cfg], 90, workers=1)
    assert r.kernel == "chunk_fwd_kernel_o" and r.registers > 0 and r.blocks_per_sm >= 1 and not r.spills
    assert r.hgmma > 0  # bf16 products on Hopper's tensor cores
    assert autotune.resource_verdict([r], H200) is None
    tight = dataclasses.replace(H200, smem_per_block=r.shared - 1)
    assert "shared memory" in autotune.resource_verdict([r], tight)


# ---------------------------------------------------------------- correctness gates
# (in the interpreter, device "cpu", also on a GPU: these test the tuner's gates and bookkeeping with injected
# timers; `lintx autotune` on a GPU runs the same reference_check on the compiled kernels of every candidate)

@pytest.mark.parametrize("kernel", ["forward", "backward", "decode"])
def test_interpreter_runs_one_config_of_each_kernel_through_the_reference_check(kernel):
    cfg = C.Config(chunk=16, bwd_chunk=16, block_v=16, bwd_block_v=16, path="fused")
    assert 0 <= autotune.reference_check(kernel, SPEC, cfg, "cpu") <= 1


def test_reference_check_sees_a_dropped_eps(monkeypatch):
    """The gate's case has eps and scale away from their defaults: a forward that ignores eps (1e-6 always, which
    the default eps would hide) is rejected."""
    import lintx_triton.ops.custom as custom

    chunk_fwd = custom.chunk_fwd

    def ignores_eps(spec, cfg, q, k, v, S0, z0, fq, fk, scale, eps, *args, **kwargs):
        return chunk_fwd(spec, cfg, q, k, v, S0, z0, fq, fk, scale, 1e-6, *args, **kwargs)

    cfg = C.Config(chunk=16, bwd_chunk=16, block_v=16, bwd_block_v=16, path="chunked")
    spec = autotune.spec_of("elu", True, True, "float32", 16, 16)
    assert 0 <= autotune.reference_check("forward", spec, cfg, "cpu") <= 1
    monkeypatch.setattr(custom, "chunk_fwd", ignores_eps)
    with pytest.raises(testing.EquivalenceError, match="o: "):
        autotune.reference_check("forward", spec, cfg, "cpu")


def test_a_learnable_family_tunes_like_any_map():
    """``--map hedgehog:12``: the family built for the grid's D; the backward's reference check covers dW, db."""
    spec = autotune.spec_of("hedgehog:12", True, True, "float32", 8, 8)
    assert spec.feature_map == "hedgehog_lolcats_d8_m12" and spec.feature_dim == 12
    assert [t.spec for t in autotune.Grid(feature_maps=("hedgehog:12",), dtypes=("float32",), dims=((8, 8),),
                                          kernels=("backward",),
                                          shapes=((2, 64),)).tasks()] == [spec]
    cfg = C.Config(chunk=16, bwd_chunk=16, block_v=16, bwd_block_v=16, path="chunked")
    assert 0 <= autotune.reference_check("backward", spec, cfg, "cpu") <= 1


@pytest.mark.parametrize("where", ["reference", "at-shape"])
def test_a_fast_wrong_candidate_never_wins(tmp_path, monkeypatch, where):
    """chunk 32 is made wrong (at every length, or only at the tuned length T = 20) and timed fastest."""
    real = lx.linear_attention

    def wrong_at_chunk_32(q, k, v, **kw):
        o = real(q, k, v, **kw)
        bad = lx.config_for(SPEC, 1, 1, "cpu").chunk == 32 and kw.get("backend") != "torch"
        if bad and (where == "reference" or q.shape[1] == 20):
            o = o + 0.5 if not isinstance(o, tuple) else (o[0] + 0.5, o[1])
        return o

    monkeypatch.setattr(lx, "linear_attention", wrong_at_chunk_32)
    timer = ms_by_chunk({32: 1.0, 16: 2.0})
    (r,) = run_tune(tmp_path, [Task("forward", SPEC, 2, 20)], timer)
    best = r.best()
    assert json.loads(best["config"])["chunk"] == 16 and best["ms"] == 2.0
    rejected = [o for o in r.outcomes.values() if o["status"] == "rejected"]
    assert len(rejected) == 2 and all(("reference check" if where == "reference" else "PyTorch path") in o["reason"]
                                      for o in rejected)
    assert {c.chunk for c in timer.calls} == {16}  # a rejected candidate is never timed
    data = json.loads((tmp_path / "configs" / "nvidia-h200" / "forward.json").read_text())
    assert data["entries"][0]["config"]["chunk"] == 16 and data["entries"][0]["rejected"] == 2


# ---------------------------------------------------------------- the loop: files, resume, budget, failures

def test_tune_writes_valid_files_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    tasks = [Task("forward", SPEC, 2, 20), Task("decode", SPEC, 2, 1)]
    checks = []
    real_check = tuner_mod.reference_check
    monkeypatch.setattr(tuner_mod, "reference_check", lambda *a: checks.append(a[:1]) or real_check(*a))

    def interrupted(fn, cfg):
        interrupted.n += 1
        if interrupted.n == 3:
            raise KeyboardInterrupt
        fn()  # the timed function runs the kernel
        return 1.0 + cfg.chunk / 100
    interrupted.n = 0
    with pytest.raises(KeyboardInterrupt):
        run_tune(tmp_path, tasks, interrupted)
    assert not (tmp_path / "configs" / "nvidia-h200" / "forward.json").exists()
    journal = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "time" for r in journal) == 2 and len(checks) == 3

    timer = ms_by_chunk({16: 1.16, 32: 1.32})
    results = run_tune(tmp_path, tasks, timer)
    assert len(timer.calls) == 2  # the forward's last candidate and the decode step's only one
    assert len(checks) == 4  # and the decode step's reference check: none is redone
    assert all(r.complete for r in results)
    fwd = tmp_path / "configs" / "nvidia-h200" / "forward.json"
    data = TC.validate_config_file(json.loads(fwd.read_text()))
    (e,) = data["entries"]
    assert data["gpu"] == "NVIDIA H200" and data["compute_capability"] == "9.0"
    assert data["triton"] and data["torch"] == torch.__version__ and data["kernel"] == "forward"
    assert e["bucket"]["batch_heads"] == 2 and e["bucket"]["T"] == 20 and e["complete"]
    assert e["config"] == dict(chunk=16, block_v=16, num_warps=4, num_stages=1, path="chunked")
    assert e["ms"] == 1.16 and e["heuristic_ms"] == 1.32 and e["candidates"] == 3  # the H200 default: chunk 32
    dec = json.loads((tmp_path / "configs" / "nvidia-h200" / "decode.json").read_text())
    assert dec["entries"][0]["config"] == {"block_v": 16} and dec["entries"][0]["bucket"]["T"] == 1
    # one entry per line: a retuned bucket is a one-line diff
    lines = fwd.read_text().splitlines()
    assert lines[1] == ' "schema": 1,' and sum(x.lstrip().startswith('{"bucket"') for x in lines) == 1


def test_budget_stops_and_writes_the_best_so_far(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tuner_mod.time, "monotonic", lambda: clock[0])

    def slow(fn, cfg):
        clock[0] += 40.0
        return 3.0 - cfg.chunk / 32
    results = run_tune(tmp_path, [Task("forward", SPEC, 2, 20), Task("forward", SPEC, 4, 40)], slow,
                       budget_minutes=1.0)
    assert len(results) == 1 and not results[0].complete
    (e,) = json.loads((tmp_path / "configs" / "nvidia-h200" / "forward.json").read_text())["entries"]
    assert not e["complete"] and e["ms"] == 2.0 and e["bucket"]["T"] == 20


def test_failures_are_recorded_not_fatal(tmp_path):
    def timer(fn, cfg):
        if cfg.chunk == 16:
            raise RuntimeError("out of resources: shared memory, required: 300000")
        return 1.0
    (r,) = run_tune(tmp_path, [Task("forward", SPEC, 2, 20)], timer)
    failed = [o for o in r.outcomes.values() if o["status"] == "failed"]
    assert len(failed) == 1 and "out of resources" in failed[0]["reason"] and r.best()["ms"] == 1.0


def test_grid_tasks():
    g = autotune.Grid(dims=((64, 64),), shapes=((512, 1024), (32, 16384)), decode_batch_heads=(256,))
    tasks = g.tasks()
    assert [(t.kernel, t.batch_heads, t.T) for t in tasks] == [
        ("forward", 512, 1024), ("forward", 32, 16384), ("backward", 512, 1024), ("backward", 32, 16384),
        ("decode", 256, 1)]
    assert all(t.spec == BF16 for t in tasks)
    with pytest.raises(ValueError, match="kernels must be among"):
        autotune.Grid(kernels=("sideways",))


# ---------------------------------------------------------------- the file schema

def entry(T=1024, D=64, config=None, dtype="bfloat16", batch_heads=128, ms=0.5):
    spec = spec_of("elu", True, True, dtype, D, D)
    return dict(bucket=dataclasses.asdict(TC.Bucket.of(spec, batch_heads, T)), ms=ms,
                config=config or dict(chunk=64, block_v=64, num_warps=8, num_stages=2, path="fused"))


def header(kernel="forward", gpu="NVIDIA H200", cc="9.0", triton_version=None):
    import triton

    return dict(kernel=kernel, gpu=gpu, compute_capability=cc, triton=triton_version or triton.__version__,
                torch=torch.__version__, lintx_triton=lx.__version__, generator_version=1)


def test_family_fields():
    # one tuple of kernel families (lintx_triton.spec.FAMILIES) for the files, the tuner's grid and its --kernel
    assert tuple(TC.FAMILY_FIELDS) == FAMILIES == autotune.DEFAULT_GRID.kernels
    assert {f for fields in TC.FAMILY_FIELDS.values() for f in fields} <= {f.name for f in dataclasses.fields(C.Config)}


def test_schema_validation(tmp_path):
    good = write_config_file(tmp_path / "f.json", header(), [entry()])
    assert TC.validate_config_file(json.loads(json.dumps(good))) == good
    breakages = [
        (lambda d: d.update(schema=2), "schema"),
        (lambda d: d.pop("gpu"), "gpu"),
        (lambda d: d.update(compute_capability="sm_90"), "compute_capability"),
        (lambda d: d.update(kernel="sideways"), "kernel"),
        (lambda d: d["entries"][0]["config"].update(chunk=24), "chunk"),
        (lambda d: d["entries"][0]["config"].update(bwd_chunk=64), "exactly the fields"),
        (lambda d: d["entries"][0]["bucket"].pop("T"), "bucket"),
        (lambda d: d["entries"][0]["bucket"].update(dtype="float8"), "bad bucket"),
        (lambda d: d["entries"][0].update(ms=-1.0), "ms"),
        (lambda d: d.update(kernel="decode", entries=[dict(entry(T=16), config={"block_v": 32})]), "T = 1"),
    ]
    for breakage, match in breakages:
        d = json.loads(json.dumps(good))
        breakage(d)
        with pytest.raises(ValueError, match=match):
            TC.validate_config_file(d)


# ---------------------------------------------------------------- runtime lookup

def cfg_of(chunk):
    return dict(chunk=chunk, block_v=64, num_warps=8, num_stages=2, path="chunked")


@pytest.fixture
def dirs(tmp_path):
    """A shipped folder with an H200, an H100 (9.0) and an A100 (8.0); a user folder with an H200."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    for root, gpu, cc, chunk in ((shipped, "NVIDIA H200", "9.0", 64), (shipped, "NVIDIA H100 80GB HBM3", "9.0", 32),
                                 (shipped, "NVIDIA A100-SXM4-80GB", "8.0", 16), (user, "NVIDIA H200", "9.0", 128)):
        write_config_file(root / TC.gpu_key(gpu) / "forward.json", header(gpu=gpu, cc=cc),
                          [entry(config=cfg_of(chunk))])
    return shipped, user


def test_lookup_order(dirs, tmp_path):
    shipped, user = dirs
    find = lambda gpu, cc, user_dir=user: TC.lookup(BF16, 128, 1024, kernel="forward", gpu_name=gpu,  # noqa: E731
                                                    capability=cc, user_dir=user_dir, shipped_dir=shipped)
    m = find("NVIDIA H200", (9, 0))
    assert m.fields["chunk"] == 128 and m.source.startswith("forward: user config (") and "nvidia-h200" in m.source
    m = find("NVIDIA H200", (9, 0), user_dir=tmp_path / "nothing")
    assert m.fields["chunk"] == 64 and "shipped config for nvidia-h200" in m.source
    m = find("NVIDIA H100 NVL", (9, 0))  # no folder of its own: another GPU of compute capability 9.0
    assert m.fields["chunk"] == 32 and "compute capability 9.0" in m.source and "nvidia-h100-80gb-hbm3" in m.source
    assert find("NVIDIA L4", (8, 9)) is None  # the heuristic
    assert TC.lookup(BF16, 128, 1024, kernel="backward", gpu_name="NVIDIA H200", capability=(9, 0), user_dir=user,
                     shipped_dir=shipped) is None  # each kernel on its own


def test_nearest_bucket_wins(tmp_path):
    entries = [entry(T=1024, config=cfg_of(32)), entry(T=8192, config=cfg_of(64)),
               entry(T=1024, D=128, config=cfg_of(16)), entry(T=1024, batch_heads=1024, config=cfg_of(128))]
    write_config_file(tmp_path / "nvidia-h200" / "forward.json", header(), entries)

    def chunk(T, D=64, dtype="bfloat16", bh=128):
        spec = spec_of("elu", True, True, dtype, D, D)
        m = TC.lookup(spec, bh, T, kernel="forward", gpu_name="NVIDIA H200", capability=(9, 0),
                      user_dir=tmp_path / "none", shipped_dir=tmp_path)
        return m and m.fields["chunk"]

    assert chunk(2000) == 32 and chunk(6000) == 64 and chunk(100_000) == 64
    assert chunk(1024, bh=700) == 128 and chunk(1024, bh=200) == 32
    assert chunk(2000, D=128) == 16
    assert chunk(2000, D=48) == 32  # 48 pads to the 64-wide tiles
    assert chunk(2000, D=256) is None and chunk(2000, dtype="float16") is None  # no entry fits: the heuristic


def test_a_file_from_another_triton_version_is_used_with_one_warning(tmp_path):
    write_config_file(tmp_path / "nvidia-h200" / "forward.json", header(triton_version="0.0.1"), [entry()])
    kw = dict(kernel="forward", gpu_name="NVIDIA H200", capability=(9, 0), user_dir=tmp_path / "none",
              shipped_dir=tmp_path)
    with pytest.warns(UserWarning, match="tuned with Triton 0.0.1") as rec:
        assert TC.lookup(BF16, 128, 1024, **kw).fields["chunk"] == 64
        assert TC.lookup(BF16, 64, 2048, **kw).fields["chunk"] == 64
    assert sum("tuned with Triton" in str(w.message) for w in rec) == 1


def test_a_broken_file_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "nvidia-h200").mkdir()
    (tmp_path / "nvidia-h200" / "forward.json").write_text('{"schema": 1, "kernel": "forward"')
    with pytest.warns(UserWarning, match="ignoring the config file"):
        assert TC.lookup(BF16, 128, 1024, kernel="forward", gpu_name="NVIDIA H200", capability=(9, 0),
                         user_dir=tmp_path / "none", shipped_dir=tmp_path) is None


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """config_for as on a CUDA device (name and capability settable), with no tuned files but the test's."""
    gpu = {"name": "NVIDIA H200", "cc": (9, 0)}
    monkeypatch.setattr(C, "interpreting", lambda: False)
    monkeypatch.setattr(C, "_device_identity", lambda index: (gpu["name"], gpu["cc"]))
    monkeypatch.setattr(C, "_sm_count", lambda index: 132)
    monkeypatch.setattr(C, "_arch", lambda index: 10 * gpu["cc"][0] + gpu["cc"][1])
    monkeypatch.setattr(TC, "SHIPPED_CONFIG_DIR", tmp_path / "shipped")
    monkeypatch.setenv(TC.ENV_CONFIG_DIR, str(tmp_path / "user"))
    monkeypatch.delenv(C.ENV_ONLINE_TUNE, raising=False)
    return gpu


def test_config_for_heuristic_on_an_unknown_gpu_then_shipped_then_user(fake_gpu, tmp_path, monkeypatch):
    cuda = torch.device("cuda", 0)
    fake_gpu.update(name="Some Future GPU", cc=(12, 3))
    cfg = lx.config_for(BF16, 128, 1024, cuda)
    assert cfg == dataclasses.replace(C.gpu_heuristic(BF16, 128, 132, arch=123), source="heuristic")
    fake_gpu.update(name="NVIDIA H200", cc=(9, 0))
    write_config_file(tmp_path / "shipped" / "nvidia-h200" / "forward.json", header(), [entry(config=cfg_of(32))])
    write_config_file(tmp_path / "shipped" / "nvidia-h200" / "backward.json", header("backward"),
                      [entry(config=dict(bwd_chunk=32, bwd_block_v=16, bwd_num_warps=4, bwd_num_stages=1))])
    C.clear_cache()
    cfg = lx.config_for(BF16, 128, 1024, cuda)
    assert (cfg.chunk, cfg.path, cfg.bwd_chunk, cfg.bwd_block_v) == (32, "chunked", 32, 16)
    assert cfg.source.startswith("forward: shipped config for nvidia-h200") and "; backward: shipped" in cfg.source
    with lx.config.override(chunk=16):
        assert lx.config_for(BF16, 128, 1024, cuda).chunk == 16
    # the user directory is read at the first call after clear_cache, not at import
    write_config_file(tmp_path / "elsewhere" / "nvidia-h200" / "forward.json", header(), [entry(config=cfg_of(128))])
    monkeypatch.setenv(TC.ENV_CONFIG_DIR, str(tmp_path / "elsewhere"))
    assert lx.config_for(BF16, 128, 1024, cuda).chunk == 32  # decided and cached
    C.clear_cache()
    assert lx.config_for(BF16, 128, 1024, cuda).chunk == 128


def test_decode_entries_serve_one_token_calls(fake_gpu, tmp_path):
    write_config_file(tmp_path / "shipped" / "nvidia-h200" / "decode.json", header("decode"),
                      [entry(T=1, config={"block_v": 16})])
    cuda = torch.device("cuda", 0)
    one = lx.config_for(BF16, 128, 1, cuda)
    assert one.block_v == 16 and "decode: shipped" in one.source
    assert lx.config_for(BF16, 128, 1024, cuda).block_v == C.gpu_heuristic(BF16, 128, 132).block_v


def test_online_tuning_only_when_asked(fake_gpu, tmp_path, monkeypatch):
    import lintx_triton.autotune.online

    asked = []

    def fake_tune_call(spec, bh, T, device, kernels, user_dir):
        asked.append((bh, T, tuple(kernels)))
        # the tuner's own calls, from a thread of its own as the real one runs, neither tune nor are cached
        n = len(asked)
        th = threading.Thread(target=lambda: lx.config_for(BF16, 64, 64, cuda))
        th.start()
        th.join()
        assert len(asked) == n
        write_config_file(user_dir / "nvidia-h200" / "forward.json", header(), [entry(T=T, config=cfg_of(16))])

    monkeypatch.setattr(lintx_triton.autotune.online, "tune_call", fake_tune_call)
    cuda = torch.device("cuda", 0)
    assert lx.config_for(BF16, 128, 1024, cuda).source == "heuristic" and not asked
    monkeypatch.setenv(C.ENV_ONLINE_TUNE, "1")
    C.clear_cache()
    cfg = lx.config_for(BF16, 128, 1024, cuda)
    assert asked == [(128, 1024, ("forward", "backward"))] and cfg.chunk == 16 and "user config" in cfg.source
    lx.config_for(BF16, 128, 1500, cuda)  # within a factor of 2 of a forward bucket: only the backward is missing
    assert asked[-1] == (128, 1500, ("backward",))
    lx.config_for(BF16, 64, 64, cuda)  # the tuner's call above was not cached: this one tunes
    lx.config_for(BF16, 128, 1, cuda)  # a decode step tunes the decode step only
    assert asked[2:] == [(64, 64, ("forward", "backward")), (128, 1, ("decode",))]


# ---------------------------------------------------------------- command line

def test_cli(tmp_path):
    from lintx_triton.autotune.cli import autotune as cmd
    from lintx_triton.cli import main

    r = CliRunner().invoke(main, ["autotune", "--help"])
    assert r.exit_code == 0 and "--budget-minutes" in r.output and "lintx autotune" in r.output
    r = CliRunner().invoke(cmd, ["--dims", "64", "--shape", "512x1024", "--kernel", "forward"])
    assert r.exit_code == 2 and "needs a CUDA GPU" in r.output
    r = CliRunner().invoke(cmd, ["--dims", "64x", "--dry-run"])
    assert r.exit_code == 2 and "D or DxDV" in r.output
    r = CliRunner().invoke(main, ["autotune", "--dry-run", "--arch", "90", "--no-prune-compile", "--dims", "64",
                                  "--shape", "512x1024", "--decode-bh", "64", "--json"])
    assert r.exit_code == 0, r.output
    tasks = json.loads(r.stdout)["tasks"]
    assert [(t["kernel"], t["T"]) for t in tasks] == [("forward", 1024), ("backward", 1024), ("decode", 1)]
    assert all(t["candidates"] > 1 and t["best"] is None for t in tasks)
    out = subprocess.run([sys.executable, "-m", "lintx_triton.autotune", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "python -m lintx_triton.autotune" in out.stdout
    order = C.search_order()
    assert order[1].startswith("user configs") and order[2].startswith("shipped") and order[-1].startswith("heuristic")
