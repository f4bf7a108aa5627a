"""Spectral-density figures: the bulk, its Tracy-Widom margin and the outliers (paper Fig. 2).

matplotlib is an optional extra (``pip install 'curvlab[experiments]'``) imported only when a
figure is drawn; figures are rendered off-screen with the Agg canvas, leaving pyplot's state
and the user's chosen backend untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from curvlab import rmt
from curvlab.errors import BackendUnavailableError, InvalidInputError
from curvlab.results import Eigenpairs, SpectralDensity

__all__ = ["plot_spectral_density"]

# Lowest density shown on the log panel, relative to the peak: an outlier's bump of mass 1/P
# stands about 1/P above the bulk, so 1e-8 keeps outliers of spectra up to P ~ 1e8 in view.
_LOG_FLOOR = 1e-8


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
    path: str | os.PathLike = "spectral_density.png",
    title: str = "Spectral density",
    bins: int = 100,
) -> Path:
    """Save a two-panel PNG of a spectrum: density on linear axes (left) and on a log density
    axis (right), where outliers of tiny mass stay visible.

    ``density`` (from stochastic Lanczos quadrature) is drawn as its broadened curve; without
    it, ``eigenvalues`` (full spectrum) are drawn as a histogram of ``bins`` bins. With both,
    the eigenvalues (e.g. the top ones from Lanczos) are marked as ticks along the x axis.
    A :class:`~curvlab.rmt.BulkFit` adds the fitted bulk (shaded, with its law scaled to the
    bulk's share), its edges (dashed), the Tracy-Widom margin plus any quadrature error
    (orange bands) and the outliers (red triangles, counted in the legend).
    Returns the path written; parent folders are created.
    """
    if density is None and eigenvalues is None:
        raise InvalidInputError("pass a SpectralDensity, eigenvalues, or both")
    if density is not None and not isinstance(density, SpectralDensity):
        raise InvalidInputError(
            f"density must be a SpectralDensity from spectral_density(); got {type(density)}"
        )
    if bins < 1:
        raise InvalidInputError(f"bins must be >= 1; got {bins}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting needs matplotlib: pip install 'curvlab[experiments]'"
        ) from exc

    values = None if eigenvalues is None else _numpy(eigenvalues)
    if values is not None and (values.size == 0 or not np.isfinite(values).all()):
        raise InvalidInputError("eigenvalues must be non-empty and finite")

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, log in zip(axes, (False, True)):
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
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _draw_bulk(ax, bulk: rmt.BulkFit) -> None:
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
