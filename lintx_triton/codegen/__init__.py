"""Code generation: spec -> Triton source (:mod:`.render` joins the kernel files of :mod:`.kernels` behind a
generated header) -> cached, imported module (:mod:`.cache`)."""

from .cache import cache_dir, load, source_path
from .render import KERNELS, module_key, render

__all__ = ["render", "load", "cache_dir", "source_path", "module_key", "KERNELS"]
