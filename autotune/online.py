"""Online tuning: ``LINTX_TRITON_ONLINE_TUNE=1`` tunes a call's shape on the spot, once.

:func:`lintx_triton.config.config_for` calls :func:`tune_call` when no tuned bucket lies within a
factor of 2 of a call's shape. The small ``"online"`` space is timed (no compile pruning: it would
compile everything twice), the result goes to the user directory, and later calls, in this process and
the next, find it there. Opt-in only: the first call at a new shape then takes seconds.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from lintx_triton.spec import KernelSpec

__all__ = ["tune_call"]


def tune_call(spec: KernelSpec, batch_heads: int, T: int, device: torch.device, kernels, user_dir: Path) -> None:
    """Tune ``kernels`` of one call's (spec, B*H, T) and write them under ``user_dir``; never raises."""
    from .tuner import Task, tune

    if torch.cuda.is_current_stream_capturing():  # timing inside a CUDA graph capture would break it
        return
    tasks = [Task(k, spec, batch_heads, 1 if k == "decode" else T) for k in kernels
             if k != "decode" or (spec.causal and not spec.has_initial_state)]
    warnings.warn(f"lintx_triton: LINTX_TRITON_ONLINE_TUNE=1: tuning {', '.join(t.label() for t in tasks)} "
                  f"(once; written to {user_dir})", stacklevel=4)
    errors = []

    def run():
        # A thread of its own: the call that asks runs inside a custom op, where autograd is switched off
        # for this thread, and the backward needs it to be timed.
        try:
            tune(tasks, out_dir=user_dir, space="online", device=device, prune_compile=False)
        except Exception as e:
            errors.append(e)

    th = threading.Thread(target=run, name="lintx-online-tune")
    th.start()
    th.join()
    if errors:
        warnings.warn(f"lintx_triton: online tuning failed ({errors[0]!r}); using the default config", stacklevel=4)
