"""The damper's history: one record per update, a CSV writer and a plot of the trajectory.

Every update the damper ran (or skipped) leaves a :class:`DampingRecord` in
``damper.history``: the raw estimate, its standard error, the decision with its reason and
the smoothed damping after the update. :func:`write_history_csv` writes them as a table and
:func:`plot_damping_history` draws the trajectory.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvlab.errors import BackendUnavailableError, InvalidInputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STYLE = {  # decision -> (marker, colour, label)
    "accept": ("o", "tab:blue", "estimate (accepted)"),
    "cap": ("^", "tab:orange", "estimate (capped)"),
    "reject": ("x", "tab:red", "estimate (rejected)"),
}


@dataclass(frozen=True)
class DampingRecord:
    """One update of the damping.

    Attributes
    ----------
    step : int
        Training steps completed when the update ran (``damper.step`` calls), or the step
        given to ``damper.update``.
    estimate : float
        The raw estimate (NaN when the update was skipped before estimating).
    stderr : float
        Its standard error (NaN when unknown).
    decision : {"accept", "cap", "reject", "skip"}
        Folded in as measured, folded in capped, refused after estimating, or not estimated.
    reason : str
        Why, for every decision but a plain accept.
    damping : float
        The damping after this update.
    batch_size : int
        B, the batch the estimate is for (0 when not known).
    loss : float
        The training loss passed with the update (mean over ranks; NaN when not given).
    folded : float
        The value folded into the damping: the estimate, or its cap (NaN when none was).
    """

    step: int
    estimate: float
    stderr: float
    decision: str
    reason: str
    damping: float
    batch_size: int = 0
    loss: float = math.nan
    folded: float = math.nan

    @property
    def accepted(self) -> bool:
        """Whether the estimate moved the damping (accepted or capped)."""
        return self.decision in ("accept", "cap")


COLUMNS = tuple(f.name for f in fields(DampingRecord))


def write_history_csv(history: Any, path: str | os.PathLike) -> Path:
    """Write the history as CSV, one row per update with the columns of DampingRecord.

    Parameters
    ----------
    history : LinearShrinkageDamper or sequence of DampingRecord
    path : str or path-like
        The file to write (its folder is created).

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> record = DampingRecord(100, 2e-3, 1e-4, "accept", "", 1.3e-3, 64, 0.5)
    >>> out = write_history_csv([record], pathlib.Path(tempfile.mkdtemp()) / "h.csv")
    >>> out.read_text().splitlines()[0]
    'step,estimate,stderr,decision,reason,damping,batch_size,loss,folded'
    """
    records = _records(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))
    return path


def plot_damping_history(
    history: Any,
    *,
    init: float | None = None,
    ax: Axes | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Draw the learned-damping trajectory: the smoothed damping as a step line, the raw
    estimates with their standard errors (accepted, capped, rejected), skipped updates as
    ticks along the bottom; log scale.

    Parameters
    ----------
    history : LinearShrinkageDamper or sequence of DampingRecord
        A damper (its ``init`` starts the line) or its records.
    init : float, optional
        The damping before the first update (default: the damper's ``init``).
    ax : matplotlib Axes, optional
        Draw there; default a Figure of its own (rendered off-screen, pyplot untouched).
    path : str or path-like, optional
        Also write the figure there (format from the suffix).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        The Figure drawn on.

    Examples
    --------
    >>> record = DampingRecord(100, 2e-3, 1e-4, "accept", "", 1.3e-3, 64, 0.5)
    >>> fig = plot_damping_history([record], init=1e-3)
    >>> fig.axes[0].get_yscale()
    'log'
    """
    records = _records(history)
    if init is None:
        init = getattr(history, "init", None)
    fig, ax = _figure(ax)
    steps = [0, *(r.step for r in records)] if init is not None else [r.step for r in records]
    values = [init, *(r.damping for r in records)] if init is not None else [
        r.damping for r in records
    ]
    if steps:
        ax.step(steps, values, where="post", color="black", lw=1.5, label="damping")
    for decision, (marker, colour, label) in _STYLE.items():
        chosen = [r for r in records if r.decision == decision and r.estimate > 0]
        if chosen:
            ax.errorbar(
                [r.step for r in chosen],
                [r.estimate for r in chosen],
                yerr=[r.stderr if math.isfinite(r.stderr) else 0.0 for r in chosen],
                fmt=marker,
                color=colour,
                ms=4,
                lw=0.8,
                label=label,
            )
    for r in records:
        if r.decision == "cap" and r.estimate > 0 and r.folded > 0:
            ax.plot([r.step, r.step], [r.estimate, r.folded], ":", color="tab:orange", lw=0.8)
    skipped = [r.step for r in records if r.decision == "skip"]
    if skipped:
        ax.plot(skipped, [0.02] * len(skipped), "|", color="grey", ms=10,
                transform=ax.get_xaxis_transform(), label="skipped")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("damping")
    ax.set_title("Learned damping" if title is None else title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _records(history: Any) -> list[DampingRecord]:
    records = getattr(history, "history", history)
    if not isinstance(records, Sequence) or not all(
        isinstance(r, DampingRecord) for r in records
    ):
        raise InvalidInputError(
            "history must be a LinearShrinkageDamper or a sequence of DampingRecord"
        )
    return list(records)


def _figure(ax):
    try:
        from matplotlib.axes import Axes
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting needs matplotlib: pip install 'curvlab[experiments]'"
        ) from exc
    if ax is None:
        fig = Figure(figsize=(6.0, 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.subplots()
    if not isinstance(ax, Axes):
        raise InvalidInputError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    return ax.figure.figure, ax


__all__ = ["COLUMNS", "DampingRecord", "plot_damping_history", "write_history_csv"]
