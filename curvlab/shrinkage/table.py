"""The tidy table ``compare`` returns: records, a mean ± standard error summary, CSV, pandas
and a plot with error bars.

A :class:`Comparison` is a list of records (one dict per batch size, repeat and
estimator), so it iterates, indexes and ``len``s like the list it is; its methods add the
summary over repeats and the outputs. pandas and matplotlib are optional: only
:meth:`Comparison.to_pandas` and :func:`plot` import them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curvlab.errors import BackendUnavailableError, InvalidInputError

#: the metrics summarised by default (every numeric field of the records otherwise)
METRICS = ("frobenius", "relative_frobenius", "spectral", "shrinkage", "damping", "seconds")
_LABELS = {"frobenius": "||H_hat - H||_F^2 / P", "spectral": "||H_hat - H||_2",
           "relative_frobenius": "||H_hat - H||_F / ||H||_F"}


def summarize(records: Iterable[dict], metrics: Iterable[str] | None = None) -> list[dict]:
    """Mean and standard error over repeats, per batch size, estimator and metric.

    Parameters
    ----------
    records : iterable of dict
        Records with ``batch_size``, ``estimator`` and numeric metric fields.
    metrics : iterable of str, optional
        The fields to summarise (default :data:`METRICS` where present).

    Returns
    -------
    list of dict
        Tidy rows ``{batch_size, estimator, metric, mean, stderr, n}``; ``stderr`` is the
        sample standard deviation over the n repeats divided by sqrt(n) (NaN for n = 1).
        Missing values (None) are left out of ``n``.

    Examples
    --------
    >>> rows = summarize([{"batch_size": 4, "estimator": "raw", "frobenius": 1.0},
    ...                   {"batch_size": 4, "estimator": "raw", "frobenius": 3.0}])
    >>> rows[0]["mean"], round(rows[0]["stderr"], 3), rows[0]["n"]
    (2.0, 1.0, 2)
    """
    records = list(records)
    if metrics is None:
        metrics = [m for m in METRICS if any(m in r for r in records)]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["batch_size"], r["estimator"]), []).append(r)
    rows = []
    for (batch_size, name), members in groups.items():
        for metric in metrics:
            values = [float(r[metric]) for r in members if r.get(metric) is not None]
            n = len(values)
            mean = sum(values) / n if n else math.nan
            if n > 1:
                var = sum((v - mean) ** 2 for v in values) / (n - 1)
                stderr = math.sqrt(var / n)
            else:
                stderr = math.nan
            rows.append({"batch_size": batch_size, "estimator": name, "metric": metric,
                         "mean": mean, "stderr": stderr, "n": n})
    return rows


def write_csv(rows: Iterable[dict], path: str | Path) -> Path:
    """Write dict rows to ``path`` as CSV (the union of their keys as the header).

    Parameters
    ----------
    rows : iterable of dict
        The rows (missing keys are left empty).
    path : str or Path
        The file to write (overwritten).

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from curvlab.shrinkage.table import write_csv
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     out = write_csv([{"a": 1}, {"a": 2, "b": 3}], Path(folder) / "rows.csv")
    ...     out.read_text().splitlines()
    ['a,b', '1,', '2,3']
    """
    rows = list(rows)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(records: Iterable[dict], metric: str = "frobenius", *, ax: Any = None,
         path: str | Path | None = None, log: bool = True):
    """Mean ``metric`` ± standard error against the batch size, one line per estimator.

    Parameters
    ----------
    records : iterable of dict
        ``compare``'s records.
    metric : str, default "frobenius"
        The field to plot.
    ax : matplotlib Axes, optional
        Draw there (default: a new Figure on its own canvas; pyplot is never touched).
    path : str or Path, optional
        Also save the figure there (format from the suffix).
    log : bool, default True
        Logarithmic axes.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on (``ax.figure`` when ``ax`` is given).

    Raises
    ------
    BackendUnavailableError
        Without matplotlib.
    InvalidInputError
        When no record has a value for ``metric``.

    Examples
    --------
    >>> from curvlab.shrinkage.table import plot
    >>> records = [{"batch_size": b, "estimator": "raw", "frobenius": 1.0 / b} for b in (4, 8)]
    >>> fig = plot(records)  # a Figure; nothing is written without path=
    >>> fig.axes[0].get_xlabel()
    'batch size'
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting needs matplotlib: pip install 'curvlab[experiments]'"
        ) from exc
    rows = [r for r in summarize(records, [metric]) if r["n"]]
    if not rows:
        raise InvalidInputError(f"no record has a value for {metric!r}")
    if ax is None:
        fig = Figure(figsize=(5.5, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
    else:
        fig = ax.figure
    for name in dict.fromkeys(r["estimator"] for r in rows):
        mine = sorted((r for r in rows if r["estimator"] == name), key=lambda r: r["batch_size"])
        errors = [0.0 if math.isnan(r["stderr"]) else r["stderr"] for r in mine]
        ax.errorbar([r["batch_size"] for r in mine], [r["mean"] for r in mine], yerr=errors,
                    marker="o", capsize=3, label=name)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(_LABELS.get(metric, metric) + " (mean ± s.e.)")
    ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


class Comparison(list):
    """``compare``'s records (a list of dicts) with a summary and outputs.

    Built like a list, from an iterable of records (dicts with ``batch_size``, ``repeat``,
    ``estimator`` and metric fields).

    Examples
    --------
    >>> table = Comparison([{"batch_size": 8, "repeat": 0, "estimator": "raw", "frobenius": 2.0}])
    >>> len(table), table.summary(["frobenius"])[0]["mean"]
    (1, 2.0)
    """

    def summary(self, metrics: Iterable[str] | None = None) -> list[dict]:
        """Mean ± standard error over repeats (see :func:`summarize`).

        Parameters
        ----------
        metrics : iterable of str, optional
            The fields to summarise (default :data:`METRICS` where present).

        Returns
        -------
        list of dict
            Rows ``{batch_size, estimator, metric, mean, stderr, n}``.
        """
        return summarize(self, metrics)

    def to_csv(self, path: str | Path, *, summary: bool = False) -> Path:
        """Write the records (or, with ``summary``, the summary rows) as CSV.

        Parameters
        ----------
        path : str or Path
            The file to write (overwritten).
        summary : bool, default False
            Write :meth:`summary` instead of the records.

        Returns
        -------
        Path
            ``path``.
        """
        return write_csv(self.summary() if summary else self, path)

    def to_pandas(self, *, summary: bool = False):
        """The records (or the summary) as a pandas DataFrame (pandas is optional).

        Parameters
        ----------
        summary : bool, default False
            Return :meth:`summary` instead of the records.

        Returns
        -------
        pandas.DataFrame
            One row per record (or summary row).

        Raises
        ------
        BackendUnavailableError
            Without pandas.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise BackendUnavailableError(
                "to_pandas needs pandas (pip install pandas); the records are a list of dicts "
                "and to_csv writes them without it"
            ) from exc
        return pd.DataFrame(self.summary() if summary else list(self))

    def plot(self, metric: str = "frobenius", *, ax: Any = None,
             path: str | Path | None = None, log: bool = True):
        """Mean ± standard error against the batch size (see :func:`plot`).

        Parameters
        ----------
        metric : str, default "frobenius"
            The field to plot.
        ax : matplotlib Axes, optional
            Draw there (default: a new Figure).
        path : str or Path, optional
            Also save the figure there.
        log : bool, default True
            Logarithmic axes.

        Returns
        -------
        matplotlib.figure.Figure
            The figure drawn on.
        """
        return plot(self, metric, ax=ax, path=path, log=log)
