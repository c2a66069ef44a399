"""Launch configurations: block sizes, warps, and the choice of path.

:func:`config_for` decides, at a call's first use of a (spec, shape) on a GPU, and caches:

1. ``lintx_triton.config.override(...)`` blocks (tests and the tuner pin fields with them);
2. tuned configs in the user directory ``$LINTX_TRITON_CONFIG_DIR/<gpu>/<kernel>.json``
   (default ``$LINTX_TRITON_CACHE_DIR/configs``, else ``~/.cache/lintx_triton/configs``);
3. the shipped configs ``autotune/configs/<gpu>/<kernel>.json`` of this GPU's name;
4. shipped configs of another GPU with this GPU's compute capability;
5. :func:`gpu_heuristic`, correct for every shape.

Each kernel family (``forward``, ``backward``, ``decode``) is looked up on its own; in a file, the
nearest shape bucket wins among entries of the same dtype, causality and padded widths (tiles
that fit one width may not fit another). A file tuned under another Triton version is used with a
one-time warning. Nothing is benchmarked on the hot path unless ``LINTX_TRITON_ONLINE_TUNE=1``
asks for it (then a shape with no bucket within a factor of 2 is tuned once, on the spot, and
written to the user directory). The files are written by the offline tuner
(``python -m lintx_triton.autotune``, ``lintx autotune``); :mod:`lintx_triton.tuned_configs` reads
them (their schema, buckets and lookup), this module decides with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from dataclasses import dataclass

import torch

from . import tuned_configs
from .spec import KernelSpec
from .tuned_configs import PATHS

__all__ = [
    "ENV_ONLINE_TUNE",
    "Config",
    "clear_cache",
    "config_for",
    "gpu_heuristic",
    "interpreting",
    "override",
    "path_of",
    "search_order",
    "value_blocks",
]

# The environment variable this module reads (at the first call on a GPU, never at import); the user
# directory's is lintx_triton.tuned_configs.ENV_CONFIG_DIR.
ENV_ONLINE_TUNE = "LINTX_TRITON_ONLINE_TUNE"
# online tuning retunes a shape whose nearest bucket is further than this (1.0: a factor 2 in B*H or T)
ONLINE_TUNE_DISTANCE = 1.0


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
        bwd_num_stages: num_stages of the backward.
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
    bwd_num_stages: int = 2
    path: str = "chunked"
    source: str = "heuristic"

    def __post_init__(self):
        for name in ("chunk", "bwd_chunk", "block_v", "bwd_block_v"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"Config.{name} must be a power of two >= 16, got {val}")
        if self.path not in PATHS:
            raise ValueError(f"Config.path must be one of {PATHS}, got {self.path!r}")


# os.environ's own mapping, keyed and valued as it stores them (bytes on POSIX): os.environ.get encodes the key at
# each call, 0.9 us against 0.06 for this lookup, which a CPU decode step does per call (issue #17). Assignments to
# os.environ (and monkeypatch.setenv) update this mapping, so it reads the same as os.environ.get.
try:
    _ENV, _INTERPRET, _ONE = os.environ._data, os.environ.encodekey("TRITON_INTERPRET"), os.environ.encodevalue("1")
except AttributeError:  # another Python's os.environ: its public get
    _ENV = None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    if _ENV is not None:
        return _ENV.get(_INTERPRET) == _ONE
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
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


def path_of(spec: KernelSpec, cfg: Config) -> str:
    """The path a launch of ``spec`` under ``cfg`` takes: the fused path carries a prefix state, so non-causal
    attention always runs chunked. The one place this rule is decided (configs, launch plans, the tuner)."""
    return cfg.path if spec.causal else "chunked"


def value_blocks(spec: KernelSpec, cfg: Config) -> Config:
    """``cfg`` with its value blocks no wider than DV padded (a wider block would only mask lanes off). The one
    place this clamp is decided (the heuristics, tuned configs, the decode launch, the tuner's candidates)."""
    return dataclasses.replace(cfg, block_v=min(cfg.block_v, spec.block_dv),
                               bwd_block_v=min(cfg.bwd_block_v, spec.block_dv))


def _heuristic(spec: KernelSpec) -> Config:
    """The config off a GPU: the interpreter runs one program at a time, and small chunks keep every test
    multi-chunk."""
    return value_blocks(spec, Config(chunk=16, bwd_chunk=16, block_v=32, bwd_block_v=32, num_warps=4,
                                     bwd_num_warps=4, num_stages=1, bwd_num_stages=1, path="chunked"))


@functools.cache
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
    # BV 32, 8 warps take 147 and 240 registers; at D = 128 the (dk, dv) kernel keeps a 160-byte stack
    # (39 LDL / 39 STL) at BV 32, 8 bytes at BV 16 and none at BV 16 with one stage (251 registers, 38
    # HGMMA), so D = 128 takes BV 16 and one stage in the backward (bench/NOTES.md). IEEE fp32 products
    # run on the FMA units and need far smaller tiles.
    wide = max(spec.block_m, spec.block_dv) > 64
    if spec.dtype == "float32":
        chunk, block_v = (16, 16) if wide else (32, 16)
        bwd_chunk, bwd_block_v, bwd_warps = (16, 16, 8) if wide else (32, 32, 8)
    elif arch >= 90:
        chunk, block_v = 64, (32 if wide else 64)
        bwd_chunk, bwd_block_v, bwd_warps = 64, (16 if wide else 32), 8
    else:
        # sm_80's mma layouts hold more registers: these tiles spilled there (bench/COMPILE_REPORT.md).
        # BT 32 with BV 32 / 64 (D = 64) or 16 (D = 128) is spill-free but for the D = 128 (dk, dv).
        chunk, block_v = 32, (16 if wide else 32)
        bwd_chunk, bwd_block_v, bwd_warps = 32, (16 if wide else 64), 8
    cfg = value_blocks(spec, Config(
        chunk=chunk,
        bwd_chunk=bwd_chunk,
        block_v=block_v,
        bwd_block_v=bwd_block_v,
        num_warps=8,
        bwd_num_warps=bwd_warps,
        num_stages=2,
        bwd_num_stages=1 if (wide and arch >= 90 and spec.dtype != "float32") else 2,
    ))
    programs = batch_heads * -(-spec.value_dim // cfg.block_v)
    # The fused path runs one program per (value block, batch*head): measured on an H200, 512 such
    # programs ran T = 1k in 0.149 ms but 16 programs took 1.74 ms at T = 32k (the anchors in
    # shared/anchors/h200.md). Fuse only when the launch fills every multiprocessor twice over.
    cfg = dataclasses.replace(cfg, path="fused" if programs >= 2 * sm_count else "chunked")
    return dataclasses.replace(cfg, path=path_of(spec, cfg))


@functools.cache
def _online_tune() -> bool:
    return os.environ.get(ENV_ONLINE_TUNE, "0") not in ("", "0", "false", "False")


def search_order() -> list[str]:
    """Where :func:`config_for` looks, first to last (for ``lintx info``)."""
    return ["lintx_triton.config.override() blocks",
            f"user configs: {tuned_configs.user_config_dir()}/<gpu>/<kernel>.json",
            f"shipped configs: {tuned_configs.SHIPPED_CONFIG_DIR}/<gpu>/<kernel>.json",
            "shipped configs of the same compute capability", "heuristic (lintx_triton/config.py)"]


@functools.cache
def _device_identity(index: int) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


_TUNED: dict = {}
_LOCK = threading.RLock()
# Held while online tuning runs. Not thread-local: the tuner runs in a thread of its own, and its calls
# must neither tune again nor be cached.
_ONLINE_BUSY = threading.Lock()


def clear_cache() -> None:
    """Forget every file read and config decided (after writing new files, or changing the environment)."""
    with _LOCK:
        _TUNED.clear()
        tuned_configs.clear_cache()
        _online_tune.cache_clear()


def _kernels_of(T: int) -> tuple[str, ...]:
    # config_for does not know which op asks: a one-token call is the decode step (or a one-token forward,
    # which tiles like it); a longer one runs the forward and, when training, the backward.
    return ("forward", "backward", "decode") if T == 1 else ("forward", "backward")


def _tuned(spec: KernelSpec, batch_heads: int, T: int, index: int) -> Config:
    key = (spec, batch_heads, T, index)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    name, capability = _device_identity(index)
    kernels = _kernels_of(T)
    matches = {k: tuned_configs.lookup(spec, batch_heads, T, kernel=k, gpu_name=name, capability=capability)
               for k in kernels}
    if _online_tune() and not _ONLINE_BUSY.locked():
        # a one-token call is tuned as the decode step only (its forward fields matter little there)
        far = [k for k in (("decode",) if T == 1 else kernels)
               if matches[k] is None or matches[k].distance > ONLINE_TUNE_DISTANCE]
        if far and _ONLINE_BUSY.acquire(blocking=False):
            try:
                # the tuner is imported only when asked for
                from .autotune.online import tune_call

                tune_call(spec, batch_heads, T, torch.device("cuda", index), far, tuned_configs.user_config_dir())
            finally:
                _ONLINE_BUSY.release()
            tuned_configs.forget_files()
            matches = {k: tuned_configs.lookup(spec, batch_heads, T, kernel=k, gpu_name=name, capability=capability)
                       for k in kernels}
    cfg = gpu_heuristic(spec, batch_heads, _sm_count(index), arch=_arch(index))
    sources = []
    for k in kernels:  # decode last: its block_v wins for a one-token call
        m = matches[k]
        if m is not None:
            cfg = dataclasses.replace(cfg, **m.fields)
            sources.append(m.source)
    cfg = dataclasses.replace(value_blocks(spec, cfg), source="; ".join(sources) if sources else "heuristic")
    if not _ONLINE_BUSY.locked():  # configs decided while tuning are not the ones calls will use afterwards
        with _LOCK:
            if len(_TUNED) > 65536:  # a server seeing ever new lengths: keep memory bounded
                _TUNED.clear()
            _TUNED[key] = cfg
    return cfg


def config_for(spec: KernelSpec, batch_heads: int, T: int, device: torch.device | str = "cuda") -> Config:
    """The config a call with this spec and shape will launch with, and (``.source``) where it came from.

    On a GPU: the tuned configs (user directory, shipped for this GPU's name, shipped for its compute
    capability; see the module's docstring), else :func:`gpu_heuristic`; under ``override`` blocks, their
    fields. Decided at the first call with this (spec, B*H, T, device) and cached.

    Args:
        spec (KernelSpec): the kernel variant.
        batch_heads (int): B*H.
        T (int): the sequence length (1 for a decode step).
        device (torch.device | str): where the call runs. Default: ``"cuda"``.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> spec = lx.KernelSpec("elu", True, True, "bfloat16", 64, 64, False, False)
        >>> lx.config_for(spec, 8 * 16, 4096, "cpu").source
        'heuristic'
    """
    device = torch.device(device)
    if interpreting() or device.type != "cuda":
        cfg = _heuristic(spec)
    else:
        cfg = _tuned(spec, batch_heads, T, device.index if device.index is not None else torch.cuda.current_device())
    for fields in _OVERRIDES:
        cfg = dataclasses.replace(cfg, **fields, source="override")
    path = path_of(spec, cfg)
    # every op call asks here: build a new Config only when the rule changes the path
    return cfg if path == cfg.path else dataclasses.replace(cfg, path=path)
