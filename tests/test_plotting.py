"""curvlab.plotting draws spectra, with and without a fitted bulk, on its own Figure or on the
caller's Axes, returns the Figure and writes a file only when given a path."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from curvlab import rmt
from curvlab.errors import BackendUnavailableError, InvalidInputError
from curvlab.plotting import plot_spectral_density
from curvlab.results import SpectralDensity

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def spiked():
    """A spiked Wigner spectrum (three outliers), its bulk fit, and a hand-built density
    (nodes = eigenvalues, weights = 1/P) as the spectral helper would return."""
    matrix, _ = rmt.spiked_wigner(300, [2.0, 3.0, -2.5], 1.0, seed=0)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    nodes = eigenvalues[None]
    weights = torch.full_like(nodes, 1 / 300)
    grid = torch.linspace(-4.0, 4.0, 400, dtype=torch.float64)
    width = 0.05
    kernel = torch.exp(-((grid[:, None] - eigenvalues) ** 2) / (2 * width**2))
    curve = kernel.mean(dim=1) / (width * (2 * torch.pi) ** 0.5)
    density = SpectralDensity(nodes, weights, grid, curve, None, None, width, 0)
    return density, eigenvalues, rmt.fit_bulk_edge(eigenvalues)


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def _line(ax, label: str):
    """The one line of ``ax`` with this legend label."""
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return line


def test_density_with_bulk_and_outliers_written_to_a_path(spiked, tmp_path):
    density, eigenvalues, bulk = spiked
    assert bulk.n_outliers == 3
    path = tmp_path / "sub" / "density.png"
    fig = plot_spectral_density(density, eigenvalues[-10:], bulk, path=path, title="spiked")
    assert isinstance(fig, Figure) and _is_png(path)
    linear, log = fig.axes
    assert (linear.get_yscale(), log.get_yscale()) == ("linear", "log")
    assert fig.get_suptitle() == "spiked"
    for ax in (linear, log):  # the outliers drawn are the fit's, the ticks the eigenvalues
        np.testing.assert_array_equal(_line(ax, "outliers (3)").get_xdata(), bulk.outliers)
        np.testing.assert_array_equal(_line(ax, "eigenvalues").get_xdata(), eigenvalues[-10:])
        np.testing.assert_array_equal(_line(ax, "density").get_xdata(), density.grid)


def test_nothing_is_written_without_a_path(spiked, tmp_path, monkeypatch):
    _, eigenvalues, bulk = spiked
    monkeypatch.chdir(tmp_path)
    fig = plot_spectral_density(eigenvalues=eigenvalues, bulk=bulk)
    assert list(tmp_path.iterdir()) == []
    assert fig.get_suptitle() == "Spectral density" and len(fig.axes) == 2


def test_histogram_is_a_density(spiked):
    _, eigenvalues, _ = spiked
    fig = plot_spectral_density(eigenvalues=eigenvalues.numpy(), bins=40, panels="linear")
    (ax,) = fig.axes
    bars = ax.patches
    assert len(bars) == 40
    assert sum(b.get_height() * b.get_width() for b in bars) == pytest.approx(1.0, rel=1e-12)
    lefts = [b.get_x() for b in bars]
    assert lefts[0] == pytest.approx(float(eigenvalues.min()), rel=1e-12)


def test_draws_on_the_callers_axes(spiked):
    density, _, bulk = spiked
    mine = Figure()
    first, second, third = mine.subplots(1, 3)
    first.set_title("kept")
    assert plot_spectral_density(density, bulk=bulk, ax=second) is mine
    assert second.get_yscale() == "linear" and _line(second, "outliers (3)")
    assert first.get_lines() == [] and first.get_title() == "kept"
    assert third.get_lines() == [] and mine.get_suptitle() == ""
    assert plot_spectral_density(density, ax=third, panels=["log"], title="log") is mine
    assert third.get_yscale() == "log" and third.get_title() == "log"
    assert third.get_legend() is not None and mine.legends == []


def test_a_pair_of_axes_and_axes_on_a_subfigure(spiked):
    _, eigenvalues, bulk = spiked
    mine = Figure()
    pair = mine.subplots(1, 2)  # a numpy array of Axes
    assert plot_spectral_density(eigenvalues=eigenvalues, bulk=bulk, ax=pair) is mine
    assert [a.get_yscale() for a in pair] == ["linear", "log"]
    root = Figure()
    (sub,) = root.subfigures(1, 1, squeeze=False)[0]
    assert plot_spectral_density(eigenvalues=eigenvalues, ax=sub.subplots()) is root


def test_the_suffix_chooses_the_format(spiked, tmp_path):
    _, eigenvalues, _ = spiked
    plot_spectral_density(eigenvalues=eigenvalues, path=tmp_path / "s.svg")
    assert b"<svg" in (tmp_path / "s.svg").read_bytes()[:1000]


def test_marchenko_pastur_bulk_and_density_only(spiked, tmp_path):
    density, _, _ = spiked
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 800, generator=gen, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / 800)
    bulk = rmt.fit_bulk_edge(eigenvalues, model="marchenko-pastur")
    plot_spectral_density(eigenvalues=eigenvalues, bulk=bulk, path=tmp_path / "mp.png")
    assert _is_png(tmp_path / "mp.png")
    fig = plot_spectral_density(density, path=tmp_path / "d.png")
    assert _is_png(tmp_path / "d.png") and len(fig.axes) == 2


def test_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="SpectralDensity"):
        plot_spectral_density(path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="SpectralDensity"):
        plot_spectral_density(torch.ones(3), path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="finite"):
        plot_spectral_density(eigenvalues=[1.0, float("nan")], path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="bins"):
        plot_spectral_density(eigenvalues=[1.0, 2.0], bins=0, path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="panels"):
        plot_spectral_density(eigenvalues=[1.0, 2.0], panels=["cubic"], path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="Axes"):
        plot_spectral_density(eigenvalues=[1.0, 2.0], ax="left", path=tmp_path / "x.png")
    one = Figure().subplots()
    with pytest.raises(InvalidInputError, match="one Axes per panel"):
        plot_spectral_density(eigenvalues=[1.0, 2.0], ax=one, panels=("linear", "log"))
    assert one.get_lines() == [] and not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in (
        "matplotlib",
        "matplotlib.axes",
        "matplotlib.figure",
        "matplotlib.backends.backend_agg",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'curvlab\[experiments\]'"):
        plot_spectral_density(eigenvalues=torch.arange(5.0), path=tmp_path / "x.png")


def test_pyplot_state_untouched(spiked, tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    _, eigenvalues, bulk = spiked
    plot_spectral_density(eigenvalues=eigenvalues, bulk=bulk, path=tmp_path / "p.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
