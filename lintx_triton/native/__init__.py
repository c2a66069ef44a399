"""Causal linear attention's CPU path in C: the decode step (``step.c``, called through ``runner.c``), the
recurrent forward and backward of the CPU forward (``causal.c``) and a decode step's projections (``linear.c``),
built with the system C compiler at the first eligible call.

A CPU decode step in PyTorch is about ten torch calls of 1-7 us each against a state that one pass reads in
4-5 us at B = 1 (issue #17, bench/RESULTS.md); ``step.c`` does the same arithmetic as
:func:`lintx_triton.reference.linear_attention_step_torch_` in one pass over the state. The decode steps of
:mod:`lintx_triton.api` (and so ``LinearAttention.step``) use it on the ``torch`` backend when a step is
eligible: CPU float32 tensors, q, k, v, S, z contiguous, a built-in elementwise map (:data:`MAPS`), no
autograd graph to record, not under ``torch.compile``. Anything else takes the PyTorch path, as before. A planned
step's per-call work (checking that the tensors are the ones planned for, allocating o, the call) is
``runner.c``, a CPython extension built beside the library with Python's headers (without them, the same in
Python: ``_runner``); it reads each tensor's shape, dtype, device, strides and address from its TensorImpl
through ``meta.cpp`` (c10's inline accessors, built with a C++ compiler against the torch that runs), or where
that does not build through the tensor's Python attributes. ``LinearAttention.step`` also projects its few rows
with ``linear.c`` (:func:`linear`, whose checks ``runner.c`` makes too).

The causal CPU forward and backward (:func:`lintx_triton.reference.linear_attention_torch`) run ``causal.c``'s
recurrence (:func:`causal_forward`, :func:`causal_backward`) on CPU float32 tensors: a token at a time through
a state held in registers, 4 M DV flops a token and head where the chunked products do 4 M (DV + chunk), with
phi (and phi' in the backward) of a built-in map applied in the same passes (any other map's features come from
torch). A large call's heads are split between ``torch.get_num_threads()`` threads, on the team of torch's own
OpenMP runtime where it has one (its threads spin after each parallel torch op: a pool of ours would share the
cores with them), else on a thread pool of this module's.

The shared library is built once per machine into the kernel cache (:func:`lintx_triton.codegen.cache.cache_dir`),
named by a hash of the sources, the compiler (its path and ``--version``), the flags and the machine type, and
written atomically (a temporary file, then ``os.replace``), so two processes never load a half-written file.
The flags have no ``-march``: on x86-64 each entry point has a variant per ISA (AVX-512, AVX2, the baseline),
picked at its first call from the CPU that runs it, so one cached file serves any CPU of the machine type.
``step.c`` is ISO C99 (a * b + c unfused: every variant gives the same bits); ``causal.c`` is compiled with
``-ffp-contract=fast`` (an FMA where the ISA has one: its products are what it spends its time on).
No compiler, or a failed build: the PyTorch paths (a failed build warns once); decided once per process.

Public::

    available()         whether the native code is built and loaded (builds it on the first call)
    set_enabled(flag)   turn it off (False) or on again for this process; enabled() reads it
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "enabled", "set_enabled", "MAPS"]

_log = logging.getLogger(__name__)

# linked into one library; maps.h is included by each (its bytes are part of the library's name)
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("step.c", "causal.c", "linear.c"))
_HEADERS = (Path(__file__).with_name("maps.h"),)
# -O3 vectorizes the row loops; no -march (the file is reused by every CPU of the machine type: the C picks
# AVX-512 / AVX2 per CPU itself), no -ffast-math (NaN propagates as in the torch paths), ISO C (no FMA contraction)
_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99")
# a source's own flags, after _FLAGS: causal.c's and linear.c's products as FMAs (AVX2 and AVX-512 variants; the
# baseline has none)
_SOURCE_FLAGS = {"causal.c": ("-ffp-contract=fast",), "linear.c": ("-ffp-contract=fast",)}
# the built-in maps step.c implements, by registry name -> its LINTX_MAP_* code; any other map: PyTorch path
MAPS = {"elu": 1, "relu": 2, "identity": 3}

_LOCK = threading.Lock()
_lib = None  # the loaded step function, False once it is known not to load, None before the first try
_causal = None  # causal.c's function, loaded with _lib
_causal_team = None  # causal.c's split on an OpenMP team (lintx_causal_f32_team), loaded with _lib
_linear = _linear_team = None  # linear.c's functions (lintx_linear_f32, its split on the OpenMP team), with _lib
_step_team = None  # step.c's split on the OpenMP team (lintx_step_f32_team), with _lib
# runner.c, the decode step's runner as a CPython extension (module lintx_runner), built beside the library with
# Python's headers; _EXT: the module, False when it cannot be built (the Python runner then), None before the try
_RUNNER_SOURCE = Path(__file__).with_name("runner.c")
# meta.cpp: runner.c's reads of a tensor from its TensorImpl (c10's inline accessors), linked in where a C++
# compiler and torch's headers are (else runner.c reads the tensors' Python attributes); meta.h: what both share
_META_SOURCE, _META_HEADER = Path(__file__).with_name("meta.cpp"), Path(__file__).with_name("meta.h")
_EXT = None
_GOMP = None  # the address of torch's OpenMP runtime's GOMP_parallel, 0 when there is none; None before the look
_enabled = True


def enabled() -> bool:
    """Whether eligible CPU calls may use the native code (see :func:`set_enabled`)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Let eligible CPU calls (decode steps, the causal forward and backward) use the native code (``True``, the
    default) or always the PyTorch paths (``False``), from the next call on, for this process.

    Examples::

        >>> import lintx_triton as lx
        >>> lx.native.set_enabled(False)   # e.g. to compare with the PyTorch path
        >>> lx.native.set_enabled(True)
    """
    global _enabled
    _enabled = bool(flag)
    from .. import api

    api._STEP_KEYS = {}  # the decode steps cache their plan per key (and api._fast_step the last one, under it)


def _which(config_var: str, names: tuple) -> "str | None":
    """The first compiler found: the one Python was built with (sysconfig's ``config_var``) when it is here, else
    the first of ``names`` on the PATH."""
    built = (sysconfig.get_config_var(config_var) or "").split()
    for name in built[:1] + list(names):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler() -> "str | None":
    """The system C compiler: the one Python was built with when it is here, else cc, gcc, clang."""
    return _which("CC", ("cc", "gcc", "clang"))


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


@functools.cache
def _cc_version(cc: str) -> str:
    """``cc --version`` (run once a process per compiler), or "" when it does not run."""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _toolchain(cc: str) -> tuple:
    """What a build's name hashes besides its sources: the compiler (its path and ``--version``), the common
    flags, the machine type."""
    return (os.path.realpath(cc).encode(), _cc_version(cc).encode(), " ".join(_FLAGS).encode(),
            platform.machine().encode(), platform.system().encode())


def _library_path(cc: str) -> Path:
    from ..codegen.cache import cache_dir

    return cache_dir() / "native_step_{}.so".format(_hash(
        *(f.read_bytes() for f in _SOURCES + _HEADERS), *_toolchain(cc), repr(sorted(_SOURCE_FLAGS.items())).encode()))


def _cxx_compiler() -> "str | None":
    """The system C++ compiler (for meta.cpp): Python's when it is here, else c++, g++, clang++."""
    return _which("CXX", ("c++", "g++", "clang++"))


def _build(cc: str, path: Path, extra: tuple = (), sources: "tuple | None" = None, cxx: "tuple | None" = None,
           link: tuple = ()) -> None:
    """Compile ``sources`` (default _SOURCES; each with _FLAGS, its own flags, then ``extra``) and link them to
    ``path`` (then ``link``'s flags): into a temporary file beside it, then renamed over it (atomic). ``cxx``:
    (compiler, its flags) for C++ sources (.cpp), which take _FLAGS without their C standard; the link is then
    the C++ compiler's."""
    sources = _SOURCES if sources is None else sources

    def command(src: Path) -> list:
        if src.suffix == ".cpp":
            return [cxx[0], *(f for f in _FLAGS if not f.startswith("-std=")), *cxx[1]]
        return [cc, *_FLAGS, *_SOURCE_FLAGS.get(src.name, ()), *extra]

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.so")
    os.close(fd)

    def check(done):
        if done.returncode != 0:
            raise RuntimeError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")

    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=path.stem) as objs:
            names = [os.path.join(objs, src.stem + ".o") for src in sources]
            # the sources compiled side by side (causal.c's unrolled variants take most of the time)
            procs = [subprocess.Popen([*command(src), "-c", str(src), "-o", name], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                     for src, name in zip(sources, names)]
            try:
                for proc in procs:
                    _, err = proc.communicate(timeout=300)
                    check(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            linker = cxx[0] if any(src.suffix == ".cpp" for src in sources) else cc
            check(subprocess.run([linker, *_FLAGS, "-o", tmp, *names, *link], capture_output=True, text=True,
                                 timeout=300))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    """The ctypes function of the built library, or None (no compiler, a failed build): tried once."""
    global _lib, _causal, _causal_team, _linear, _linear_team, _step_team
    if _lib is not None:
        return _lib or None
    with _LOCK:
        if _lib is not None:
            return _lib or None
        cc = _compiler()
        if cc is None:
            _log.info("lintx_triton.native: no C compiler found (cc, gcc, clang); CPU decode steps and the causal "
                      "forward and backward use PyTorch")
            _lib = False
            return None
        try:
            path = _library_path(cc)
            if not path.exists():
                _build(cc, path)
            lib = ctypes.CDLL(str(path))
            fn, causal, team = lib.lintx_step_f32, lib.lintx_causal_f32, lib.lintx_causal_f32_team
            linear, linear_team, step_team = lib.lintx_linear_f32, lib.lintx_linear_f32_team, lib.lintx_step_f32_team
            causal.restype = team.restype = linear.restype = linear_team.restype = step_team.restype = ctypes.c_int
            if causal(None) != -len(_CAUSAL_ARGS) or linear(None) != -len(_LINEAR_ARGS):
                raise RuntimeError("causal.c or linear.c takes another argument list than "
                                   "lintx_triton/native/__init__.py")
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:  # AttributeError: no symbol
            warnings.warn(f"lintx_triton: the native CPU code (decode step, causal forward and backward) could not be "
                          f"built ({e}); the CPU uses the PyTorch paths", RuntimeWarning, stacklevel=3)
            _lib = False
            return None
        # no argtypes: the arrays pass as pointers, normalize as a C int (see step.c's lintx_step_f32)
        fn.restype = ctypes.c_int
        _causal, _causal_team, _linear, _linear_team, _step_team = causal, team, linear, linear_team, step_team
        _lib = fn
        return fn


def available() -> bool:
    """Whether the native code is built and loaded here (compiling it on the first call, once per machine).

    Examples::

        >>> import lintx_triton as lx
        >>> lx.native.available() in (True, False)
        True
    """
    return _load() is not None


def _ext():
    """The lintx_runner extension module (runner.c), built on the first call once the library is, or None: no
    Python headers here (logged), or a failed build (warned once); the decode steps then use the Python runner.
    Where a C++ compiler and torch's headers are, it reads the tensors through meta.cpp (else, or if that build
    fails or reads a tensor otherwise than its Python attributes do, logged, through their attributes)."""
    global _EXT
    if _EXT is not None:
        return _EXT or None
    if _load() is None:
        return None
    with _LOCK:
        if _EXT is not None:
            return _EXT or None
        include = sysconfig.get_paths().get("include") or ""
        if not os.path.exists(os.path.join(include, "Python.h")):
            _log.info("lintx_triton.native: no Python.h in %r; the decode step's runner stays in Python", include)
            _EXT = False
            return None
        mod = None
        try:
            mod = _runner_module(include, from_impl=True)
        except (OSError, RuntimeError, ImportError, AttributeError, ValueError, subprocess.SubprocessError) as e:
            _log.info("lintx_triton.native: runner.c reads the tensors' Python attributes (meta.cpp: %s)", e)
        try:
            mod = mod or _runner_module(include, from_impl=False)
        except (OSError, RuntimeError, ImportError, AttributeError, subprocess.SubprocessError) as e:
            warnings.warn(f"lintx_triton: the decode step's runner (lintx_triton/native/runner.c) could not be built "
                          f"({e}); decode steps run the Python runner", RuntimeWarning, stacklevel=3)
            _EXT = False
            return None
        _EXT = mod
        return mod


def _runner_module(include: str, from_impl: bool):
    """runner.c built (once per source, toolchain, Python and, ``from_impl``, torch) and loaded, set up: with
    ``from_impl`` linked to meta.cpp, checked first against the Python attributes of a few tensors (ValueError
    when they disagree; RuntimeError when the build fails, e.g. no C++ compiler or no torch headers, remembered
    in the cache beside the library's name so that later processes do not try again)."""
    from ..codegen.cache import cache_dir

    cc = _compiler()
    parts = [_RUNNER_SOURCE.read_bytes(), _META_HEADER.read_bytes(), *_toolchain(cc), include.encode(),
             sys.version.encode(), (sysconfig.get_config_var("EXT_SUFFIX") or "").encode()]
    extra, cxx, link = ("-I" + include,), None, ()
    if from_impl:
        cxx_path = _cxx_compiler()
        root = Path(torch.__file__).parent
        torch_include, torch_lib = root / "include", root / "lib"
        if cxx_path is None or not (torch_include / "c10" / "core" / "TensorImpl.h").exists():
            raise RuntimeError("no C++ compiler" if cxx_path is None else "no torch headers")
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        cxx = (cxx_path, ("-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_include}"))
        extra += ("-DLINTX_TORCH_META",)
        link = (f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}")
        parts += [_META_SOURCE.read_bytes(), os.path.realpath(cxx_path).encode(), _cc_version(cxx_path).encode(),
                  torch.__version__.encode(), str(torch.version.git_version).encode(), str(root).encode(),
                  " ".join(cxx[1]).encode()]
    path = cache_dir() / "native_runner_{}.so".format(_hash(*parts))
    failed = path.with_suffix(".failed")
    if failed.exists():
        raise RuntimeError(f"an earlier build failed ({failed.read_text()[-300:]})")
    if not path.exists():
        try:
            _build(cc, path, extra, (_RUNNER_SOURCE, _META_SOURCE) if from_impl else (_RUNNER_SOURCE,), cxx, link)
        except RuntimeError as e:  # the compiler refused (not a timeout or an OSError, which may pass)
            if from_impl:  # the attribute build is tried next, in this process and the later ones
                failed.write_text(str(e))
            raise
    import importlib.util

    spec = importlib.util.spec_from_file_location("lintx_runner", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.setup(torch.Tensor, torch.float32, torch.strided, _bump, torch.is_grad_enabled, _traced, _function_modes,
              torch._C.DisableTorchFunction)
    mod.setup_linear(_PARAMETER, ctypes.cast(_linear, ctypes.c_void_p).value,
                     ctypes.cast(_linear_team, ctypes.c_void_p).value, _autocast, _is_compiling,
                     torch.get_num_threads, _openmp_parallel(), LINEAR_MAX_ROWS, _LINEAR_SPLIT_MIN)
    if from_impl:
        # outside any mode (a FakeTensorMode or torch.set_default_device would make the samples something else)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch._C.DisableTorchFunction():
            samples = _props_samples()
            got, want = [mod.props(t) for t in samples], [_props(t) for t in samples]
        if got != want or [w[3] for w in want] != [1] * 5 + [0, 0] + [1] * 5 + [0] * 5:
            raise ValueError(f"it read {got} where the Python attributes give {want}")
    return mod


def _props_samples() -> list:
    """Tensors on which meta.cpp's reads must agree with the Python attributes' (native._runner_module): plain
    ones of 4, 3, 2, 0 and 5 dimensions, strided, transposed, broadcast, empty, a parameter that requires grad;
    a negated view and a float64 tensor; then tensors with no memory behind them: a ZeroTensor, a storage resized
    to 0, a sparse tensor, a functional tensor's wrapper and a meta tensor."""
    f32, cpu = torch.float32, torch.device("cpu")
    base = torch.arange(120, dtype=f32, device=cpu).reshape(2, 3, 4, 5)
    shrunk = base.clone()
    shrunk.untyped_storage().resize_(0)
    return [base, base[:, 1:, ::2], base.transpose(1, 3), base[1, 2], torch.zeros(1, 4, dtype=f32).requires_grad_(),
            torch._neg_view(base), base.double(), base.as_strided((2, 2), (0, 1), 3), torch.empty(0, 3, dtype=f32),
            torch.tensor(2.0, dtype=f32), base.view(1, 2, 3, 4, 5), torch.nn.Parameter(torch.ones(3, dtype=f32)),
            torch._efficientzerotensor(2, 3, dtype=f32), shrunk, base.to_sparse(), torch._to_functional_tensor(base),
            base.to("meta")]


def _props(t) -> tuple:
    """runner.c's props(t) from t's Python attributes: (sizes, strides, data_ptr, plain, contiguous,
    requires_grad), sizes and strides up to 4 long; ((), (), 0, 0, 0, 0) when t is not plain."""
    plain = (t.layout == torch.strided and t.is_cpu and t.dtype == torch.float32 and not t.is_neg()
             and _within_storage(t))
    if not plain:
        return (), (), 0, 0, 0, 0
    n = min(t.dim(), 4)
    return tuple(t.shape[:n]), t.stride()[:n], t.data_ptr(), 1, int(t.is_contiguous()), int(t.requires_grad)


_dispatch_modes = torch._C._len_torch_dispatch_stack  # FakeTensorMode, make_fx's proxy mode, ...
_functorch_active = torch._C._are_functorch_transforms_active  # vmap, grad, ...
_jit_tracing = torch._C._get_tracing_state  # torch.jit.trace
_forward_ad = torch.autograd.forward_ad
_function_modes = torch._C._len_torch_function_stack  # TorchFunctionMode: a logger, an override, torch.device(...)


def _function_modes_other_than_device() -> bool:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    return not all(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())


def _traced() -> bool:
    """Whether a tracer, transform or mode sees the torch calls now: the C would run unseen by it (make_fx's or
    torch.jit.trace's graph would miss it, forward-mode AD its tangents, a TorchFunctionMode the projections), on a
    tensor without real memory (a FakeTensor's data_ptr is 0: the C wrote through NULL), or on an output a mode
    allocated (its empty_like could return anything). torch.set_default_device's mode alone does not count (the
    outputs follow their inputs' device)."""
    return (bool(_dispatch_modes()) or _functorch_active() or _jit_tracing() is not None
            or _forward_ad._current_level >= 0 or (_function_modes() > 0 and _function_modes_other_than_device()))


def _within_storage(t) -> bool:
    """t is strided (not sparse or mkldnn), not a ZeroTensor (no memory behind it), and its storage holds every
    element its shape, strides and offset reach (a parameter whose storage was resized to 0, as FSDP frees one,
    does not), at an address. Read on a CPU tensor."""
    if t.layout != torch.strided or t._is_zerotensor():
        return False
    if t.numel() == 0:
        return True
    end = t.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    # and memory behind it (a functional tensor's wrapper has a storage of the right size at address 0)
    return end * t.element_size() <= t.untyped_storage().nbytes() and t.data_ptr() != 0


def _plain(*ts) -> bool:
    """Plain tensors (not subclasses: FakeTensor, a wrapper; not negated views, whose memory holds -x; within
    their storage) and nothing tracing the calls (:func:`_traced`)."""
    return all(type(t) is torch.Tensor and not t.is_neg() and _within_storage(t) for t in ts) and not _traced()


def plan(q, k, v, S, z, fm, inplace: bool, state_type: type):
    """The native step for the arguments of a decode step that passed the api's checks and picked the torch
    backend, or None when they are not eligible (builds the library on the first eligible call). Called once per
    api step key (lintx_triton.api._STEP_KEYS). Its runner checks per call every tensor property the checks and
    the plan read (types, shapes, dtypes, devices, contiguity; ``state_type``, the state's tuple or list) and
    what the key does not hold (that autograd has nothing to record, no tracer), and returns None when they do
    not hold: the api then checks and plans again, or takes the PyTorch path (:func:`set_enabled` clears the
    api's plans)."""
    if not _enabled or MAPS.get(fm.name) is None or fm is not _builtin(fm.name) or not _plain(q, k, v, S, z):
        return None
    f32 = torch.float32
    if any(t.device.type != "cpu" or t.dtype != f32 for t in (q, k, v, S, z)):
        return None
    fn = _load()
    if fn is None:
        return None
    B, H, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    if 0 in (B, H, D, HKV, DV):  # nothing to compute: the PyTorch path's empty results
        return None
    dims = (B, H, HKV, D, DV, MAPS[fm.name])
    team = _step_team if B * HKV * D * DV >= _STEP_SPLIT_MIN else None
    ext = _ext() if isinstance(fn, ctypes._CFuncPtr) else None  # (tests wrap fn in Python: the Python runner)
    if ext is not None:
        return ext.Runner(ctypes.cast(fn, ctypes.c_void_p).value, dims, inplace, state_type,
                          ctypes.cast(team, ctypes.c_void_p).value if team is not None else 0)
    return _runner(fn, dims, inplace, state_type, team)


def _builtin(name: str):
    from ..feature_maps import builtin

    return {"elu": builtin.ELU, "relu": builtin.RELU, "identity": builtin.IDENTITY}[name]


# causal.c's argument array, in the order of its enum (A_MODE ... A_DS0): dims, then each tensor's address and
# strides (B, T, head) in elements, then the states' addresses
_VIEWS = ("q", "k", "v", "o", "r", "do", "dq", "dk", "dv")
_CAUSAL_ARGS = ("mode", "B", "T", "H", "G", "M", "DV", "map", "normalize", "p0", "p1",
                *(f"{t}{s}" for t in _VIEWS for s in ("", "_sB", "_sT", "_sH")), "S0", "ST", "dST", "dS0")
_FORWARD, _BACKWARD = 0, 1
# multiply-adds of a call below which it runs on the calling thread alone: a pool's hand-off costs 20-50 us
_SPLIT_MIN = 1 << 21
_POOL = None  # (ThreadPoolExecutor, the pid that started it)


def _after_fork_in_child() -> None:
    """A child forked while another thread held _LOCK (a build, a pool's start) would wait on it for ever; the
    parent's OpenMP team is gone (GNU OpenMP's threads do not survive a fork: a parallel region there waits for them
    for ever), so the child splits nothing on it (runner.c forgets it too, in its own at-fork handler)."""
    global _LOCK, _POOL, _GOMP
    _LOCK, _POOL, _GOMP = threading.Lock(), None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool(workers: int):
    """A thread pool of at least ``workers`` threads, kept for the process (grown when a call needs more). A child
    forked after the pool started gets a new one: the parent's threads do not exist there, and a pool that
    thinks it has them would never run what it is given."""
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL[1] != os.getpid() or _POOL[0]._max_workers < workers:
            from concurrent.futures import ThreadPoolExecutor

            # an old pool is dropped, not shut down: another thread may be about to submit to it (its idle threads
            # leave once it is collected)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lintx_native"), os.getpid()
        return _POOL[0]


def causal_eligible(*xs) -> bool:
    """Whether :func:`causal_forward` and :func:`causal_backward` take these tensors: the native library on and
    built, plain CPU float32 tensors (nothing tracing them; builds the library on the first eligible call)."""
    if not _enabled or not _plain(*xs):
        return False
    if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in xs):
        return False
    return _load() is not None and _causal is not None


def fused_map(fm) -> bool:
    """Whether :func:`causal_forward` applies ``fm`` itself (a built-in elementwise map, :data:`MAPS`)."""
    return MAPS.get(fm.name) is not None and fm is _builtin(fm.name)


def _view(x) -> list:
    """A [B, T, heads(, W)] tensor as causal.c takes it: its address and its strides (B, T, head)."""
    return [0, 0, 0, 0] if x is None else [x.data_ptr(), *x.stride()[:3]]


def _unit(x):
    """x with a unit inner stride (causal.c reads rows as contiguous runs)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _openmp_parallel() -> int:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch's own parallel ops run on (the one loaded from
    torch's directory: torch/lib, or torch.libs beside it), or 0 (another parallel backend, or not found): looked
    up once. causal.c splits its heads on that runtime's team (lintx_causal_f32_team), whose threads spin for a
    while after each parallel torch op: a pool of its own would share the cores with them."""
    global _GOMP
    if _GOMP is None:
        _GOMP = 0
        try:
            if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
                return 0
            site = os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__)))
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "gomp" in line or "iomp" in line})
            for path in paths:
                rel = os.path.relpath(os.path.realpath(path), site)
                if rel.startswith(("torch" + os.sep, "torch.libs" + os.sep)):
                    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)  # the loaded copy, not a second one
                    _GOMP = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value or 0
                    break
        except (OSError, AttributeError, ValueError):  # no /proc, no such symbol: the pool instead
            _GOMP = 0
    return _GOMP


