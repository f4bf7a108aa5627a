"""The test suite's own layout (issue 17, item 10): helpers are imported from tests/helpers.py,
conftest.py holds fixtures only, so no test module imports conftest."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imports_conftest(source: str) -> bool:
    return bool(re.search(r"^\s*(from conftest import|import conftest)\b", source, re.M))


def test_no_test_module_imports_conftest():
    offenders = [p.name for p in sorted(TESTS.glob("*.py")) if _imports_conftest(p.read_text())]
    assert offenders == [], "import shared helpers from tests/helpers.py instead"


def test_conftest_defines_fixtures_only():
    tree = ast.parse((TESTS / "conftest.py").read_text())
    defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    plain = [n.name for n in defined
             if not any("fixture" in ast.unparse(d) for d in n.decorator_list)]
    assert defined and plain == []


def test_the_scan_sees_both_import_forms():
    assert _imports_conftest("import torch\nfrom conftest import make_model\n")
    assert _imports_conftest("def f():\n    import conftest\n")
    assert not _imports_conftest("from helpers import make_model  # not conftest\n")
