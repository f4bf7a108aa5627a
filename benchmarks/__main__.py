"""Run every ``benchmarks/bench_*.py`` and rewrite BENCHMARKS.md.

    python -m benchmarks            # all benchmarks
    python -m benchmarks spectral   # only modules whose name contains "spectral"

Each module defines ``TITLE`` and ``run() -> str`` (a markdown section with its table).
Figures are side-by-side ratios measured in this one process.
"""

from __future__ import annotations

import importlib
import pkgutil
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def main(argv: list[str]) -> int:
    pattern = argv[0] if argv else ""
    names = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_") and pattern in m.name
    )
    sections = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}: {module.TITLE}", flush=True)
        start = time.perf_counter()
        body = module.run()
        took = time.perf_counter() - start
        print(body, flush=True)
        sections.append(
            f"## {module.TITLE}\n\n`python -m benchmarks {name[6:]}` "
            f"({took:.0f} s)\n\n{body.strip()}\n"
        )
    if pattern:
        _merge(sections, names)
    else:
        _write(sections)
    return 0


def _header() -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        "# Benchmarks\n\nRewritten by `python -m benchmarks` (run from the repository root "
        "with the `.[all,test]` install). Every figure is a side-by-side ratio measured in one "
        f"process.\n\nMachine: {machine()}\n\nLast run: {stamp}\n"
    )


def _write(sections: list[str]) -> None:
    (ROOT / "BENCHMARKS.md").write_text(_header() + "\n" + "\n".join(sections))


def _merge(sections: list[str], names: list[str]) -> None:
    """Replace only the sections that were rerun, keeping the others."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    kept = {}
    for chunk in old.split("\n## ")[1:]:
        title = chunk.split("\n", 1)[0]
        kept[title] = "## " + chunk.rstrip() + "\n"
    for name, section in zip(names, sections):
        kept[importlib.import_module(f"benchmarks.{name}").TITLE] = section
    _write(list(kept.values()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
