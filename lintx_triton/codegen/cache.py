"""The on-disk cache of generated kernel modules.

A generated module is written once to ``<cache dir>/kernels/<key>.py`` and
imported from there (Triton reads a kernel's source from its file). The cache
directory is ``$LINTX_TRITON_CACHE_DIR``, else ``~/.cache/lintx_triton``. Keys
(:func:`.render.module_key`) hash the spec, the feature map's source, the generator
version and the kernel files, so a stale file is never reused.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from ..spec import KernelSpec
from .render import module_key, render

__all__ = ["cache_dir", "load", "source_path"]

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, str, bool], ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("LINTX_TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lintx_triton")
    return Path(root) / "kernels"


def source_path(spec: KernelSpec) -> Path:
    return cache_dir() / f"{module_key(spec)}.py"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load(spec: KernelSpec, interpret: bool | None = None) -> ModuleType:
    """The imported kernel module of ``spec``, generating it on first use.

    ``interpret``: decorate for Triton's interpreter or for compilation; default: as
    ``TRITON_INTERPRET`` says. (:mod:`lintx_triton.compile_report` asks for compiled
    kernels even inside an interpreted test run.)
    """
    # Triton decides interpreted vs compiled when a kernel is decorated: key on it too.
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    path = source_path(spec)
    mkey = (path.stem, str(path), interpret)
    mod = _MODULES.get(mkey)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(mkey)
        if mod is not None:
            return mod
        src = render(spec)
        if not path.exists() or path.read_text() != src:
            _write_atomic(path, src)
        name = f"lintx_triton_generated_{path.stem}_{int(interpret)}"
        ispec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(ispec)
        sys.modules[name] = mod
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            ispec.loader.exec_module(mod)
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        _MODULES[mkey] = mod
        return mod
