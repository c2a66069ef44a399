"""What the tuner tries: candidate configs per kernel, the device's limits, a cheap pre-compile filter.

A candidate is a :class:`lintx_triton.Config` that differs from the heuristic default (the *base*) only
in the fields its kernel family decides (``lintx_triton.tuned_configs.FAMILY_FIELDS``): the forward's chunk, value
block, warps, stages and path; the backward's chunk, value block and warps; the decode step's value
block. The base itself is always a candidate: it is the baseline every speedup is measured against.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from lintx_triton.config import Config, path_of, value_blocks
from lintx_triton.spec import FAMILIES, KernelSpec
from lintx_triton.tuned_configs import FAMILY_FIELDS

__all__ = ["SPACES", "DeviceLimits", "candidates", "estimate_fits", "kernel_fields"]

# Values tried per field. "default" is sized for one ~10-minute run of the default grid on one GPU;
# "full" is the whole space (hours); "online" is what LINTX_TRITON_ONLINE_TUNE=1 tries on a call.
SPACES = {
    "default": {
        "forward": dict(chunk=(32, 64), block_v=(16, 32, 64), num_warps=(4, 8), num_stages=(1, 2),
                        path=("fused", "chunked")),
        "backward": dict(bwd_chunk=(32, 64), bwd_block_v=(16, 32, 64), bwd_num_warps=(4, 8), bwd_num_stages=(1, 2)),
        "decode": dict(block_v=(16, 32, 64, 128)),
    },
    "full": {
        "forward": dict(chunk=(16, 32, 64, 128), block_v=(16, 32, 64, 128), num_warps=(2, 4, 8),
                        num_stages=(1, 2, 3), path=("fused", "chunked")),
        "backward": dict(bwd_chunk=(16, 32, 64, 128), bwd_block_v=(16, 32, 64, 128), bwd_num_warps=(2, 4, 8),
                         bwd_num_stages=(1, 2, 3)),
        "decode": dict(block_v=(16, 32, 64, 128, 256)),
    },
    "online": {
        "forward": dict(chunk=(32, 64), block_v=(32, 64), num_warps=(4, 8), num_stages=(2,), path=("fused", "chunked")),
        "backward": dict(bwd_chunk=(32, 64), bwd_block_v=(32, 64), bwd_num_warps=(8,), bwd_num_stages=(1, 2)),
        "decode": dict(block_v=(32, 64, 128)),
    },
}

# Largest dynamic shared memory one block may opt into, per compute capability (CUDA's tables);
# used when no GPU is there to ask (dry runs, tests).
_SMEM_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


@dataclass(frozen=True)
class DeviceLimits:
    """What one GPU allows, for pruning: read from the device, or from tables for a target ``arch``."""

    name: str
    arch: int  # 90: sm_90
    sm_count: int
    smem_per_block: int  # bytes one block may use (the opt-in maximum)
    max_regs_per_thread: int = 255

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.arch, 10)

    @classmethod
    def for_arch(cls, arch: int, name: str | None = None, sm_count: int = 132) -> DeviceLimits:
        """Limits of a compute capability from tables (no GPU needed)."""
        smem = _SMEM_PER_BLOCK.get(arch, 99 * 1024)
        return cls(name=name or f"sm_{arch}", arch=arch, sm_count=sm_count, smem_per_block=smem)

    @classmethod
    def from_device(cls, index: int = 0) -> DeviceLimits:
        """Limits read from CUDA device ``index`` (through Triton's driver, as its compiler sees them)."""
        import torch
        from triton.runtime import driver

        props = torch.cuda.get_device_properties(index)
        tprops = driver.active.utils.get_device_properties(index)
        return cls(name=props.name, arch=10 * props.major + props.minor, sm_count=props.multi_processor_count,
                   smem_per_block=int(tprops["max_shared_mem"]))


def kernel_fields(kernel: str, cfg: Config) -> dict:
    """The fields of ``cfg`` that ``kernel`` decides (what a config file stores)."""
    if kernel not in FAMILIES:
        raise ValueError(f"kernel must be one of {sorted(FAMILIES)}, got {kernel!r}")
    return {f: getattr(cfg, f) for f in FAMILY_FIELDS[kernel]}


def candidates(kernel: str, spec: KernelSpec, base: Config, space: str | dict = "default") -> list[Config]:
    """The configs to try for ``kernel`` of ``spec``: ``base`` first, then the space's product.

    Configs that would not launch as they read are dropped (value blocks wider than the padded DV, the fused
    path of non-causal attention: ``lintx_triton.config.value_blocks`` and ``path_of`` decide), and so is every
    duplicate.
    """
    values = (SPACES[space] if isinstance(space, str) else space).get(kernel, {})
    if set(values) != set(FAMILY_FIELDS[kernel]):
        raise ValueError(f"a {kernel} space must give values for {FAMILY_FIELDS[kernel]}, got {sorted(values)}")
    out = {tuple(kernel_fields(kernel, base).items()): base}
    names = list(values)
    for combo in itertools.product(*(values[n] for n in names)):
        cfg = dataclasses.replace(base, **dict(zip(names, combo)), source="candidate")
        if value_blocks(spec, cfg) != cfg or path_of(spec, cfg) != cfg.path:
            continue
        out.setdefault(tuple(kernel_fields(kernel, cfg).items()), cfg)
    return list(out.values())


def _tiles(kernel: str, spec: KernelSpec, cfg: Config) -> tuple[int, int, int]:
    """(fp32 elements held on chip by the largest kernel, input-dtype elements it streams per stage,
    operand elements staged for its products), from its tile shapes."""
    BM, BD = spec.block_m, spec.block_d
    if kernel == "decode":
        BV = value_blocks(spec, cfg).block_v
        return BM * BV + 2 * (BM + BV), BD * 2 + BV, 0
    if kernel == "forward":
        BT, BV = cfg.chunk, cfg.block_v
        # chunk_fwd_kernel_o: phi(q), phi(k) [BT, BM], scores [BT, BT], state [BM, BV], v and acc [BT, BV]
        return 2 * BT * BM + BT * BT + BM * BV + 2 * BT * BV, 2 * BT * BD + BT * BV, BT * BT + BM * BV
    BT, BV = cfg.bwd_chunk, cfg.bwd_block_v
    # chunk_bwd_kernel_dkv: phi(q), phi(k), dk [BT, BM]; v, do, dv [BT, BV]; dS [BM, BV]; two [BT, BT]
    return 3 * BT * BM + 3 * BT * BV + BM * BV + 2 * BT * BT, 2 * BT * BD + 2 * BT * BV, 2 * BT * BT + BM * BV


def estimate_fits(kernel: str, spec: KernelSpec, cfg: Config, limits: DeviceLimits) -> str | None:
    """Why ``cfg`` cannot fit on the device, estimated from tile shapes before compiling; None if it may.

    Conservative: it drops only what is hopeless. Registers: the fp32 tiles spread over the threads;
    compiled kernels take about 2.3x that (sm_90, Triton 3.9: the bf16 D = 64 forward at BT 64, BV 64,
    8 warps is estimated at 96 and takes 222, bench/NOTES.md), so an estimate above the per-thread
    maximum would spill several times over. Shared memory: the streamed input tiles times num_stages
    plus the staged product operands, against the device's per-block maximum.
    """
    held, streamed, staged = _tiles(kernel, spec, cfg)
    warps = 4 if kernel == "decode" else cfg.bwd_num_warps if kernel == "backward" else cfg.num_warps
    regs = held / (32 * warps)
    if regs > limits.max_regs_per_thread:
        return f"estimated {regs:.0f} registers/thread of tiles > {limits.max_regs_per_thread}"
    in_bytes = 4 if spec.dtype == "float32" else 2
    op_bytes = 4 if spec.dot_fp32 else 2
    stages = cfg.bwd_num_stages if kernel == "backward" else cfg.num_stages
    smem = stages * streamed * in_bytes + staged * op_bytes
    if smem > limits.smem_per_block:
        return f"estimated {smem // 1024} KiB shared memory > {limits.smem_per_block // 1024} KiB"
    return None