def _run(dims, views, states, scale: float, eps: float, work: int) -> None:
    """causal.c over the B H heads, split between ``torch.get_num_threads()`` threads when ``work`` (multiply-adds)
    is large (each share writes its own heads): on torch's OpenMP team where it has one (:func:`_openmp_parallel`),
    else on a pool of this module's (ctypes lets go of the GIL)."""
    B, H = dims[1], dims[3]
    items = B * H
    parts = max(1, min(torch.get_num_threads(), items)) if work >= _SPLIT_MIN else 1
    head = list(dims[:9])
    tail = [v for x in views for v in _view(x)] + [0 if t is None else t.data_ptr() for t in states]
    se = (ctypes.c_float * 2)(scale, eps)
    gomp = _openmp_parallel() if parts > 1 else 0
    if gomp:
        arr = (ctypes.c_int64 * len(_CAUSAL_ARGS))(*head, 0, items, *tail)
        failed = [True] if _causal_team(arr, se, ctypes.c_int64(gomp), ctypes.c_int64(parts)) else []
    else:
        failed = _run_on_pool([(ctypes.c_int64 * len(_CAUSAL_ARGS))(*head, items * i // parts,
                                                                    items * (i + 1) // parts, *tail)
                               for i in range(parts)], se)
    if failed:
        raise MemoryError("lintx_triton.native: causal.c's scratch could not be allocated")


def _run_on_pool(arrays, se) -> list:
    """causal.c on each of ``arrays`` (the first on this thread, the rest on the pool); -> [True] per share whose
    scratch could not be allocated. The tensors must outlive every share (the C reads and writes their memory):
    whatever leaves this function (an exception, KeyboardInterrupt) leaves it after the shares handed to the pool
    are done."""
    futures, failed = [], []

    def share(arr):
        if _causal(arr, se):
            failed.append(True)

    try:
        pool = _pool(len(arrays) - 1) if len(arrays) > 1 else None
        for i, arr in enumerate(arrays[1:], 1):
            try:
                futures.append(pool.submit(share, arr))
            except RuntimeError:  # no new threads (the interpreter is shutting down): the rest on this thread
                for rest in arrays[i:]:
                    share(rest)
                break
        share(arrays[0])
    finally:
        _wait_all(futures)
    return failed


def causal_forward(q, k, v, S0, fm=None, *, normalize: bool = True, scale: float = 1.0, eps: float = 1e-6,
                   want_r: bool = False):
    """The causal forward in C: ``q [B, T, H, M]``, ``k [B, T, HKV, M]``, ``v [B, T, HKV, DV]`` (CPU float32; H a
    multiple of HKV: query head h reads kv head h // (H / HKV)), ``S0 [B, H, M, DV + 1]`` (the state with z as
    its last column) or None (zeros) -> ``o [B, T, H, DV]``, ``r [B, T, H]`` (scale / den, for the backward:
    with ``want_r`` and ``normalize``, else None), ``S_T [B, H, M, DV + 1]``, all fp32.

    ``fm``: a built-in map (:func:`fused_map`) applied here to q and k; None: q and k are the features. Call only
    where :func:`causal_eligible` said yes."""
    q, k, v = _unit(q), _unit(k), _unit(v)
    B, T, H, M = q.shape
    HKV, DV = k.shape[2], v.shape[-1]
    if k.shape != (B, T, HKV, M) or v.shape[:3] != (B, T, HKV) or H % HKV:
        raise ValueError(f"causal_forward: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    if S0 is not None:
        if S0.shape != (B, H, M, DV + 1):
            raise ValueError(f"causal_forward: S0 {tuple(S0.shape)}, want {(B, H, M, DV + 1)}")
        S0 = S0.contiguous()
    o = q.new_empty(B, T, H, DV)
    r = q.new_empty(B, T, H) if want_r and normalize else None
    ST = q.new_empty(B, H, M, DV + 1)
    dims = (_FORWARD, B, T, H, H // HKV, M, DV, 0 if fm is None else MAPS[fm.name], int(normalize))
    _run(dims, (q, k, v, o, r, None, None, None, None), (S0, ST, None, None), scale, eps, B * T * H * M * DV)
    return o, r, ST


def causal_backward(a, b, v, S0, o, r, do, dST, fm=None, *, normalize: bool = True, scale: float = 1.0):
    """The causal backward in C, of :func:`causal_forward` (H = HKV): ``a, b [B, T, H, M]`` (q and k with a built-in
    map ``fm``, the features without), ``v [B, T, H, DV]``, ``S0`` as there (or None), ``o``, ``r`` its outputs (r
    None when not normalize), ``do [B, T, H, DV]`` the gradient of o, ``dST [B, H, M, DV + 1]`` that of S_T (or
    None: zeros) -> ``da, db [B, T, H, M]`` (the gradients of a and b: through phi' with ``fm``), ``dv [B, T, H,
    DV], dS0 [B, H, M, DV + 1]``, fp32. Call only where :func:`causal_eligible` said yes."""
    a, b, v, o, do = _unit(a), _unit(b), _unit(v), _unit(o), _unit(do)
    B, T, H, M = a.shape
    DV = v.shape[-1]
    if normalize and (r is None or r.shape != (B, T, H)):
        raise ValueError(f"causal_backward: normalize needs r [B, T, H] = {(B, T, H)} from the forward, got "
                         f"{None if r is None else tuple(r.shape)}")
    if b.shape != a.shape or v.shape != (B, T, H, DV) or do.shape != v.shape or o.shape != v.shape:
        raise ValueError(f"causal_backward: a {tuple(a.shape)}, b {tuple(b.shape)}, v {tuple(v.shape)}, o "
                         f"{tuple(o.shape)}, do {tuple(do.shape)} do not agree")
    S0 = None if S0 is None else S0.contiguous()
    dST = None if dST is None else dST.contiguous()
    da, db, dv = a.new_empty(B, T, H, M), a.new_empty(B, T, H, M), a.new_empty(B, T, H, DV)
    dS0 = a.new_empty(B, H, M, DV + 1)
    dims = (_BACKWARD, B, T, H, 1, M, DV, 0 if fm is None else MAPS[fm.name], int(normalize))
    _run(dims, (a, b, v, o, r if normalize else None, do, da, db, dv), (S0, None, dST, dS0), scale, 0.0,
         3 * B * T * H * M * DV)
    return da, db, dv, dS0


def _wait_all(futures) -> None:
    """Wait for every future, through interrupts (raised once all are done)."""
    from concurrent.futures import wait

    pending, interrupt = futures, None
    while pending:
        try:
            pending = wait(pending).not_done
        except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt: the C still holds the caller's memory)
            interrupt = interrupt or e
    if interrupt is not None:
        raise interrupt


def args(dims, pointers, scale: float, eps: float):
    """The arrays step.c's ``lintx_step_f32(a, se, normalize)`` takes: ``a`` = the six ``dims`` (B, H, HKV, D, DV,
    the map's code) then the eight addresses of q, k, v, S0, z0, S, z, o; ``se`` = (scale, eps)."""
    return (ctypes.c_int64 * 14)(*dims, *pointers), (ctypes.c_float * 2)(scale, eps)


# The runner is the hot path of a CPU decode loop: each of its lines is 0.1-1 us of Python (o's allocation 1.0, a
# tensor attribute 0.1, refilling the arrays 0.2, the ctypes call 0.4; twelve arguments converted by argtypes took
# 1.1) against a 4 us floor at B = 1 (bench/NOTES.md).
_grad_enabled = torch.is_grad_enabled
_bump = torch._C._increment_version  # the state changed in place: autograd's saved-tensor check must see it


def _fits(t, shape) -> bool:
    """t (a plain torch.Tensor) is a float32 CPU tensor of this shape, contiguous, not a negated view, within its
    storage: what the C may read and write as ``shape``'s elements from its address."""
    return (t.shape == shape and t.dtype is torch.float32 and t.is_cpu and _within_storage(t) and not t.is_neg()
            and t.is_contiguous())


# state elements (B HKV D DV) from which a step's kv heads split between torch.get_num_threads() threads (torch's
# OpenMP team, step.c's lintx_step_f32_team): at two threads, H = 8, D = DV = 64, the C step alone B = 8 (2^18)
# 25 -> 14 us, B = 16 58 -> 41 us; through the runner 41 -> 25 and 59 -> 48 us; B = 4 lost (15 -> 18 us: the team's
# start-up)
_STEP_SPLIT_MIN = 1 << 18


def _runner(fn, dims, inplace: bool, state_type: type, team=None):
    B, H, HKV, D, DV, _ = dims
    # every shape the api's checks passed, compared again per call with the types, dtypes, devices and contiguity:
    # the runner is also the api's fast path (lintx_triton.api._fast_step), which skips the checks and the key
    q_shape, k_shape, v_shape, S_shape, z_shape = (B, H, D), (B, HKV, D), (B, HKV, DV), (B, HKV, D, DV), (B, HKV, D)
    T = torch.Tensor
    # o: q.new_empty, never torch.empty, which follows torch's default dtype and device
    o_shape = (B, H, DV)
    # the arrays are per thread: ctypes lets go of the GIL during the call, so two threads may be inside at once
    local = threading.local()

    def run(q, k, v, state, normalize, scale, eps):
        """o (in place: the state updated), or (o, (S, z)) (functional: a new state); None: the arguments are not
        the ones this runner was planned for, or the PyTorch path must run (autograd, a tracer)."""
        if type(state) is not state_type or len(state) != 2 or _traced():  # a mode would answer the reads below
            return None
        S0, z0 = state
        if not (type(q) is T and type(k) is T and type(v) is T and type(S0) is T and type(z0) is T):
            return None
        nz = 1 if normalize else 0  # normalize's __bool__ (Python) before the reads, as runner.c
        grad = _grad_enabled()
        parts = min(torch.get_num_threads(), B * HKV) if team is not None else 1
        gomp = _openmp_parallel() if parts > 1 else 0
        # the reads, the outputs' allocation and the call with gc and torch function modes off (runner.c's
        # window: nothing may resize a tensor between its reads and the call)
        gc_on = gc.isenabled()
        gc.disable()
        try:
            with torch._C.DisableTorchFunction():
                ins = ((q, q_shape), (k, k_shape), (v, v_shape), (S0, S_shape), (z0, z_shape))
                if not all(_fits(t, shape) for t, shape in ins):
                    return None
                if grad and (q.requires_grad or k.requires_grad or v.requires_grad or S0.requires_grad
                             or z0.requires_grad):
                    return None
                o = q.new_empty(o_shape)
                S, z = (S0, z0) if inplace else (S0.new_empty(S_shape), z0.new_empty(z_shape))
                if not (_fits(o, o_shape) and _fits(S, S_shape) and _fits(z, z_shape)):
                    raise RuntimeError("lintx_triton.native: new_empty gave another tensor")
                try:
                    a, se = local.arrays
                except AttributeError:
                    a, se = local.arrays = args(dims, (0,) * 8, 0.0, 0.0)
                a[6:14] = (q.data_ptr(), k.data_ptr(), v.data_ptr(), S0.data_ptr(), z0.data_ptr(), S.data_ptr(),
                           z.data_ptr(), o.data_ptr())
                se[0] = scale
                se[1] = eps
                if team(a, se, nz, ctypes.c_int64(gomp), ctypes.c_int64(parts)) if gomp else fn(a, se, nz):
                    raise MemoryError("lintx_triton.native: the decode step's scratch could not be allocated")
        finally:
            if gc_on:
                gc.enable()
        if inplace:
            _bump(state)
            return o
        return o, (S, z)

    return run


# linear.c's argument array, in the order of its enum (L_M ... L_Y)
_LINEAR_ARGS = ("M", "N", "K", "x", "ldx", "w", "b", "y", "ldy")
# multiply-adds from which linear() splits y's columns between torch.get_num_threads() threads (torch's OpenMP
# team): at two threads 4 rows of 512 x 512 (1 M) gained nothing from a split, 8 rows lost to MKL's two threads
_LINEAR_SPLIT_MIN = 1 << 21
# rows up to which linear() runs linear.c: a decode step's one token per sequence. At 16 rows of 512 it took 63-75 %
# of the FMA peak against MKL's 50-58 %; a prefill's thousands of rows are MKL's (bench/NOTES.md)
LINEAR_MAX_ROWS = 32
_PARAMETER = torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_autocast = torch.is_autocast_enabled


def _linear_checked(x, weight, bias, grad: bool, threads: int):
    """The Python path of :func:`linear` from its reads of the tensors on (within its window): y, or None."""
    ts = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.float32 or not t.is_cpu or not _within_storage(t) or t.is_neg() for t in ts):
        return None  # a negated view's memory holds -x
    if x.dim() != 2 or weight.dim() != 2:
        return None
    (M, K), N = x.shape, weight.shape[0]
    if not (0 < M <= LINEAR_MAX_ROWS and K > 0 and N > 0 and weight.shape[1] == K and (x.stride(1) == 1 or K == 1)
            and weight.is_contiguous()):
        return None
    if bias is not None and not (bias.shape == (N,) and bias.is_contiguous()):
        return None
    if grad and any(t.requires_grad for t in ts):
        return None
    y = x.new_empty(M, N)
    if not _fits(y, (M, N)):
        raise RuntimeError("lintx_triton.native.linear: x.new_empty gave another tensor")
    a = (ctypes.c_int64 * len(_LINEAR_ARGS))(M, N, K, x.data_ptr(), x.stride(0), weight.data_ptr(),
                                             0 if bias is None else bias.data_ptr(), y.data_ptr(), N)
    parts = min(threads, (N + 3) // 4) if M * N * K >= _LINEAR_SPLIT_MIN else 1
    gomp = _openmp_parallel() if parts > 1 else 0
    if gomp:
        _linear_team(a, ctypes.c_int64(gomp), ctypes.c_int64(parts))
    else:
        _linear(a)
    return y


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` (nn.Linear's ``F.linear``) in linear.c for a decode step's few rows, or None when the
    arguments are not eligible (the caller then runs torch's): ``x`` [M, K] with M <= :data:`LINEAR_MAX_ROWS` and
    unit column stride, ``weight`` [N, K] and ``bias`` [N] (or None) contiguous, all CPU float32 tensors or
    parameters (not negated views), nothing for autograd to record, no tracer, mode, CPU autocast or
    ``torch.compile``, the native code on and built.

    Examples::

        >>> import torch, lintx_triton as lx
        >>> proj = torch.nn.Linear(64, 32)
        >>> x = torch.randn(4, 64)
        >>> with torch.no_grad():
        ...     y = lx.native.linear(x, proj.weight, proj.bias)
        >>> y is None or torch.allclose(y, proj(x), atol=1e-5)
        True
    """
    if not _enabled or _linear is None and _load() is None:
        return None
    if _EXT is None and _traced():  # runner.c is built (and checked) at a call outside any mode or tracer
        return None
    ext = _EXT if _EXT is not None else _ext()
    if ext:  # the same checks and call in C (runner.c's linear): a tiny call 6.3 -> 2.5 us (bench/NOTES.md)
        return ext.linear(x, weight, bias)
    plain = (torch.Tensor, _PARAMETER)
    if type(x) is not torch.Tensor or type(weight) not in plain or (bias is not None and type(bias) not in plain):
        return None
    if _traced() or _is_compiling() or _autocast("cpu"):  # a mode first: it would answer the reads below
        return None  # autocast would give F.linear another dtype
    grad, threads = _grad_enabled(), torch.get_num_threads()
    gc_on = gc.isenabled()
    gc.disable()  # from the reads to the call, as runner.c's window: nothing may resize a tensor in between
    try:
        with torch._C.DisableTorchFunction():
            y = _linear_checked(x, weight, bias, grad, threads)
    finally:
        if gc_on:
            gc.enable()
    return y
