"""Spectral-density figures: the bulk, its Tracy-Widom margin and the outliers (paper Fig. 2).

Every helper draws on the ``ax=`` it is given (or on a Figure of its own), returns the
Figure, and writes a file only when given ``path=``. matplotlib is an optional extra
(``pip install 'curvlab[experiments]'``) imported only when a figure is drawn; Figures of
their own are rendered off-screen with the Agg canvas, leaving pyplot's state and the user's
chosen backend untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from curvlab import rmt
from curvlab.errors import BackendUnavailableError, InvalidInputError
from curvlab.results import Eigenpairs, SpectralDensity
from curvlab.validation import check_int

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_spectral_density"]

# Lowest density shown on the log panel, relative to the peak: an outlier's bump of mass 1/P
# stands about 1/P above the bulk, so 1e-8 keeps outliers of spectra up to P ~ 1e8 in view.
_LOG_FLOOR = 1e-8
_PANELS = ("linear", "log")


def _numpy(values) -> np.ndarray:
    if isinstance(values, Eigenpairs):
        values = values.values
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _fitted_law(bulk: rmt.BulkFit, x: np.ndarray) -> np.ndarray:
    """The fitted bulk law on x, scaled by the bulk's share of the spectrum."""
    if bulk.method == "semicircle":
        pdf = rmt.semicircle_pdf(x - bulk.center, bulk.sigma)
    else:
        ratio = (bulk.sigma / bulk.center) ** 2
        pdf = rmt.marchenko_pastur_pdf(x, ratio, bulk.center)
    return bulk.bulk_fraction * np.asarray(pdf)


def plot_spectral_density(
    density: SpectralDensity | None = None,
    eigenvalues=None,
    bulk: rmt.BulkFit | None = None,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    panels: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    bins: int = 100,
) -> Figure:
    """Draw a spectrum: its density on linear axes and on a log density axis, where outliers of
    tiny mass stay visible (paper Fig. 2).

    ``density`` (from stochastic Lanczos quadrature) is drawn as its broadened curve; without
    it, ``eigenvalues`` (the full spectrum) are drawn as a histogram. With both, the
    eigenvalues (e.g. the top ones from Lanczos) are marked as ticks along the x axis. A
    :class:`~curvlab.rmt.BulkFit` adds the fitted bulk (shaded, with its law scaled to the
    bulk's share), its edges (dashed), the Tracy-Widom margin plus any quadrature error
    (orange bands) and the outliers (red triangles, counted in the legend).

    Parameters
    ----------
    density : SpectralDensity or None, default None
        A density from ``est.spectral_density(...)``.
    eigenvalues : tensor, array, sequence or Eigenpairs, optional
        Eigenvalues: the full spectrum (histogram) or, with ``density``, a few to mark.
    bulk : BulkFit or None, default None
        A fit from :func:`curvlab.rmt.fit_bulk_edge` to overlay.
    ax : matplotlib Axes, sequence of Axes, or None, default None
        Where to draw, one Axes per panel. None draws on a new Figure of its own (rendered
        off-screen, so pyplot's state and the chosen backend stay untouched).
    panels : str, sequence of str, or None, default None
        Which panels to draw, in order: "linear" and/or "log". None: both, or only as many
        as the Axes given (one Axes gets the linear panel).
    path : str, PathLike or None, default None
        When given, the Figure is also saved there (format from the suffix, PNG without one;
        parent folders are created). Nothing is written without it.
    title : str or None, default None
        The Figure's title (on a Figure of its own, "Spectral density" when None), or the
        first given Axes' title.
    bins : int, default 100
        Histogram bins when no ``density`` is given.

    Returns
    -------
    matplotlib.figure.Figure
        The Figure drawn on: a new one, or the one holding the given Axes.

    Raises
    ------
    InvalidInputError
        Neither ``density`` nor ``eigenvalues``, non-finite eigenvalues, ``bins < 1``, an
        unknown panel, or as many Axes as panels not given.
    BackendUnavailableError
        matplotlib is not installed (``pip install 'curvlab[experiments]'``).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), Fig. 2 (bulk and outliers of a Hessian
    spectrum). S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic
    Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).

    Examples
    --------
    >>> import torch
    >>> from curvlab import rmt
    >>> from curvlab.plotting import plot_spectral_density
    >>> matrix, _ = rmt.spiked_wigner(200, [4.0], seed=0)
    >>> eigenvalues = torch.linalg.eigvalsh(matrix)
    >>> fig = plot_spectral_density(eigenvalues=eigenvalues, bulk=rmt.fit_bulk_edge(eigenvalues))
    >>> len(fig.axes)
    2

    Draw into a panel of your own figure:

    >>> from matplotlib.figure import Figure
    >>> mine = Figure()
    >>> left, right = mine.subplots(1, 2)
    >>> plot_spectral_density(eigenvalues=eigenvalues, ax=right, panels=["log"]) is mine
    True
    """
    panels = _check_options(density, eigenvalues, panels, bins)
    values = None if eigenvalues is None else _numpy(eigenvalues)
    if values is not None and (values.size == 0 or not np.isfinite(values).all()):
        raise InvalidInputError("eigenvalues must be non-empty and finite")
    fig, axes, panels = _figure_and_axes(ax, panels)
    for axis, panel in zip(axes, panels):
        _draw_panel(axis, panel == "log", density, values, bulk, bins)
    if ax is None:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
        fig.suptitle("Spectral density" if title is None else title)
    else:
        axes[0].legend(fontsize="small")
        if title is not None:
            axes[0].set_title(title)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _check_options(density, eigenvalues, panels, bins: int) -> tuple[str, ...] | None:
    """Validate what needs no matplotlib; ``panels`` as a tuple (None stays None)."""
    if density is None and eigenvalues is None:
        raise InvalidInputError("pass a SpectralDensity, eigenvalues, or both")
    if density is not None and not isinstance(density, SpectralDensity):
        raise InvalidInputError(
            f"density must be a SpectralDensity from spectral_density(); got {type(density)}"
        )
    check_int("bins", bins, minimum=1)
    if panels is None:
        return None
    panels = (panels,) if isinstance(panels, str) else tuple(panels)
    if not panels or any(p not in _PANELS for p in panels):
        raise InvalidInputError(f"panels must be a non-empty sequence of {_PANELS}; got {panels!r}")
    return panels


