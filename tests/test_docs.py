"""The documentation: every guide's Python examples run as printed, and the API reference
covers every public module (the site itself is built with warnings as errors in .ci/run).

Fenced ```python blocks of a page run in order in one namespace; ```py blocks are shown but
not run (they need a package CI lacks, such as kfac-pytorch, or a loader of the reader's).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())
#: The modules whose reference the site must hold.
PUBLIC_MODULES = (
    "curvlab",
    "curvlab.operators",
    "curvlab.spectral",
    "curvlab.noise",
    "curvlab.damping",
    "curvlab.shrinkage",
    "curvlab.optim",
    "curvlab.rmt",
    "curvlab.progress",
    "curvlab.registry",
    "curvlab.plotting",
    "curvlab.model_view",
    "curvlab.losses",
    "curvlab.validation",
    "curvlab.kronecker",
)


def _python_blocks(text: str) -> str:
    return "\n".join(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page, monkeypatch, tmp_path):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    code = compile(_python_blocks(page.read_text()), str(page), "exec")
    printed = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(printed):
        exec(code, {"__name__": "docs_example"})
    assert printed.getvalue().strip(), f"{page.name}: the examples print their results"


def _documented() -> set[str]:
    names = set()
    for page in (DOCS / "api").glob("*.md"):
        names.update(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M))
    return names


def test_api_reference_covers_every_public_module_and_adapter():
    adapters = {
        f"curvlab.adapters.{p.stem}"
        for p in (ROOT / "adapters").glob("*.py")
        if not p.stem.startswith("_")
    }
    missing = (set(PUBLIC_MODULES) | adapters) - _documented()
    assert not missing, f"add an API page (docs/api/NAME.md with '::: NAME') for {missing}"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert {p for p in pages if f": {p}\n" not in nav} == set()
