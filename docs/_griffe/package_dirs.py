"""A griffe extension for the API reference.

- The subpackages that pyproject.toml maps from other folders (``[tool.setuptools.package-dir]``,
  e.g. ``curvlab.adapters`` from ``adapters/``) are loaded from there and attached under
  ``curvlab``, as an installed wheel lays them out; griffe, which reads the source tree,
  would otherwise see no ``curvlab.adapters``.
- Sphinx roles in docstrings (``:class:`~curvlab.rmt.BulkFit```) become inline code
  (``BulkFit``), which Markdown renders; the roles would otherwise show as literal text.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import griffe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the docs extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc|const):`(~?)([^`]+)`")


def _mapped_subpackages(top: str) -> dict[str, Path]:
    """``{"adapters": ROOT / "adapters", ...}`` for the subpackages of ``top`` that live in
    another folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {
        name.split(".", 1)[1]: ROOT / folder
        for name, folder in mapping.items()
        if name.startswith(top + ".") and "." not in name.split(".", 1)[1]
    }


def _inline(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _plain_roles(obj: griffe.Object) -> None:
    """Rewrite the Sphinx roles of ``obj``'s docstring and its members', recursively."""
    if obj.docstring is not None:
        obj.docstring.value = _ROLE.sub(_inline, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _plain_roles(member)


class PackageDirs(griffe.Extension):
    """Attach the mapped subpackages to ``curvlab`` once it is loaded; plain roles."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "curvlab":
            return
        for name, folder in _mapped_subpackages(pkg.name).items():
            sub = loader.load(folder, try_relative_path=False)
            loader.modules_collection.del_member(sub.name)
            sub.name = name
            sub.parent = pkg
            pkg.set_member(name, sub)
        _plain_roles(pkg)
