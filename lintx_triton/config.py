"""Launch configurations: block sizes, warps, and the choice of path.

Nothing here benchmarks anything: the default is a heuristic that is correct
for every shape. The offline tuner (``autotune/``) will add shipped, per-GPU
configs in front of it. :func:`override` pins fields for tests and tuners.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from .spec import KernelSpec

__all__ = ["Config", "config_for", "gpu_heuristic", "override", "interpreting"]

PATHS = ("fused", "chunked")


@dataclass(frozen=True)
class Config:
    """How a spec is launched.

    Args:
        chunk: BT, tokens per chunk in the forward (a power of two >= 16).
        bwd_chunk: BT of the backward, chosen separately (it holds more tiles).
        block_v: BV, the value block of the forward.
        bwd_block_v: BV of the backward.
        num_warps, num_stages: Triton launch options of the forward (ignored by the interpreter).
        bwd_num_warps: num_warps of the backward.
        path: ``"fused"`` (one program per (value block, batch*head) carries the
            state through every chunk) or ``"chunked"`` (chunk sums, a scan,
            then all chunks in parallel). Non-causal attention is always chunked.
        source: where the config came from, for :func:`config_for`'s callers.
    """

    chunk: int = 64
    bwd_chunk: int = 64
    block_v: int = 64
    bwd_block_v: int = 64
    num_warps: int = 4
    bwd_num_warps: int = 4
    num_stages: int = 2
    path: str = "chunked"
    source: str = "heuristic"

    def __post_init__(self):
        for name in ("chunk", "bwd_chunk", "block_v", "bwd_block_v"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"Config.{name} must be a power of two >= 16, got {val}")
        if self.path not in PATHS:
            raise ValueError(f"Config.path must be one of {PATHS}, got {self.path!r}")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_OVERRIDES: list[dict] = []


@contextlib.contextmanager
def override(**fields):
    """Pin config fields inside a ``with`` block, e.g. ``override(path="fused", chunk=16)``."""
    bad = set(fields) - {f.name for f in dataclasses.fields(Config)}
    if bad:
        raise TypeError(f"unknown Config fields {sorted(bad)}")
    _OVERRIDES.append(fields)
    try:
        yield
    finally:
        _OVERRIDES.pop()


def _heuristic(spec: KernelSpec, batch_heads: int, T: int, device: torch.device) -> Config:
    if interpreting() or device.type != "cuda":
        # The interpreter runs one program at a time: small chunks keep every test multi-chunk.
        bv = min(32, spec.block_dv)
        return Config(chunk=16, bwd_chunk=16, block_v=bv, bwd_block_v=bv, num_warps=4, bwd_num_warps=4,
                      num_stages=1, path="chunked")
    index = device.index or 0
    return gpu_heuristic(spec, batch_heads, _sm_count(index), arch=_arch(index))


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def gpu_heuristic(spec: KernelSpec, batch_heads: int, sm_count: int, arch: int = 90) -> Config:
    """The default config on a GPU of compute capability ``arch`` (90: sm_90) with ``sm_count``
    multiprocessors; no GPU is needed to ask."""
    # Chosen from sm_90 cubins compiled on a CPU (Triton 3.9, read with cuobjdump/nvdisasm; the table is
    # bench/COMPILE_REPORT.md, made by `python bench/compile_report.py`): the largest tiles without register
    # spills, with HGMMA products. At D = DV = 64 the bf16 forward at 8 warps, BT 64, BV 64 takes
    # 215-222 registers (4 warps: 255 and a stack). The backward's dq and (dk, dv) kernels at BT 64,
    # BV 32, 8 warps take 147 and 240 registers; at D = 128 the (dk, dv) kernel still keeps a 128-byte
    # stack (31 LDL), the least of the configs tried. IEEE fp32 products run on the FMA units and need
    # far smaller tiles.
    wide = max(spec.block_m, spec.block_dv) > 64
    if spec.dtype == "float32":
        chunk, block_v = (16, 16) if wide else (32, 16)
        bwd_chunk, bwd_block_v, bwd_warps = (16, 16, 8) if wide else (32, 32, 8)
    elif arch >= 90:
        chunk, block_v = 64, (32 if wide else 64)
        bwd_chunk, bwd_block_v, bwd_warps = 64, 32, 8
    else:
        # sm_80's mma layouts hold more registers: these tiles spilled there (bench/COMPILE_REPORT.md).
        # BT 32 with BV 32 / 64 (D = 64) or 16 (D = 128) is spill-free but for the D = 128 (dk, dv).
        chunk, block_v = 32, (16 if wide else 32)
        bwd_chunk, bwd_block_v, bwd_warps = 32, (16 if wide else 64), 8
    block_v = min(block_v, spec.block_dv)
    programs = batch_heads * -(-spec.value_dim // block_v)
    # The fused path runs one program per (value block, batch*head): measured on an H200, 512 such
    # programs ran T = 1k in 0.149 ms but 16 programs took 1.74 ms at T = 32k (the anchors in
    # shared/anchors/h200.md). Fuse only when the launch fills every multiprocessor twice over.
    fill = programs >= 2 * sm_count
    return Config(
        chunk=chunk,
        bwd_chunk=bwd_chunk,
        block_v=block_v,
        bwd_block_v=min(bwd_block_v, spec.block_dv),
        num_warps=8,
        bwd_num_warps=bwd_warps,
        num_stages=2,
        path="fused" if spec.causal and fill else "chunked",
    )


def config_for(spec: KernelSpec, batch_heads: int, T: int, device: torch.device | str = "cuda") -> Config:
    """The config a call with this spec and shape will launch with, and (``.source``) where it came from."""
    device = torch.device(device)
    cfg = _heuristic(spec, batch_heads, T, device)
    for fields in _OVERRIDES:
        cfg = dataclasses.replace(cfg, **fields, source="override")
    if not spec.causal and cfg.path == "fused":
        cfg = dataclasses.replace(cfg, path="chunked")
    return cfg
