"""Context parallelism: lx.distributed.linear_attention on 1-4 gloo ranks against one process.

Each test forks one world of gloo ranks (``_worker``), which runs all its checks in one start-up.
A check runs the sharded call forward and backward; rank 0 of the group gathers the shards and
compares the output, the final state and every gradient with the float64 reference under the same
bounds as a single-device call (lintx_triton.testing), and with a single-process call directly. A
failed comparison is recorded, not raised, so the ranks stay in step; a crash is reported whole.
"""

from __future__ import annotations

import json
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lintx_triton as lx
from lintx_triton.testing import call_kwargs, check_forward, check_grads, check_state, grad_bound, make_inputs, \
    reference_grads

# The ranks are forked gloo processes on CPU tensors (CUDA cannot be used in a child forked after it started), so
# the Triton check here runs in the interpreter also on a GPU (no kernel_device).

# cp vs one process, every element: |cp - single| <= SINGLE_TOL * max|single| (fp32 sums in another order)
SINGLE_TOL = 1e-5


def _case(B, H, D, DV, feature_map, normalize, initial_state, scale, seed, return_state=True, HKV=None, eps=1e-6):
    return dict(B=B, H=H, HKV=HKV or H, D=D, DV=DV, dtype="float32", feature_map=feature_map, causal=True,
                normalize=normalize, initial_state=initial_state, scale=scale, seed=seed, return_state=return_state,
                eps=eps)


