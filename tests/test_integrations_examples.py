"""Every script in examples/ runs at a tiny size, and the library it drives applied the
damper's value at every step (each script checks that in its loop and prints the verdict).

The scripts run in a fresh process from a temporary folder (nothing is written into the
checkout); a script whose library is missing is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: script -> (the library whose damping the damper drives, the modules it needs)
SCRIPTS = {
    "kfac_pytorch_damping.py": ("kfac-pytorch", ("kfac", "sklearn")),
    "asdl_damping.py": ("ASDL", ("asdl", "sklearn")),
    "curvlinops_damping.py": ("curvlinops", ("curvlinops", "sklearn")),
    "curvlab_kfac.py": ("KFAC", ("curvlinops", "sklearn")),
    "adam_learned_eps.py": ("Adam", ("sklearn",)),
}


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_and_its_library_follows_the_damper(script, tmp_path):
    library, needs = SCRIPTS[script]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}, which is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(EXAMPLES / script), "--tiny"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"{library} applied the damper's value at every step: True" in text, text
    updates = int(re.search(r"damper updates (\d+)", text).group(1))
    distinct = int(re.search(r"distinct dampings used (\d+)", text).group(1))
    loss = float(re.search(r"mean loss of the last \d+ steps (\S+)", text).group(1))
    assert updates == 4 and distinct >= 2, text  # --tiny: 40 steps, an update every 10
    assert math.isfinite(loss), text
    assert list(tmp_path.iterdir()) == []  # the scripts write nothing unless asked