def _figure_and_axes(ax, panels: tuple[str, ...] | None) -> tuple[Figure, list[Axes], tuple]:
    """A Figure of its own with one Axes per panel (``ax`` None), or the root Figure of the
    given Axes; and the panels, one per Axes."""
    try:
        from matplotlib.axes import Axes
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting needs matplotlib: pip install 'curvlab[experiments]'"
        ) from exc
    if ax is None:
        panels = panels or _PANELS
        fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        return fig, list(np.ravel(fig.subplots(1, len(panels), squeeze=False))), panels
    axes = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
    if not axes or not all(isinstance(a, Axes) for a in axes):
        raise InvalidInputError(f"ax must be a matplotlib Axes or a sequence of them; got {ax!r}")
    panels = panels or _PANELS[: len(axes)]
    if len(axes) != len(panels):
        raise InvalidInputError(
            f"got {len(axes)} Axes for the panels {panels}; pass one Axes per panel "
            "(e.g. panels=['log'] with one Axes)"
        )
    return axes[0].figure.figure, axes, panels  # the root Figure, also for SubFigure axes


def _draw_panel(
    ax: Axes,
    log: bool,
    density: SpectralDensity | None,
    values: np.ndarray | None,
    bulk: rmt.BulkFit | None,
    bins: int,
) -> None:
    """One panel: the density curve (or histogram), eigenvalue ticks, the bulk overlay."""
    if density is not None:
        grid, curve = _numpy(density.grid), _numpy(density.density)
        ax.plot(grid, np.where(curve > 0, curve, np.nan), color="C0", label="density")
        if not log:
            ax.fill_between(grid, curve, color="C0", alpha=0.2)
        if values is not None:
            ax.plot(
                values,
                np.zeros_like(values),
                "|",
                color="k",
                markersize=12,
                transform=ax.get_xaxis_transform(),
                label="eigenvalues",
            )
    else:
        ax.hist(values, bins=bins, density=True, color="C0", alpha=0.6, label="eigenvalues")
    if bulk is not None:
        _draw_bulk(ax, bulk)
    peak = np.nanmax(_numpy(density.density)) if density is not None else 0.0
    if log:
        ax.set_yscale("log")
        if peak > 0:
            ax.set_ylim(_LOG_FLOOR * peak, 3 * peak)
    elif peak > 0:  # keep a narrow fitted law from flattening the measured density
        ax.set_ylim(0, 1.15 * peak)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log else "density")


def _draw_bulk(ax: Axes, bulk: rmt.BulkFit) -> None:
    ax.axvspan(bulk.edge_left, bulk.edge_right, color="C2", alpha=0.12, label="fitted bulk")
    for edge in (bulk.edge_left, bulk.edge_right):
        ax.axvline(edge, color="C2", linestyle="--", linewidth=1)
    ax.axvspan(bulk.edge_right, bulk.upper, color="C1", alpha=0.35, label="Tracy-Widom margin")
    ax.axvspan(bulk.lower, bulk.edge_left, color="C1", alpha=0.35)
    x = np.linspace(bulk.edge_left, bulk.edge_right, 400)
    law = _fitted_law(bulk, x)
    ax.plot(x, np.where(law > 0, law, np.nan), color="C2", label=f"fitted {bulk.method}")
    outliers = _numpy(bulk.outliers)
    if outliers.size:
        ax.plot(
            outliers,
            np.full_like(outliers, 0.04),
            "^",
            color="red",
            transform=ax.get_xaxis_transform(),
            label=f"outliers ({outliers.size})",
        )
