"""See what a GPU would run, without a GPU.

Triton compiles for a CUDA target on a CPU-only machine; the ``cuobjdump`` and ``nvdisasm`` shipped
inside the triton wheel read the cubin. For each kernel launch a call makes under a config, this reports
registers per thread, stack frame, spill instructions (``LDL``/``STL``), shared memory, the matrix
instructions the products became (``HGMMA`` on sm_90, ``HMMA`` otherwise), and an occupancy estimate.

The launches are the launchers' own (:mod:`lintx_triton.ops.launch`), recorded on meta tensors: the same
plans (grid, launch-time constants, warps, stages) and the same argument dtypes as a real call, so what is
compiled here is what runs.

    from lintx_triton.compile_report import family_launches, kernel_resources
    for L in family_launches("forward", spec, config):
        print(L.stage, kernel_resources(spec, L, arch=90))
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

from .codegen import load
from .config import Config, gpu_heuristic, path_of
from .ops import launch as ops
from .spec import DTYPES, FAMILIES, KernelSpec

__all__ = ["KernelResources", "kernel_resources", "family_launches", "variant_launches", "variant_report",
           "default_report", "STAGES", "TARGETS"]

# Per-multiprocessor limits used for the occupancy estimate.
TARGETS = {
    80: dict(regs=65536, smem=164 * 1024, warps=64, blocks=32),
    90: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32),
    100: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32),
}
# The launches a report shows, in its order (the launchers' Launch.stage labels). The backward's recomputed
# forward states ("bwd recomputed chunk sums", "bwd recomputed scan") are the forward's kernels again, under
# the backward's BT, BV and warps: not shown, as they never were.
STAGES = ("fwd chunk sums", "fwd scan", "fwd output (chunked)", "fwd output (fused)", "bwd g", "bwd chunk sums",
          "bwd scan", "bwd dq", "bwd dk dv", "decode step")
# Triton's signature names of the tensors the launchers pass
_PTR = {**{d.torch: d.short for d in DTYPES.values()}, torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class KernelResources:
    kernel: str
    arch: int
    num_warps: int
    registers: int
    stack: int
    spill_loads: int
    spill_stores: int
    shared: int
    hgmma: int
    hmma: int
    blocks_per_sm: int
    warps_per_sm: int

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.spill_loads > 0 or self.spill_stores > 0

    def as_dict(self) -> dict:
        return asdict(self)


def family_launches(family: str, spec: KernelSpec, cfg: Config, *, heads: int = 16, batch: int = 1,
                    T: int | None = None) -> list[ops.Launch]:
    """Every launch one call of ``family`` ("forward", "backward", "decode", or "hybrid": the windowed hybrid's
    forward and backward) makes under ``cfg``, as the
    launchers plan it: they run on meta tensors (``heads`` query and kv heads, ``batch`` rows of ``T`` tokens,
    several chunks by default) with a recording runner, so nothing is allocated or launched."""
    if family not in FAMILIES + ("hybrid",):
        raise ValueError(f"family must be one of {FAMILIES + ('hybrid',)}, got {family!r}")
    dt, f32 = DTYPES[spec.dtype].torch, torch.float32
    B, H, D, DV, M = batch, heads, spec.head_dim, spec.value_dim, spec.feature_dim
    T = T if T is not None else 4 * max(cfg.chunk, cfg.bwd_chunk)
    meta = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    # the map's parameters, shared by the heads (per-head ones change a stride, not the kernels); a learnable
    # map's backward also sums their gradients (HAS_DFM)
    fm = spec.fmap.kernel_params("query", "meta")
    if fm is not None:
        fm = meta(1, *fm.shape[1:], dtype=f32)
    S0, z0 = (meta(B, H, M, DV, dtype=f32), meta(B, H, M, dtype=f32)) if spec.has_initial_state else (None, None)
    q, k, v = meta(B, T, H, D), meta(B, T, H, D), meta(B, T, H, DV)
    with ops.record() as (run, launches):
        if family == "forward":
            ops.chunk_fwd(spec, cfg, q, k, v, S0, z0, fm, fm, 1.0, 1e-6, run=run)
        elif family == "backward":
            den = meta(B, H, T, dtype=f32) if spec.normalize else meta(0, dtype=f32)
            ops.chunk_bwd(spec, cfg, meta(B, T, H, DV), None, None, q, k, v, meta(B, T, H, DV), den, S0, z0,
                          fm, fm, 1.0, map_grads=spec.fmap.learnable, run=run)
        elif family == "hybrid":  # LoLCATs' hybrid, window = 4 chunks (sliding: its intra-chunk linear part too)
            L, m, idx = meta(B, H, T, dtype=f32), meta(B, H, T, dtype=f32), meta(B, H, T, dtype=torch.int32)
            win = dict(window=4 * cfg.chunk, sliding=True, affine=False, scale=1.0, qk_scale=D ** -0.5)
            mix = meta(H, dtype=f32)
            ops.hybrid_fwd(spec, cfg, q, k, v, mix, S0, z0, fm, fm, **win, run=run)
            ops.hybrid_bwd(spec, cfg, meta(B, T, H, DV), q, k, v, meta(B, T, H, DV), L, m, idx, mix, S0, z0, fm, fm,
                           **win, map_grads=spec.fmap.learnable, run=run)
            C = win["window"]  # the sliding window's ring
            ops.hybrid_decode(spec, cfg, q[:, 0], k[:, 0], v[:, 0], mix, meta(B, H, M, DV, dtype=f32),
                              meta(B, H, M, dtype=f32), meta(B, H, C, D), meta(B, H, C, DV),
                              meta(B, dtype=torch.int64), fm, fm, **win, run=run)
        else:
            S, z = meta(B, H, M, DV, dtype=f32), meta(B, H, M, dtype=f32)
            ops.decode_step(spec, cfg, q[:, 0], k[:, 0], v[:, 0], S, z, S, z, fm, fm, 1.0, 1e-6, run=run)
    return launches


def variant_launches(spec: KernelSpec, cfg: Config, **shape) -> list[ops.Launch]:
    """The launches of :data:`STAGES` for ``spec``: the forward on both paths (fused only when causal), the
    backward and the decode step, each as ``cfg`` plans it."""
    found = {}
    for path in ("chunked", "fused"):
        c = dataclasses.replace(cfg, path=path)
        if path_of(spec, c) == path:
            found.update((L.stage, L) for L in family_launches("forward", spec, c, **shape))
    for family in ("backward", "decode"):
        found.update((L.stage, L) for L in family_launches(family, spec, cfg, **shape))
    return [found[s] for s in STAGES if s in found]


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in this triton wheel ({path})")
    return path


def compile_for_target(spec: KernelSpec, L: ops.Launch, *, arch: int = 90):
    """``triton.compile`` of one launch's kernel for ``sm_<arch>``, with the signature its arguments give; needs no
    GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(load(spec, interpret=False), L.kernel)
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name in L.plan.constexprs:
            sig[name], consts[name] = "constexpr", L.plan.constexprs[name]
            continue
        val = L.args[name]
        if isinstance(val, torch.Tensor):
            sig[name] = "*" + _PTR[val.dtype]
        elif isinstance(val, float):
            sig[name] = "fp32"
        elif isinstance(val, int):
            sig[name] = "i32"
        else:
            raise TypeError(f"{L.kernel}: argument {name} = {val!r} has no Triton signature here")
    options = {"num_warps": L.plan.num_warps}
    if L.plan.num_stages is not None:
        options["num_stages"] = L.plan.num_stages
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=options)


