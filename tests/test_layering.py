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
