"""Launch configurations: block sizes, warps, and the choice of path.

:func:`config_for` decides, at a call's first use of a (spec, shape) on a GPU, and caches:

1. ``lintx_triton.config.override(...)`` blocks (tests and the tuner pin fields with them);
2. tuned configs in the user directory ``$LINTX_TRITON_CONFIG_DIR/<gpu>/<kernel>.json``
   (default ``$LINTX_TRITON_CACHE_DIR/configs``, else ``~/.cache/lintx_triton/configs``);
3. the shipped configs ``autotune/configs/<gpu>/<kernel>.json`` of this GPU's name;
4. shipped configs of another GPU with this GPU's compute capability;
5. :func:`gpu_heuristic`, correct for every shape.

Each kernel (``forward``, ``backward``, ``decode``) is looked up on its own; in a file, the
nearest shape bucket wins among entries of the same dtype, causality and padded widths (tiles
that fit one width may not fit another). A file tuned under another Triton version is used with a
one-time warning. Nothing is benchmarked on the hot path unless ``LINTX_TRITON_ONLINE_TUNE=1``
asks for it (then a shape with no bucket within a factor of 2 is tuned once, on the spot, and
written to the user directory). The files are written by the offline tuner
(``python -m lintx_triton.autotune``, ``lintx autotune``); :func:`validate_config_file` is their schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .spec import KernelSpec, _next_pow2

__all__ = [
    "ENV_CONFIG_DIR",
    "ENV_ONLINE_TUNE",
    "KERNEL_FIELDS",
    "SCHEMA_VERSION",
    "Bucket",
    "Config",
    "Match",
    "clear_cache",
    "config_for",
    "gpu_heuristic",
    "gpu_key",
    "interpreting",
    "lookup",
    "override",
    "read_config_file",
    "search_order",
    "user_config_dir",
    "validate_config_file",
]

PATHS = ("fused", "chunked")
# The environment variables this module reads (at the first call on a GPU, never at import).
ENV_CONFIG_DIR = "LINTX_TRITON_CONFIG_DIR"
ENV_ONLINE_TUNE = "LINTX_TRITON_ONLINE_TUNE"
SCHEMA_VERSION = 1
# The Config fields each tuned kernel decides.
KERNEL_FIELDS = {
    "forward": ("chunk", "block_v", "num_warps", "num_stages", "path"),
    "backward": ("bwd_chunk", "bwd_block_v", "bwd_num_warps", "bwd_num_stages"),
    "decode": ("block_v",),
}
# The configs the tuner ships, found from lintx_triton's own folder, not by importing lintx_triton.autotune
# (its __init__ loads the whole tuner). lintx_triton/autotune is the tuner's package: in a checkout and an
# editable install a symlink to the top-level autotune/ (resolved here: the folder the tuner writes to), in a
# regular install a copy; pyproject ships configs/*/*.json as its package data.
SHIPPED_CONFIG_DIR = (Path(__file__).resolve().parent / "autotune" / "configs").resolve()
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


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
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


def _heuristic(spec: KernelSpec) -> Config:
    """The config off a GPU: the interpreter runs one program at a time, and small chunks keep every test
    multi-chunk."""
    bv = min(32, spec.block_dv)
    return Config(chunk=16, bwd_chunk=16, block_v=bv, bwd_block_v=bv, num_warps=4, bwd_num_warps=4,
                  num_stages=1, bwd_num_stages=1, path="chunked")


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
        bwd_num_stages=1 if (wide and arch >= 90 and spec.dtype != "float32") else 2,
        path="fused" if spec.causal and fill else "chunked",
    )


# ---------------------------------------------------------------- tuned configs: files and lookup

def gpu_key(name: str) -> str:
    """A GPU's name as a folder name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _width(n: int) -> int:
    """A width padded as the kernels pad it (KernelSpec.block_d, block_m, block_dv)."""
    return max(16, _next_pow2(n))


