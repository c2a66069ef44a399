"""The package's import layers, read from the source with ``ast`` (nothing is imported to read them).

Data flows one way: feature maps and spec, then codegen, then configs, then ops, then the public API,
then the front ends (nn, distributed, cli). A module-level import may point into its own layer or a
lower one, never up; the imports as a whole form no circle. ``testing`` and ``compile_report`` stand
beside the layers: they may import what lies below the public API, and only the command line, the
tuner, bench/ and tests/ import them. The tuner (``autotune/``, installed as ``lintx_triton.autotune``)
may import anything; the core imports it only inside the two functions where a user asked to tune.

An edge is an explicit import, with relative imports resolved and ``from package import submodule``
pointing at the submodule; the implicit import of a parent package's ``__init__`` is not an edge (it
would route every module through ``lintx_triton/__init__.py``). A new module must be added to the table.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_DIR = ROOT / "lintx_triton"
TUNER_DIR = ROOT / "autotune"  # lintx_triton/autotune is a symlink to it
TUNER = "lintx_triton.autotune"

# Bottom first. A name covers its submodules, but for the package itself (lintx_triton: its __init__).
LAYERS = [
    ("feature maps and spec", ("lintx_triton.feature_maps", "lintx_triton.spec")),
    ("codegen", ("lintx_triton.codegen",)),
    ("configs", ("lintx_triton.tuned_configs", "lintx_triton.config")),
    # the backends: the Triton ops, the PyTorch reference / chunked path, the native CPU decode step
    ("ops", ("lintx_triton.ops", "lintx_triton.reference", "lintx_triton.native")),
    # hybrid: LoLCATs' window hybrid, its reference, torch path and the entry points api.py hands window= to
    ("public API", ("lintx_triton.api", "lintx_triton.hybrid", "lintx_triton")),
    ("front ends", ("lintx_triton.nn", "lintx_triton.distributed", "lintx_triton.cli", "lintx_triton.__main__")),
]
API_LAYER = "public API"
# Beside the layers: each may import what lies below the public API.
BESIDE = ("lintx_triton.testing", "lintx_triton.compile_report")
# Who may import a module beside the layers (bench/ and tests/ too: they are not read here).
BESIDE_USERS = ("lintx_triton.cli", TUNER)
# The only places where the core imports the tuner, inside these functions: where a user asked to tune.
SANCTIONED = {
    ("lintx_triton.config", "_tuned"): "LINTX_TRITON_ONLINE_TUNE=1 tunes a call's shape",
    ("lintx_triton.cli", "autotune_command"): "the `lintx autotune` command",
}
# Module-level imports that break a rule today, each with why it is kept; an entry the code no longer
# needs fails the test, so the list only shrinks.
KNOWN_VIOLATIONS = {
    ("lintx_triton", "lintx_triton.distributed"): "lx.distributed, public: the package re-exports a front end",
    ("lintx_triton", "lintx_triton.nn"): "lx.nn, public: the package re-exports a front end",
    ("lintx_triton.testing", "lintx_triton.api"): "the checks run the public functions they check",
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module, resolved
    line: int
    function: str | None  # the enclosing function's qualified name; None at module level (class bodies too)


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(CORE_DIR.rglob("*.py")):
        rel = path.relative_to(CORE_DIR)
        if rel.parts[0] == "autotune" or "__pycache__" in rel.parts:
            continue  # the tuner is read from its source folder below
        files[_name(("lintx_triton", *rel.parts))] = path
    for path in sorted(TUNER_DIR.glob("*.py")):
        files[_name((*TUNER.split("."), path.name))] = path
    return files


def _name(parts: tuple[str, ...]) -> str:
    parts = (*parts[:-1], parts[-1].removesuffix(".py"))
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = _module_files()


def _imports(module: str, path: Path) -> list[Import]:
    """Every import in ``module``'s source, to the modules it names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend(Import(module, a.name, child.lineno, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parent + ([child.module] if child.module else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(module, sub if sub in MODULES else base, child.lineno, function))
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                name = getattr(child, "name", "<lambda>")
                inner = f"{function}.{name}" if function else name
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), None)
    return out


IMPORTS = [i for m, p in MODULES.items() for i in _imports(m, p)]
OURS = [i for i in IMPORTS if i.target in MODULES or i.target.split(".")[0] == "autotune"]


