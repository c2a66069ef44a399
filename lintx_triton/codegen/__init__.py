"""Code generation: spec -> Triton source (:mod:`.render`) -> cached, imported module (:mod:`.cache`)."""

from .cache import cache_dir, load, source_path
from .render import render

__all__ = ["render", "load", "cache_dir", "source_path"]
