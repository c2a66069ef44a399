"""``python -m lintx_triton``: the ``lintx`` command line."""

from .cli import main

main()
