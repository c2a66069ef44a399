"""``python -m lintx_triton.autotune``: the offline tuner's command line (also ``lintx autotune``)."""

from .cli import autotune

if __name__ == "__main__":
    autotune(prog_name="python -m lintx_triton.autotune")
