"""The registry: lazy resolution, honest availability, and the README's table."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import curvlab
from curvlab.registry import capability_table, get_spec, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_backends_report_availability_and_capabilities():
    info = curvlab.backends()
    assert {"autograd", "backpack", "pyhessian", "kfac", "kfac-pytorch"} <= set(info)
    assert info["autograd"].available and info["autograd"].extra is None
    for name, entry in info.items():
        spec = get_spec(name)
        assert entry.available == all(importlib.util.find_spec(m) for m in spec.requires)
        if not entry.available:
            assert entry.install_hint
        assert "matvec" in entry.capabilities or name == "kfac-pytorch"


def test_kfac_pytorch_absent_says_how_to_install():
    if importlib.util.find_spec("kfac") is not None:
        pytest.skip("kfac-pytorch is installed here")
    entry = curvlab.backends()["kfac-pytorch"]
    assert not entry.available
    assert "kfac-pytorch" in entry.install_hint and "damping" in entry.install_hint


@pytest.mark.parametrize("name", ["autograd", "backpack", "pyhessian", "kfac"])
def test_declared_capabilities_match_the_adapter(name):
    spec = get_spec(name)
    if not spec.available():
        pytest.skip(f"{name} not installed")
    cls = resolve(name)
    assert cls.base_capabilities == spec.capabilities
    assert cls.supported_curvatures == spec.curvatures
    assert cls.backend == name


def test_readme_table_equals_registry():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- capability-table -->\n(.*?)\n<!-- /capability-table -->", readme, re.S)
    assert table is not None
    assert table.group(1).strip() == capability_table().strip()


def test_listing_backends_imports_no_backend_package():
    code = (
        "import sys, curvlab; curvlab.backends(); "
        "bad = [m for m in ('backpack', 'pyhessian', 'curvlinops', 'sklearn', 'matplotlib', "
        "'curvlab.adapters.backpack', 'curvlab.adapters.pyhessian', 'curvlab.adapters.kfac') "
        "if m in sys.modules]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci and "ruff check" in ci