def _cp_check(c, shards, backend, group=None, other_state=False, check=True):
    """One sharded call against the reference on rank 0 of ``group``; -> worst err / bound ratio there."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    assert len(shards) == W
    c = dict(c, T=sum(shards))
    q, k, v, state = make_inputs(c)
    B, T, H, _ = q.shape
    g = torch.Generator().manual_seed(c["seed"] + 1)
    do = torch.randn(B, T, H, c["DV"], generator=g)
    M, HKV = c["D"], k.shape[2]  # elu, relu, identity; the state is per kv head
    dS = torch.randn(B, HKV, M, c["DV"], generator=g) if c["return_state"] else torch.zeros(B, HKV, M, c["DV"])
    dz = torch.randn(B, HKV, M, generator=g) if c["return_state"] else torch.zeros(B, HKV, M)
    kw = dict(call_kwargs(c), feature_map=c["feature_map"], backend=backend)

    sl = slice(sum(shards[:rank]), sum(shards[: rank + 1]))
    mine = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
    st = None
    if state is not None:
        # ranks > 0 may pass anything: the initial state is read on rank 0 only
        st = tuple((x if rank == 0 or not other_state else 3 * x).clone().requires_grad_() for x in state)
    out = lx.distributed.linear_attention(*mine, group=group, initial_state=st, return_state=c["return_state"],
                                          check=check, **kw)
    o, (S, z) = out if c["return_state"] else (out, (None, None))
    loss = (o * do[:, sl]).sum()
    if c["return_state"]:
        # the final-state gradient arrives split over the ranks: their sum is the single-device one
        loss = loss + (rank + 1) / (W * (W + 1) / 2) * ((S * dS).sum() + (z * dz).sum())
    leaves = mine + (list(st) if st else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [g if g is not None or i >= 3 else torch.zeros_like(x) for i, (g, x) in enumerate(zip(grads, leaves))]
    if rank > 0 and st is not None:
        assert grads[3] is None and grads[4] is None, "rank > 0 got a gradient for its ignored initial_state"
    pieces = [None] * W
    dist.all_gather_object(pieces, [o.detach()] + [x.detach() for x in grads[:3]], group=group)
    if rank != 0:
        return None

    got = [torch.cat([p[i] for p in pieces], 1) for i in range(4)] + [x.detach() for x in grads[3:]]
    o_cp = got.pop(0)
    worst = check_forward(c, o_cp, q, k, v, state)
    if c["return_state"]:
        worst = max(worst, check_state(c, (S.detach(), z.detach()), q, k, v, state))
    full = [x.clone().requires_grad_() for x in [q, k, v] + (list(state) if state else [])]
    want, bounds = reference_grads(c, full, do, dS, dz), grad_bound(c, full, do, dS, dz)
    worst = max(worst, check_grads(c, got, want, bounds, ["q", "k", "v", "S_0", "z_0"]))

    # and the single-process call itself, forward and backward
    o1, (S1, z1) = lx.linear_attention(*full[:3], initial_state=tuple(full[3:]) or None, return_state=True, **kw)
    g1 = torch.autograd.grad((o1 * do).sum() + (S1 * dS).sum() + (z1 * dz).sum(), full, allow_unused=True)
    pairs = [("o", o_cp, o1)] + list(zip(["dq", "dk", "dv", "dS_0", "dz_0"], got, g1))
    if c["return_state"]:
        pairs += [("S_T", S, S1), ("z_T", z, z1)]
    for name, a, b in pairs:
        b = b if b is not None else torch.zeros_like(a)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=SINGLE_TOL * (b.abs().max().item() + 1e-30),
                                   msg=lambda m, name=name: f"{name} vs one process: {m}")
    return worst


def _expect_error(fn, exc, match):
    try:
        fn()
    except exc as e:
        assert match in str(e), f"{exc.__name__} without {match!r}: {e}"
    else:
        raise AssertionError(f"no {exc.__name__} ({match!r})")


def _errors(rank, world):
    """Bad input on one rank makes every rank raise; the group is still usable afterwards."""
    if world == 1:  # unsupported arguments fail on a group of one too
        _expect_error(lambda: lx.distributed.linear_attention(*[torch.randn(1, 2, 1, 4)] * 3, causal=False),
                      ValueError, "causal=True only")
        return
    x = lambda T, H=2, D=4, dtype=torch.float32: torch.randn(1, T, H, D, dtype=dtype)  # noqa: E731
    cp = lx.distributed.linear_attention
    # a different H on the last rank: the state shapes disagree
    H = 3 if rank == world - 1 else 2
    _expect_error(lambda: cp(x(2, H), x(2, H), x(2, H), backend="torch"), ValueError, "same B, H")
    # a bad dtype on the last rank: its own TypeError there, a ValueError naming it elsewhere
    dt = torch.float64 if rank == world - 1 else torch.float32
    if rank == world - 1:
        _expect_error(lambda: cp(x(2), x(2), x(2, dtype=dt), backend="torch"), TypeError, "float32, float16")
    else:
        _expect_error(lambda: cp(x(2), x(2), x(2), backend="torch"), ValueError, f"rank(s) [{world - 1}]")
    _expect_error(lambda: cp(x(2), x(2), x(2), causal=False, backend="torch"), ValueError, "causal=True only")
    # gradients on some ranks only: the backward's gather would wait for the others forever
    qg = x(2).requires_grad_(rank == 0)
    _expect_error(lambda: cp(qg, x(2), x(2), backend="torch"), ValueError, "require grad on rank(s) [0] only")
    _expect_error(lambda: cp(x(2), x(2), x(2), cu_seqlens=torch.tensor([0, 2]), backend="torch"), ValueError,
                  "cu_seqlens")


def _groups_of_one(rank, world):
    groups = [dist.new_group([r]) for r in range(world)]
    return _cp_check(_case(2, 2, 3, 4, "elu", True, True, 1.0, seed=40 + rank), [5], "torch", group=groups[rank])


def _mesh_dp_cp(rank, world):
    """A 2 x 2 ("dp", "cp") mesh: two replicas with their own data, each sequence split over its cp pair."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    c = _case(1, 2, 4, 3, "elu", True, True, 1.0, seed=50 + mesh.get_local_rank("dp"))
    return _cp_check(c, [4, 3], "torch", group=mesh["cp"].get_group())


