"""Both an editable install and a built wheel provide curvlab.adapters and curvlab.experiments;
``import curvlab`` works with only the core dependencies."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("backpack", "pyhessian", "curvlinops", "sklearn", "matplotlib", "tqdm", "kfac")


def test_editable_install_provides_subpackages(tmp_path):
    code = "import curvlab.adapters.autograd, curvlab.experiments; print(curvlab.adapters.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    assert str(ROOT / "adapters") in out.stdout


def test_wheel_provides_subpackages(tmp_path):
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
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("curvlab-*.whl"))
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