@dataclass(frozen=True)
class Bucket:
    """A tuned shape: the spec's tuning-relevant fields and (B*H, T). Decode buckets have T = 1."""

    feature_map: str
    causal: bool
    normalize: bool
    dtype: str
    head_dim: int
    value_dim: int
    feature_dim: int
    initial_state: bool
    batch_heads: int
    T: int

    @classmethod
    def of(cls, spec: KernelSpec, batch_heads: int, T: int) -> Bucket:
        return cls(spec.feature_map, spec.causal, spec.normalize, spec.dtype, spec.head_dim, spec.value_dim,
                   spec.feature_dim, spec.has_initial_state, batch_heads, T)

    def compatible(self, other: Bucket) -> bool:
        """Whether a config tuned for ``other`` may launch for ``self``: same dtype, causality and padded
        widths (the tiles that fit D = 64 may exceed the registers or shared memory at D = 128)."""
        return (self.dtype, self.causal) == (other.dtype, other.causal) and all(
            _width(getattr(self, f)) == _width(getattr(other, f)) for f in ("head_dim", "value_dim", "feature_dim"))

    def distance(self, other: Bucket) -> float:
        """log2 distance in B*H and T, a quarter of it in D, DV, M, and small costs for other flags."""
        lg = lambda a, b: abs(math.log2(max(a, 1) / max(b, 1)))  # noqa: E731
        return (lg(self.batch_heads, other.batch_heads) + lg(self.T, other.T)
                + 0.25 * sum(lg(getattr(self, f), getattr(other, f)) for f in ("head_dim", "value_dim", "feature_dim"))
                + 0.5 * (self.normalize != other.normalize) + 0.5 * (self.initial_state != other.initial_state)
                + 0.25 * (self.feature_map != other.feature_map))

    def label(self) -> str:
        return f"B*H={self.batch_heads} T={self.T}"


def _check_fields(kernel: str, cfg: dict, where: str) -> None:
    want = set(KERNEL_FIELDS[kernel])
    if not isinstance(cfg, dict) or set(cfg) != want:
        raise ValueError(f"{where}: config must have exactly the fields {sorted(want)}, got {cfg!r}")
    for name, val in cfg.items():
        if name == "path":
            ok = val in PATHS
        elif name in ("num_warps", "bwd_num_warps"):
            ok = isinstance(val, int) and val in (1, 2, 4, 8, 16, 32)
        elif name in ("num_stages", "bwd_num_stages"):
            ok = isinstance(val, int) and 1 <= val <= 8
        else:
            ok = isinstance(val, int) and val >= 16 and not val & (val - 1)
        if not ok or isinstance(val, bool):
            raise ValueError(f"{where}: bad value {name} = {val!r}")


