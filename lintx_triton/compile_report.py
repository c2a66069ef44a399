"""See what a GPU would run, without a GPU.

Triton compiles for a CUDA target on a CPU-only machine; the ``cuobjdump`` and
``nvdisasm`` shipped inside the triton wheel read the cubin. For one generated
kernel and a launch config this reports registers per thread, stack frame,
spill instructions (``LDL``/``STL``), shared memory, the matrix instructions the
products became (``HGMMA`` on sm_90, ``HMMA`` otherwise), and an occupancy
estimate.

    from lintx_triton.compile_report import kernel_resources
    r = kernel_resources(spec, "chunk_fwd_kernel_o", config, arch=90, FUSED=True)
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from .codegen import load
from .config import Config, gpu_heuristic
from .ops.launch import decode_warps
from .spec import DTYPES, KernelSpec

__all__ = ["KernelResources", "kernel_resources", "launch_constexprs", "default_report", "KERNELS", "TARGETS", "STAGES"]

# Per-multiprocessor limits used for the occupancy estimate.
TARGETS = {
    80: dict(regs=65536, smem=164 * 1024, warps=64, blocks=32),
    90: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32),
    100: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32),
}
KERNELS = ("chunk_kernel_h", "chunk_scan_kernel", "chunk_fwd_kernel_o", "bwd_kernel_g", "chunk_bwd_kernel_dq",
           "chunk_bwd_kernel_dkv", "decode_kernel_step")
_BWD_ONLY = ("bwd_kernel_g", "chunk_bwd_kernel_dq", "chunk_bwd_kernel_dkv")
# pointer arguments holding the inputs' dtype; every other pointer is fp32
_INPUT_PTRS = {"q", "k", "v", "o", "do", "dq", "dk", "dv", "x", "y"}


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


def launch_constexprs(spec: KernelSpec, kernel: str, cfg: Config, *, backward: bool = False, heads: int = 16,
                      **flags) -> dict:
    """The launch-time constexprs the launchers pass to ``kernel`` under ``cfg`` (flags override)."""
    bwd = backward or kernel in _BWD_ONLY
    BT = cfg.bwd_chunk if bwd else cfg.chunk
    BV = cfg.bwd_block_v if bwd else cfg.block_v
    heads = dict(H=heads, HKV=heads)
    base = {
        "chunk_kernel_h": dict(**heads, BT=BT, BV=BV, BACKWARD=backward, IS_VARLEN=False),
        "chunk_scan_kernel": dict(HKV=heads["HKV"], BMS=min(spec.block_m, 64), BV=BV, HAS_INIT=False,
                                  REVERSE=backward, IS_VARLEN=False),
        "chunk_fwd_kernel_o": dict(**heads, BT=BT, BV=BV, FUSED=cfg.path == "fused" and spec.causal, IS_VARLEN=False),
        "bwd_kernel_g": dict(H=heads["H"], BT=BT, IS_VARLEN=False),
        "chunk_bwd_kernel_dq": dict(**heads, BT=BT, BV=BV, IS_VARLEN=False),
        "chunk_bwd_kernel_dkv": dict(**heads, BT=BT, BV=BV, IS_VARLEN=False),
        "decode_kernel_step": dict(**heads, BV=min(cfg.block_v, spec.block_dv), HAS_STATE=True),
    }[kernel]
    base.update(flags)
    return base


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in this triton wheel ({path})")
    return path


def compile_for_target(spec: KernelSpec, kernel: str, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                       num_stages: int = 2):
    """``triton.compile`` of one generated kernel for ``sm_<arch>``; needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    fn = getattr(load(spec, interpret=False), kernel)
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name], consts[name] = "constexpr", constexprs[name]
        elif name in ("scale", "eps"):
            sig[name] = "fp32"
        elif name in ("T", "NT"):
            sig[name] = "i32"
        elif name in ("cu", "cmap", "coffs"):
            sig[name] = "*i32"
        else:
            sig[name] = "*" + (DTYPES[spec.dtype].short if name in _INPUT_PTRS else "fp32")
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in consts]
    if missing:
        raise ValueError(f"missing constexprs {missing} for {kernel}")
    return triton.compile(
        ASTSource(fn, sig, consts),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def kernel_resources(spec: KernelSpec, kernel: str, cfg: Config, *, arch: int = 90, backward: bool = False,
                     **flags) -> KernelResources:
    """Compile ``kernel`` of ``spec`` as ``cfg`` launches it and read its resources from the cubin."""
    is_bwd = backward or kernel in _BWD_ONLY
    w = decode_warps(spec) if kernel == "decode_kernel_step" else cfg.bwd_num_warps if is_bwd else cfg.num_warps
    compiled = compile_for_target(
        spec, kernel, launch_constexprs(spec, kernel, cfg, backward=backward, **flags),
        arch=arch, num_warps=w, num_stages=cfg.bwd_num_stages if is_bwd else cfg.num_stages,
    )
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
        kernel=kernel,
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


# Every kernel launch of a forward and a backward: (label, kernel, backward, constexpr overrides).
STAGES = (
    ("fwd chunk sums", "chunk_kernel_h", False, {}),
    ("fwd scan", "chunk_scan_kernel", False, {}),
    ("fwd output (chunked)", "chunk_fwd_kernel_o", False, {"FUSED": False}),
    ("fwd output (fused)", "chunk_fwd_kernel_o", False, {"FUSED": True}),
    ("bwd g", "bwd_kernel_g", True, {}),
    ("bwd chunk sums", "chunk_kernel_h", True, {}),
    ("bwd scan", "chunk_scan_kernel", True, {}),
    ("bwd dq", "chunk_bwd_kernel_dq", True, {}),
    ("bwd dk dv", "chunk_bwd_kernel_dkv", True, {}),
    ("decode step", "decode_kernel_step", False, {}),
)


def default_report(dtype: str = "bfloat16", dims=(64, 128), arch: int = 90, feature_map: str = "elu",
                   sm_count: int = 132) -> list[dict]:
    """Resources of every stage of the causal normalized variant under the default GPU config."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    rows = []
    for d in dims:
        spec = KernelSpec(feature_map, True, True, dtype, d, d, False, dtype == "float32")
        cfg = gpu_heuristic(spec, batch_heads=4 * sm_count, sm_count=sm_count, arch=arch)
        for label, kernel, backward, flags in STAGES:
            r = kernel_resources(spec, kernel, cfg, arch=arch, backward=backward, **flags)
            rows.append(dict(r.as_dict(), stage=label, dtype=dtype, dim=d, feature_map=feature_map,
                             BT=cfg.bwd_chunk if backward else cfg.chunk,
                             BV=cfg.bwd_block_v if backward else cfg.block_v, spills=r.spills))
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