def kernel_resources(spec: KernelSpec, L: ops.Launch, *, arch: int = 90) -> KernelResources:
    """Compile the kernel of launch ``L`` as it launches and read its resources from the cubin."""
    compiled = compile_for_target(spec, L, arch=arch)
    w = L.plan.num_warps
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    regs, stack = field("REG"), field("STACK")
    shared = max(field("SHARED"), int(getattr(compiled.metadata, "shared", 0) or 0))
    lim = TARGETS.get(arch, TARGETS[90])
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    blocks = min(lim["blocks"], lim["warps"] // w, lim["regs"] // max(regs_per_warp * w, 1),
                 lim["smem"] // shared if shared else lim["blocks"])
    return KernelResources(
        kernel=L.kernel,
        arch=arch,
        num_warps=w,
        registers=regs,
        stack=stack,
        spill_loads=len(re.findall(r"\bLDL\b", sass)),
        spill_stores=len(re.findall(r"\bSTL\b", sass)),
        shared=shared,
        hgmma=len(re.findall(r"\bHGMMA\.", sass)),
        hmma=len(re.findall(r"\bHMMA\.", sass)),
        blocks_per_sm=blocks,
        warps_per_sm=blocks * w,
    )


def variant_report(spec: KernelSpec, cfg: Config, arch: int = 90) -> list[dict]:
    """Resources of every launch of :data:`STAGES` for ``spec`` under ``cfg``: one row each, with the stage
    and the chunk and value block of its pass."""
    rows = []
    for L in variant_launches(spec, cfg):
        bwd = L.stage.startswith("bwd")
        r = kernel_resources(spec, L, arch=arch)
        rows.append(dict(r.as_dict(), stage=L.stage, spills=r.spills,
                         BT=L.plan.constexprs.get("BT", cfg.bwd_chunk if bwd else cfg.chunk),
                         BV=L.plan.constexprs.get("BV", cfg.bwd_block_v if bwd else cfg.block_v)))
    return rows


def default_report(dtype: str = "bfloat16", dims=(64, 128), arch: int = 90, feature_map: str = "elu",
                   sm_count: int = 132) -> list[dict]:
    """Resources of every stage of the causal normalized variant under the default GPU config."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    rows = []
    for d in dims:
        spec = KernelSpec(feature_map, True, True, dtype, d, d, False, dtype == "float32")
        cfg = gpu_heuristic(spec, batch_heads=4 * sm_count, sm_count=sm_count, arch=arch)
        rows += [dict(r, dtype=dtype, dim=d, feature_map=feature_map) for r in variant_report(spec, cfg, arch)]
    return rows


def main(argv=None) -> int:
    """``python -m lintx_triton.compile_report``: the default-config report as JSON lines."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--feature-map", default="elu")
    args = p.parse_args(argv)
    for row in default_report(args.dtype, args.dims, args.arch, args.feature_map):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    # Compiling for a GPU target does not mix with kernels decorated for the interpreter.
    os.environ["TRITON_INTERPRET"] = "0"
    raise SystemExit(main())
