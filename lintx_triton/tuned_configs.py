"""Tuned launch configs as data: the file schema, shape buckets, validation, and the lookup.

The offline tuner (:mod:`lintx_triton.autotune`) writes one file per kernel family and GPU,
``<dir>/<gpu>/<family>.json``; :func:`lintx_triton.config.config_for` reads them through :func:`lookup`.
Both import this module, and it imports neither: the runtime reads tuned configs without loading the
tuner. Files are searched in the user directory (``$LINTX_TRITON_CONFIG_DIR``, default
``$LINTX_TRITON_CACHE_DIR/configs``, else ``~/.cache/lintx_triton/configs``), then the shipped configs
of this GPU's name, then shipped configs of another GPU with its compute capability; in a file, the
nearest shape bucket wins among entries of the same dtype, causality and padded widths.
:func:`validate_config_file` is the schema.
"""

from __future__ import annotations

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

from .spec import FAMILIES, KernelSpec, _next_pow2

__all__ = [
    "ENV_CONFIG_DIR",
    "FAMILY_FIELDS",
    "PATHS",
    "SCHEMA_VERSION",
    "SHIPPED_CONFIG_DIR",
    "Bucket",
    "Match",
    "clear_cache",
    "forget_files",
    "gpu_key",
    "lookup",
    "read_config_file",
    "user_config_dir",
    "validate_config_file",
]

# The launch paths (lintx_triton.config.Config.path), as a forward entry names them.
PATHS = ("fused", "chunked")
# The environment variable of the user directory (read at the first lookup, never at import).
ENV_CONFIG_DIR = "LINTX_TRITON_CONFIG_DIR"
SCHEMA_VERSION = 1
# The Config fields each kernel family (lintx_triton.spec.FAMILIES) decides: what its file stores.
FAMILY_FIELDS = {
    "forward": ("chunk", "block_v", "num_warps", "num_stages", "path"),
    "backward": ("bwd_chunk", "bwd_block_v", "bwd_num_warps", "bwd_num_stages"),
    "decode": ("block_v",),
}
# The configs the tuner ships, found from lintx_triton's own folder, not by importing lintx_triton.autotune
# (its __init__ loads the whole tuner). lintx_triton/autotune is the tuner's package: in a checkout and an
# editable install a symlink to the top-level autotune/ (resolved here: the folder the tuner writes to), in a
# regular install a copy; pyproject ships configs/*/*.json as its package data.
SHIPPED_CONFIG_DIR = (Path(__file__).resolve().parent / "autotune" / "configs").resolve()


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


def _check_fields(family: str, cfg: dict, where: str) -> None:
    want = set(FAMILY_FIELDS[family])
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
    """Check a tuned-config file's content (as written by ``python -m lintx_triton.autotune``); returns it.

    Schema (one file per kernel family; the JSON key is ``"kernel"``)::

        {"schema": 1, "kernel": "forward" | "backward" | "decode",
         "gpu": "NVIDIA H200", "compute_capability": "9.0", "triton": "3.9.0", "torch": "2.13.0",
         "lintx_triton": "0.1.0", "generator_version": 5,
         "entries": [{"bucket": {Bucket fields}, "config": {FAMILY_FIELDS[kernel]: ...},
                      "ms": 0.149, "heuristic_ms": 0.2, "complete": true}, ...]}

    Raises ValueError naming the first field that is wrong (TypeError when ``data`` or its entries
    are not an object and a list).
    """
    if not isinstance(data, dict):
        raise TypeError(f"a config file holds a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema must be {SCHEMA_VERSION}, got {data.get('schema')!r}")
    family = data.get("kernel")
    if family not in FAMILIES:
        raise ValueError(f"kernel must be one of {sorted(FAMILIES)}, got {family!r}")
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
        if b.batch_heads < 1 or b.T < 1 or (family == "decode" and b.T != 1):
            raise ValueError(f"{where}: batch_heads and T must be >= 1 (T = 1 for decode), got {b.batch_heads}, {b.T}")
        _check_fields(family, e.get("config"), where)
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
    """The tuned entry for the kernel family ``kernel`` ("forward", "backward", "decode") of a call, or None
    (heuristic).

    Searches the user directory, then the shipped configs of ``gpu_name``, then shipped configs of other
    GPUs of compute ``capability``; in the first file with an entry for this dtype, causality and padded
    widths, the nearest bucket wins. No GPU is needed: the device is described by its arguments.
    """
    if kernel not in FAMILIES:
        raise ValueError(f"kernel must be one of {sorted(FAMILIES)}, got {kernel!r}")
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


def forget_files() -> None:
    """Forget the files read (after new ones were written); the warnings given stay given."""
    with _LOCK:
        _FILE_CACHE.clear()


def clear_cache() -> None:
    """Forget the files read, the warnings given and the user directory (after changing the environment)."""
    with _LOCK:
        _FILE_CACHE.clear()
        _WARNED.clear()
        user_config_dir.cache_clear()