def _is_tuner(module: str) -> bool:
    return module == TUNER or module.startswith(TUNER + ".")


def _layer(module: str) -> int | None:
    for i, (_, names) in enumerate(LAYERS):
        if any(module == n or (n != "lintx_triton" and module.startswith(n + ".")) for n in names):
            return i
    return None


def _where(i: Import) -> str:
    return f"{MODULES[i.importer].relative_to(ROOT)}:{i.line} imports {i.target}"


def test_every_module_is_in_the_table():
    beside = [m for m in MODULES if m in BESIDE]
    assert len(beside) == len(BESIDE), f"a module beside the layers is gone: {sorted(set(BESIDE) - set(beside))}"
    unknown = [m for m in MODULES if not _is_tuner(m) and m not in BESIDE and _layer(m) is None]
    assert not unknown, f"add {unknown} to LAYERS or BESIDE in tests/test_layers.py"


def test_no_import_circle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in OURS:
        if i.function is None and i.target in MODULES and i.target != i.importer:
            graph[i.importer].add(i.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_nothing_imports_the_top_level_name_autotune():
    """It installs as lintx_triton.autotune only (PyPI's `autotune` is another package): in the package, the
    tuner, tests, bench and examples, no import of it and no command or child process that runs it."""
    files = list(MODULES.values()) + sorted(p for d in ("tests", "bench", "examples") for p in (ROOT / d).glob("*.py"))
    command = re.compile(r"(^|[\s\"'])(-m\s+autotune|from\s+autotune|import\s+autotune)\b")
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if any(n.split(".")[0] == "autotune" for n in names) or command.search(text):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    for path in sorted((ROOT / "bench").glob("*.sh")):
        bad += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                if command.search(line)]
    assert not bad, f"use lintx_triton.autotune: {bad}"


def test_the_core_imports_the_tuner_only_where_a_user_asked_to_tune():
    bad = []
    for i in OURS:
        if _is_tuner(i.importer) or not _is_tuner(i.target):
            continue
        if i.function is None:
            bad.append(f"{_where(i)} at module level")
        elif (i.importer, i.function) not in SANCTIONED:
            bad.append(f"{_where(i)} in {i.function}(), not one of {sorted(SANCTIONED)}")
    assert not bad, "\n".join(bad)


def test_layers():
    api = [n for n, _ in LAYERS].index(API_LAYER)
    bad, seen = [], set()
    for i in OURS:
        a, b = i.importer, i.target
        if b not in MODULES or a == b or _is_tuner(a):
            continue
        if b in BESIDE:  # at any level: a lazy import is still a dependency on it
            if not any(a == u or a.startswith(u + ".") for u in BESIDE_USERS):
                bad.append(f"{_where(i)}: only {BESIDE_USERS}, bench and tests may import {b}")
            continue
        if i.function is not None:
            continue
        if _is_tuner(b) or _layer(b) is None or (a not in BESIDE and _layer(a) is None):
            continue  # the tuner test and test_every_module_is_in_the_table say why
        if a in BESIDE:
            ok = _layer(b) < api
            rule = f"{a} stands beside the layers: it may import only below the {API_LAYER}"
        else:
            ok = _layer(b) <= _layer(a)
            rule = f"{LAYERS[_layer(a)][0]} may not import up into {LAYERS[_layer(b)][0]}"
        if ok:
            continue
        if (a, b) in KNOWN_VIOLATIONS:
            seen.add((a, b))
            continue
        bad.append(f"{_where(i)}: {rule}")
    stale = set(KNOWN_VIOLATIONS) - seen
    assert not stale, f"these imports are gone: delete them from KNOWN_VIOLATIONS: {sorted(stale)}"
    assert not bad, "\n".join(bad)


def test_the_runtime_does_not_load_the_tuner():
    """A call, the tuned-config lookup, the checks and the compile report leave the tuner unimported."""
    code = """if True:
        import sys
        import lintx_triton as lx
        from lintx_triton import compile_report, testing, tuned_configs
        spec = lx.KernelSpec("elu", True, True, "bfloat16", 64, 64, False, False)
        assert lx.config_for(spec, 8, 128, "cpu").source == "heuristic"
        tuned_configs.lookup(spec, 8, 128, kernel="forward", gpu_name="NVIDIA H200", capability=(9, 0))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "autotune" or m.startswith("lintx_triton.autotune"))
        assert not loaded, loaded
        """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
