"""curvlab.plotting writes PNG figures of spectra, with and without a fitted bulk."""

from __future__ import annotations

import sys

import pytest
import torch

from curvlab import rmt
from curvlab.errors import BackendUnavailableError, InvalidInputError
from curvlab.plotting import plot_spectral_density
from curvlab.results import SpectralDensity

pytest.importorskip("matplotlib")

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


def test_density_with_bulk_and_outliers(spiked, tmp_path):
    density, eigenvalues, bulk = spiked
    assert bulk.n_outliers == 3
    path = plot_spectral_density(
        density, eigenvalues[-10:], bulk, path=tmp_path / "sub" / "density.png", title="spiked"
    )
    assert path == tmp_path / "sub" / "density.png"
    assert _is_png(path)


def test_histogram_of_eigenvalues_with_bulk(spiked, tmp_path):
    _, eigenvalues, bulk = spiked
    path = plot_spectral_density(
        eigenvalues=eigenvalues.numpy(), bulk=bulk, path=tmp_path / "h.png"
    )
    assert _is_png(path)


def test_marchenko_pastur_bulk_and_density_only(spiked, tmp_path):
    density, _, _ = spiked
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 800, generator=gen, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / 800)
    bulk = rmt.fit_bulk_edge(eigenvalues, model="marchenko-pastur")
    assert _is_png(
        plot_spectral_density(eigenvalues=eigenvalues, bulk=bulk, path=tmp_path / "mp.png")
    )
    assert _is_png(plot_spectral_density(density, path=tmp_path / "d.png"))


def test_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="SpectralDensity"):
        plot_spectral_density(path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="SpectralDensity"):
        plot_spectral_density(torch.ones(3), path=tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="finite"):
        plot_spectral_density(eigenvalues=[1.0, float("nan")], path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
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
