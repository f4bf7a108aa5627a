"""Both an editable install and a built wheel provide curvlab.adapters and curvlab.experiments;
the wheel ships py.typed, the license and exactly the source modules under one version;
``import curvlab`` works with only the core dependencies.

The wheel is built from a copy of the sources in a temporary folder: building in the checkout
would leave build/ and *.egg-info there, and a stale build/ ships deleted modules into the next
wheel.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import curvlab

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("backpack", "pyhessian", "curvlinops", "sklearn", "matplotlib", "tqdm", "kfac")
#: Never copied into the build folder: version control, environments, build and test output.
NOT_SOURCES = (
    ".git",
    ".venv",
    "build",
    "dist",
    "site",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "out",
    "curvlab-tour",
)
#: Where each package of the wheel lives in the checkout (pyproject's package-dir).
PACKAGE_DIRS = {
    "curvlab": "curvlab",
    "curvlab/adapters": "adapters",
    "curvlab/experiments": "experiments",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built without build isolation from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES), symlinks=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(source),
        ],
        check=True,
        cwd=tmp,
    )
    return next((tmp / "dist").glob("curvlab-*.whl"))


def _source_modules() -> set[str]:
    """Wheel paths of the .py files the checkout's packages hold."""
    modules = set()
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            relative = path.relative_to(base)
            if "__pycache__" in relative.parts:
                continue
            # a subfolder that is a package of its own is listed under its own entry
            if (package + "/" + relative.parts[0]) in PACKAGE_DIRS:
                continue
            modules.add(f"{package}/{relative.as_posix()}")
    return modules


def test_version_has_one_source():
    assert curvlab.__version__ == importlib.metadata.version("curvlab")
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "curvlab._version.__version__" in text


def test_editable_install_provides_subpackages(tmp_path):
    code = "import curvlab.adapters.autograd, curvlab.experiments; print(curvlab.adapters.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    assert str(ROOT / "adapters") in out.stdout


def test_wheel_ships_the_sources_py_typed_license_and_version(wheel):
    name, version = wheel.name.split("-")[:2]
    assert (name, version) == ("curvlab", curvlab.__version__)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"curvlab-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {curvlab.__version__}\n" in metadata
    assert "curvlab/py.typed" in names
    assert any(n.startswith(f"curvlab-{version}.dist-info/") and "LICENSE" in n for n in names)
    shipped = {n for n in names if n.endswith(".py")}
    assert shipped == _source_modules()


def test_wheel_provides_subpackages_and_runs_as_a_module(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); "
        "import curvlab, curvlab.adapters.autograd, curvlab.experiments, curvlab.spectral; "
        f"assert curvlab.adapters.__file__.startswith({str(target)!r}), curvlab.adapters.__file__; "
        f"assert curvlab.experiments.__file__.startswith({str(target)!r})"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "curvlab", "--version"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == f"curvlab {curvlab.__version__}\n"


def test_import_with_only_core_dependencies(tmp_path):
    """A site-packages holding everything except the optional backends and curvlab's install."""
    site = Path(sysconfig.get_paths()["purelib"])
    core = tmp_path / "core-site"
    core.mkdir()
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if stem in OPTIONAL or "curvlab" in entry.name.lower() or entry.suffix == ".pth":
            continue
        os.symlink(entry, core / entry.name)
    os.symlink(ROOT / "curvlab", core / "curvlab")
    code = (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
        f"sys.path.insert(0, {str(core)!r}); "
        "import importlib.util as u; assert u.find_spec('backpack') is None; "
        "import curvlab; info = curvlab.backends(); print(info); "
        "assert info['autograd'].available; "
        "assert not info['backpack'].available and info['backpack'].extra == 'backpack'; "
        "assert \"curvlab[kfac]\" in info['kfac'].install_hint"
    )
    subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, check=True)
