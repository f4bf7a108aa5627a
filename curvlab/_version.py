"""The one place curvlab's version is written: the package metadata (pyproject.toml reads it
as a dynamic field) and ``curvlab.__version__`` both come from here."""

__version__ = "0.1.0"
