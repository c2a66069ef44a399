"""The offline tuner of lintx_triton's generated kernels.

``python -m lintx_triton.autotune`` (or ``lintx autotune``) tunes the forward, the backward and the decode
step of a grid of specs and shapes on this machine's GPU and writes ``autotune/configs/<gpu>/<kernel>.json``,
which :func:`lintx_triton.config_for` reads at run time. Nothing is tuned on a user's call unless
``LINTX_TRITON_ONLINE_TUNE=1`` asks for it.

    from lintx_triton.autotune import Grid, tune
    tune(Grid(dtypes=("bfloat16",), dims=((64, 64),)), out_dir="autotune/configs", budget_minutes=10)

The source is the repository's top-level ``autotune/`` folder; it installs (and, through the symlink
``lintx_triton/autotune``, imports in a checkout) as ``lintx_triton.autotune``.

Modules: :mod:`.space` (candidates, device limits, the pre-compile estimate), :mod:`.prune` (pruning by
compiling for the device's arch on the CPU), :mod:`.measure` (the correctness gates and timers),
:mod:`.tuner` (the loop, the journal, the files), :mod:`.online`, :mod:`.cli`. The file schema, buckets
and lookup are :mod:`lintx_triton.tuned_configs`, shared with the runtime.
"""

# CONFIG_DIR: the configs this package ships, <this folder>/configs (`lintx autotune` writes there by default);
# defined once in lintx_triton.tuned_configs, which the runtime reads without importing the tuner.
from lintx_triton.tuned_configs import SHIPPED_CONFIG_DIR as CONFIG_DIR

from .measure import FUDGE, Workload, bench_timer, reference_check
from .prune import MAX_SPILLS, compile_resources, prune_by_compile, resource_verdict
from .space import SPACES, DeviceLimits, candidates, estimate_fits, kernel_fields
from .tuner import DEFAULT_GRID, Grid, Task, TaskResult, spec_of, tune, write_config_file

__all__ = [
    "CONFIG_DIR", "DEFAULT_GRID", "FUDGE", "MAX_SPILLS", "SPACES", "DeviceLimits", "Grid", "Task", "TaskResult",
    "Workload", "bench_timer", "candidates", "compile_resources", "estimate_fits", "kernel_fields",
    "prune_by_compile", "reference_check", "resource_verdict", "spec_of", "tune",
    "write_config_file",
]
