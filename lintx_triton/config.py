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

__all__ = ["Config", "config_for", "override", "interpreting"]

PATHS = ("fused", "chunked")


@dataclass(frozen=True)
class Config:
    """How a spec is launched.

    Args:
        chunk: BT, tokens per chunk in the forward (a power of two >= 16).
        bwd_chunk: BT of the backward, chosen separately (it holds more tiles).
        block_v: BV, the value block of the forward.
        bwd_block_v: BV of the backward.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
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
        return Config(chunk=16, bwd_chunk=16, block_v=bv, bwd_block_v=bv, num_warps=4, num_stages=1,
                      path="chunked")
    # Chosen from the sm_90 cubins (Triton 3.9, compiled on a CPU, read with cuobjdump/nvdisasm): these
    # are the largest tiles with no register spill and HGMMA products in the forward. At D = DV = 64:
    # forward 8 warps, BT 64, BV 64 -> 214 registers (4 warps: 255 + a 64-byte stack); backward BT 64
    # spills at any width, BT 32 / BV 64 / 8 warps -> 193 registers. At 128: forward BV 32 -> 192
    # registers; backward only BT 16 / BV 32 / 8 warps stays spill-free (188 registers).
    wide = max(spec.block_m, spec.block_dv) > 64
    block_v = min(32 if wide else 64, spec.block_dv)
    programs = batch_heads * -(-spec.value_dim // block_v)
    # The fused path runs one program per (value block, batch*head): measured on an H200, 512 such
    # programs ran T = 1k in 0.149 ms but 16 programs took 1.74 ms at T = 32k (the anchors in
    # shared/anchors/h200.md). Fuse only when the launch fills every multiprocessor twice over.
    fill = programs >= 2 * _sm_count(device.index or 0)
    return Config(
        chunk=64,
        bwd_chunk=16 if wide else 32,
        block_v=block_v,
        bwd_block_v=min(32 if wide else 64, spec.block_dv),
        num_warps=8,
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
