"""Layering (DESIGN.md section 2): the core never imports an adapter or a backend package.

Arrows point one way, ``experiments -> adapters -> curvlab core``: the registry reaches
adapters by name (``"module:Class"`` strings resolved on first use), so no module under
``curvlab/`` may import ``curvlab.adapters`` (or the top-level ``adapters`` folder), and
importing every core module loads no adapter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import curvlab

CORE = Path(curvlab.__file__).resolve().parent
ADAPTERS = ("curvlab.adapters", "adapters")


def _core_modules() -> list[str]:
    names = []
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _adapter_imports(source: str, label: str) -> list[str]:
    """``import``/``from ... import`` statements in ``source`` that name an adapter module,
    anywhere in the file (module level or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(source, label)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            if any(module == a or module.startswith(a + ".") for a in ADAPTERS):
                found.append(f"{label}:{node.lineno} imports {module}")
                break
    return found


def test_no_core_module_imports_an_adapter():
    offenders = [
        hit
        for path in sorted(CORE.rglob("*.py"))
        for hit in _adapter_imports(path.read_text(), str(path.relative_to(CORE.parent)))
    ]
    assert offenders == [], "the core must reach adapters through the registry:\n" + "\n".join(
        offenders
    )


def test_the_scan_finds_lazy_and_aliased_imports():
    # the check above can fail: imports inside functions and `from curvlab import adapters`
    lazy = "def f():\n    from curvlab.adapters import kfac as backend\n    return backend\n"
    assert _adapter_imports(lazy, "lazy.py") == ["lazy.py:2 imports curvlab.adapters"]
    aliased = "import torch\nfrom curvlab import adapters\n"
    assert _adapter_imports(aliased, "aliased.py") == ["aliased.py:2 imports curvlab.adapters"]
    assert _adapter_imports("from curvlab import kronecker\n", "ok.py") == []


def test_importing_every_core_module_loads_no_adapter():
    modules = _core_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    if name != 'curvlab.__main__':\n"
        "        importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('curvlab.adapters') "
        "or m == 'adapters' or m.startswith('adapters.'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert "curvlab.kronecker" in modules and "curvlab.optim.kfac" in modules


# ---------------------------------------------------------------------- import cycles
def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(source: str, name: str, is_package: bool, known: set[str], lazy: bool) -> set[str]:
    """The modules of ``known`` that module ``name`` imports when it runs: at module level
    (class bodies included), and with ``lazy`` also inside functions; never under
    ``if TYPE_CHECKING:`` (annotations only). ``from pkg import sub`` names the submodule."""
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if _is_type_checking(node):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join(package + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            for child in ("body", "orelse", "finalbody", "handlers"):
                if isinstance(getattr(node, child, None), list):
                    visit(getattr(node, child))

    visit(ast.parse(source).body)
    return (found & known) - {name}


def _graph(lazy: bool) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}
    known = set(paths)
    return {
        name: _imported(p.read_text(), name, p.name == "__init__.py", known, lazy)
        for name, p in paths.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_core_modules_import_each_other_without_a_cycle():
    """What runs at import time forms no cycle, so every core module imports on its own."""
    graph = _graph(lazy=False)
    assert "curvlab.estimator" in graph["curvlab.registry"]  # the scan sees imports
    assert _cycles(graph) == []


def test_noise_duck_types_the_estimator():
    """The estimator calls curvlab.noise (lazily, from its noise_variance method); noise reads
    any object with the estimator's attributes and never imports curvlab.estimator, even
    inside a function (a type-only import is allowed)."""
    graph = _graph(lazy=True)
    assert "curvlab.noise" in graph["curvlab.estimator"]
    assert "curvlab.estimator" not in graph["curvlab.noise"]
    assert not any("curvlab.noise" in c and "curvlab.estimator" in c for c in _cycles(graph))


def test_the_cycle_scan_can_fail():
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    a = "from pkg import b\n"
    b = "import math\ndef f():\n    from pkg.a import x\n"
    c = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n"
    assert _imported(a, "pkg.a", False, known, lazy=False) == {"pkg.b"}
    assert _imported(b, "pkg.b", False, known, lazy=False) == set()
    assert _imported(b, "pkg.b", False, known, lazy=True) == {"pkg.a"}
    assert _imported(c, "pkg.c", False, known, lazy=True) == set()
    assert _imported("from . import a\nfrom .b import y\n", "pkg.c", False, known,
                     lazy=False) == {"pkg.a", "pkg.b"}
    assert _cycles({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}) == [
        ["pkg.a", "pkg.b"]
    ]
    assert _cycles({"pkg.a": {"pkg.b"}, "pkg.b": set()}) == []