def _checks(world):
    W = world
    pick = lambda xs, one: xs[:W] if W > 1 else one  # noqa: E731
    checks = {
        "torch-T1-each-h0": lambda r, w: _cp_check(
            _case(2, 3, 4, 5, "elu", True, True, 0.5, seed=1, eps=0.5), [1] * W, "torch", other_state=True),
        "torch-uneven-relu-raw-nostate": lambda r, w: _cp_check(
            _case(1, 2, 3, 4, "relu", False, False, 1.0, seed=2, return_state=False), pick([3, 0, 5, 2], [3]),
            "torch"),
        "torch-grouped-heads-h0": lambda r, w: _cp_check(
            _case(1, 4, 3, 2, "elu", True, True, 1.0, seed=5, HKV=2, eps=1e-3), pick([2, 5, 0, 3], [6]), "torch"),
        "torch-chunks-identity-raw-h0": lambda r, w: _cp_check(
            _case(1, 1, 5, 3, "identity", False, True, 0.125, seed=3), pick([0, 70, 1, 65], [135]), "torch"),
    }
    if W == 3:
        # the interpreter's first call costs ~2 s of set-up per process: one world is enough
        checks["triton-elu-h0"] = lambda r, w: _cp_check(_case(1, 2, 4, 3, "elu", True, True, 0.5, seed=4,
                                                               eps=0.5), [3, 1, 2], "triton", check=False)
    if W <= 2:
        checks["errors"] = _errors
    if W == 2:
        checks["groups-of-one"] = _groups_of_one
    if W == 4:
        checks["mesh-dp2-cp2"] = _mesh_dp_cp
    return checks


def _worker(rank: int, world: int, store: str, out: str):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    report = {"failures": [], "worst": {}, "seconds": {}, "crash": None}
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        for name, check in _checks(world).items():
            t0 = time.perf_counter()
            try:
                worst = check(rank, world)
                if worst is not None:
                    report["worst"][name] = worst
            except AssertionError as e:  # EquivalenceError included; anything else ends the worker
                report["failures"].append(f"rank {rank}, {name}: {e}")
            report["seconds"][name] = round(time.perf_counter() - t0, 3)
        dist.destroy_process_group()
    except BaseException:
        report["crash"] = f"rank {rank}:\n{traceback.format_exc()}"
    with open(out, "w") as f:
        json.dump(report, f)


def _warm_up_triton():
    """Generate and load the interpreter's kernels once here, so that no forked rank pays for it."""
    q = torch.randn(1, 2, 1, 4, requires_grad=True)
    state = (torch.zeros(1, 1, 4, 3, requires_grad=True), torch.zeros(1, 1, 4, requires_grad=True))
    for st in (None, state):
        o, (S, z) = lx.linear_attention(q, q, q[..., :3], initial_state=st, return_state=True, backend="triton")
        (o.sum() + S.sum() + z.sum()).backward()


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"world{w}")
def test_context_parallel_matches_one_process(world, tmp_path):
    if world == 3:
        _warm_up_triton()
    # fork, not spawn: four spawned ranks importing torch took 8 s each on two busy cores; forked ones
    # start with torch, lintx_triton and TRITON_INTERPRET=1 (tests/conftest.py) already there
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "store"), str(tmp_path / f"rank{r}.json")))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    files = [tmp_path / f"rank{r}.json" for r in range(world)]
    reports = [json.loads(f.read_text()) if f.exists() else {"crash": f"rank {r}: no report (killed?)"}
               for r, f in enumerate(files)]
    crashes = [rep["crash"] for rep in reports if rep["crash"]]
    assert not crashes, "\n".join(crashes)
    failures = [f for rep in reports for f in rep["failures"]]
    assert not failures, "\n".join(failures)
    assert set(reports[0]["worst"]) == set(_checks(world)) - {"errors"}


def test_needs_an_initialized_group():
    assert not dist.is_initialized()
    x = torch.randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match="init_process_group"):
        lx.distributed.linear_attention(x, x, x, backend="torch")