def validate_config_file(data: dict) -> dict:
    """Check a tuned-config file's content (as written by ``python -m autotune``); returns it.

    Schema (one file per kernel)::

        {"schema": 1, "kernel": "forward" | "backward" | "decode",
         "gpu": "NVIDIA H200", "compute_capability": "9.0", "triton": "3.9.0", "torch": "2.13.0",
         "lintx_triton": "0.1.0", "generator_version": 5,
         "entries": [{"bucket": {Bucket fields}, "config": {KERNEL_FIELDS[kernel]: ...},
                      "ms": 0.149, "heuristic_ms": 0.2, "complete": true}, ...]}

    Raises ValueError naming the first field that is wrong (TypeError when ``data`` or its entries
    are not an object and a list).
    """
    if not isinstance(data, dict):
        raise TypeError(f"a config file holds a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema must be {SCHEMA_VERSION}, got {data.get('schema')!r}")
    kernel = data.get("kernel")
    if kernel not in KERNEL_FIELDS:
        raise ValueError(f"kernel must be one of {sorted(KERNEL_FIELDS)}, got {kernel!r}")
    for key in ("gpu", "compute_capability", "triton", "torch"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{key} must be a non-empty string, got {data.get(key)!r}")
    if not re.fullmatch(r"\d+\.\d+", data["compute_capability"]):
        raise ValueError(f"compute_capability must read like '9.0', got {data['compute_capability']!r}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise TypeError("entries must be a list")
    names = {f.name for f in dataclasses.fields(Bucket)}
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("bucket"), dict) or set(e["bucket"]) != names:
            raise ValueError(f"{where}: bucket must have exactly the fields {sorted(names)}")
        try:
            b = Bucket(**e["bucket"])
            KernelSpec(b.feature_map, b.causal, b.normalize, b.dtype, b.head_dim, b.value_dim, b.initial_state, False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad bucket {e['bucket']}: {err}") from None
        if b.batch_heads < 1 or b.T < 1 or (kernel == "decode" and b.T != 1):
            raise ValueError(f"{where}: batch_heads and T must be >= 1 (T = 1 for decode), got {b.batch_heads}, {b.T}")
        _check_fields(kernel, e.get("config"), where)
        if not isinstance(e.get("ms"), (int, float)) or not e["ms"] > 0:
            raise ValueError(f"{where}: ms must be a positive number, got {e.get('ms')!r}")
    return data


_WARNED: set = set()
_FILE_CACHE: dict = {}
_LOCK = threading.RLock()


def _warn_once(key, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def read_config_file(path: str | os.PathLike) -> dict | None:
    """A tuned-config file, validated and cached; None (with a one-time warning) when it is unreadable or
    invalid, so that a broken file never breaks a call. Warns once when its Triton version differs."""
    path = Path(path)
    with _LOCK:
        if path in _FILE_CACHE:
            return _FILE_CACHE[path]
        data = None
        if path.is_file():
            try:
                data = validate_config_file(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as e:
                _warn_once(("invalid", path), f"lintx_triton: ignoring the config file {path}: {e}")
        if data is not None:
            import triton

            if data["triton"] != triton.__version__:
                _warn_once(("version", path), (
                    f"lintx_triton: {path} was tuned with Triton {data['triton']}, this is Triton "
                    f"{triton.__version__}; using it (retune with `lintx autotune` to refresh it)"))
        _FILE_CACHE[path] = data
        return data


@dataclass(frozen=True)
class Match:
    """A tuned entry chosen for a call: its fields, where it came from, how far its bucket is."""

    fields: dict
    source: str
    distance: float
    bucket: Bucket


def _nearest(data: dict | None, want: Bucket) -> tuple[float, dict] | None:
    best = None
    for e in (data or {}).get("entries", ()):
        b = Bucket(**e["bucket"])
        if want.compatible(b):
            d = want.distance(b)
            if best is None or d < best[0]:
                best = (d, e)
    return best


def lookup(spec: KernelSpec, batch_heads: int, T: int, *, kernel: str, gpu_name: str, capability: tuple[int, int],
           user_dir: str | os.PathLike | None = None, shipped_dir: str | os.PathLike | None = None) -> Match | None:
    """The tuned entry for ``kernel`` ("forward", "backward", "decode") of a call, or None (heuristic).

    Searches the user directory, then the shipped configs of ``gpu_name``, then shipped configs of other
    GPUs of compute ``capability``; in the first file with an entry for this dtype, causality and padded
    widths, the nearest bucket wins. No GPU is needed: the device is described by its arguments.
    """
    if kernel not in KERNEL_FIELDS:
        raise ValueError(f"kernel must be one of {sorted(KERNEL_FIELDS)}, got {kernel!r}")
    want = Bucket.of(spec, batch_heads, 1 if kernel == "decode" else T)
    key = gpu_key(gpu_name)
    shipped = Path(shipped_dir) if shipped_dir is not None else SHIPPED_CONFIG_DIR
    user = Path(user_dir) if user_dir is not None else user_config_dir()
    cc = f"{capability[0]}.{capability[1]}"
    # (file, how the source names it, the compute capability it must have or None)
    levels = [(user / key / f"{kernel}.json", "user config", None),
              (shipped / key / f"{kernel}.json", f"shipped config for {key}", None)]
    if shipped.is_dir():
        levels += [(other / f"{kernel}.json", f"shipped config for compute capability {cc}", cc)
                   for other in sorted(shipped.iterdir()) if other.is_dir() and other.name != key]
    for path, what, need_cc in levels:
        data = read_config_file(path)
        if data is None or (need_cc is not None and data["compute_capability"] != need_cc):
            continue
        hit = _nearest(data, want)
        if hit is not None:
            d, e = hit
            b = Bucket(**e["bucket"])
            return Match(dict(e["config"]), f"{kernel}: {what} ({path}) [{b.label()}]", d, b)
    return None


@functools.cache
def user_config_dir() -> Path:
    """``$LINTX_TRITON_CONFIG_DIR``, else ``configs/`` in lintx_triton's cache directory (read once)."""
    root = os.environ.get(ENV_CONFIG_DIR)
    if root:
        return Path(root).expanduser()
    from .codegen import cache_dir  # <cache>/kernels

    return cache_dir().parent / "configs"


@functools.cache
def _online_tune() -> bool:
    return os.environ.get(ENV_ONLINE_TUNE, "0") not in ("", "0", "false", "False")


def search_order() -> list[str]:
    """Where :func:`config_for` looks, first to last (for ``lintx info``)."""
    return ["lintx_triton.config.override() blocks", f"user configs: {user_config_dir()}/<gpu>/<kernel>.json",
            f"shipped configs: {SHIPPED_CONFIG_DIR}/<gpu>/<kernel>.json",
            "shipped configs of the same compute capability", "heuristic (lintx_triton/config.py)"]


@functools.cache
def _device_identity(index: int) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


_TUNED: dict = {}
# Held while online tuning runs. Not thread-local: the tuner runs in a thread of its own, and its calls
# must neither tune again nor be cached.
_ONLINE_BUSY = threading.Lock()


def clear_cache() -> None:
    """Forget every file read and config decided (after writing new files, or changing the environment)."""
    with _LOCK:
        _TUNED.clear()
        _FILE_CACHE.clear()
        _WARNED.clear()
        user_config_dir.cache_clear()
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
    matches = {k: lookup(spec, batch_heads, T, kernel=k, gpu_name=name, capability=capability) for k in kernels}
    if _online_tune() and not _ONLINE_BUSY.locked():
        # a one-token call is tuned as the decode step only (its forward fields matter little there)
        far = [k for k in (("decode",) if T == 1 else kernels)
               if matches[k] is None or matches[k].distance > ONLINE_TUNE_DISTANCE]
        if far and _ONLINE_BUSY.acquire(blocking=False):
            try:
                # the tuner is imported only when asked for
                from .autotune.online import tune_call

                tune_call(spec, batch_heads, T, torch.device("cuda", index), far, user_config_dir())
            finally:
                _ONLINE_BUSY.release()
            with _LOCK:
                _FILE_CACHE.clear()
            matches = {k: lookup(spec, batch_heads, T, kernel=k, gpu_name=name, capability=capability)
                       for k in kernels}
    cfg = gpu_heuristic(spec, batch_heads, _sm_count(index), arch=_arch(index))
    sources = []
    for k in kernels:  # decode last: its block_v wins for a one-token call
        m = matches[k]
        if m is not None:
            cfg = dataclasses.replace(cfg, **m.fields)
            sources.append(m.source)
    cfg = dataclasses.replace(cfg, block_v=min(cfg.block_v, spec.block_dv),
                              bwd_block_v=min(cfg.bwd_block_v, spec.block_dv),
                              source="; ".join(sources) if sources else "heuristic")
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
    if not spec.causal and cfg.path == "fused":
        cfg = dataclasses.replace(cfg, path="chunked")
    return cfg
