"""The README's quickstart runs as printed."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    code = re.search(r"## Quickstart\n.*?```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README quickstart", "exec"), {})
    numbers = out.getvalue().split()
    assert numbers, "the quickstart prints its results"
