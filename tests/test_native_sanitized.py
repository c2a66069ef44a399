"""The native C (lintx_triton/native) under AddressSanitizer and UndefinedBehaviorSanitizer: the CPU's
compute-sanitizer. The native tests run again in a subprocess against a library built with
``-fsanitize=address,undefined`` (the runtimes preloaded into Python), so a read or write outside a tensor's
allocation, or undefined arithmetic, aborts the run instead of passing unseen."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lintx_triton import native

_CC = native._compiler()


def _runtime(name: str):
    """The path of gcc's sanitizer runtime, or None."""
    if _CC is None:
        return None
    try:
        out = subprocess.run([_CC, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


_ASAN, _UBSAN = _runtime("libasan.so"), _runtime("libubsan.so")

_RUN = """
import sys
import pytest
import lintx_triton.native as native
# -O1 (after -O3, so it wins), as AddressSanitizer's docs advise: causal.c's unrolled variants took 47 s to
# build with the sanitizers at -O3, 15 at -O1
native._FLAGS = native._FLAGS + ("-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                                 "-fno-omit-frame-pointer", "-O1")
assert native.available(), "the sanitized library did not build"
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
                      "tests/test_native_step.py", "tests/test_native_causal.py", "tests/test_native_linear.py",
                      "-k", "not isa and not fork and not failed_build and not no_compiler and not library_key"]))
"""


@pytest.mark.skipif(_ASAN is None or _UBSAN is None, reason="no C compiler with AddressSanitizer and UBSan here")
def test_native_tests_pass_under_sanitizers(tmp_path):
    root = Path(__file__).resolve().parent.parent
    # the sanitizers write their reports to files: pytest's capture of the inner run's stderr dies with it
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, LD_PRELOAD=f"{_ASAN} {_UBSAN}", LINTX_TRITON_CACHE_DIR=str(tmp_path),
               ASAN_OPTIONS=f"detect_leaks=0:abort_on_error=1:log_path={logs / 'asan'}",
               UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={logs / 'ubsan'}",
               PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _RUN], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    reports = "".join(f.read_text()[:4000] for f in sorted(logs.iterdir()))
    assert done.returncode == 0 and not reports, reports or (done.stdout + done.stderr)[-6000:]
    assert "passed" in done.stdout
    import sysconfig

    has_headers = os.path.exists(os.path.join(sysconfig.get_paths().get("include") or "", "Python.h"))
    # the library, and runner.c's extension (built where Python's headers are)
    for pattern in ("native_step_*.so",) + (("native_runner_*.so",) if has_headers else ()):
        built = list(tmp_path.rglob(pattern))
        assert built, f"no {pattern} was built in the test's cache"
        if shutil.which("nm"):
            symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True).stdout
            assert "__asan" in symbols, f"{built[0].name} was built without AddressSanitizer"
