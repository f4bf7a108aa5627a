"""Every Examples block in curvlab's modules runs (doctest), under the installed names."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

#: Modules whose examples need a backend package that may be missing, by import name.
OPTIONAL = {
    "curvlab.adapters.backpack": "backpack",
    "curvlab.adapters.pyhessian": "pyhessian",
    "curvlab.adapters.kfac": "curvlinops",
    "curvlab.adapters.asdl": "asdl",
    "curvlab.adapters.kfac_pytorch": "kfac",
}


def _modules() -> list[str]:
    """curvlab and its installed subpackages (adapters/ and experiments/ live in their own
    folders and are installed as curvlab.adapters and curvlab.experiments)."""
    import curvlab.adapters
    import curvlab.experiments

    names = []
    for package in (curvlab, curvlab.adapters, curvlab.experiments):
        prefix = package.__name__ + "."
        names += [i.name for i in pkgutil.walk_packages(package.__path__, prefix=prefix)]
    return sorted(n for n in set(names) if not n.endswith("__main__"))


@pytest.mark.parametrize("name", _modules())
def test_examples_run(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
