"""Nonlinear cleaning: RIE and clipping on spiked models, matrix-free, LW2020 vs nonlinshrink."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from curvlab.errors import CurvlabError
from curvlab.results import Eigenpairs
from curvlab.shrinkage import (
    OAS,
    EigenvalueClipping,
    LedoitWolf,
    LedoitWolf2020,
    PerSampleMatrices,
    RMTLinear,
    RotationInvariant,
    SpikedModel,
)

F64 = torch.float64


def _err(estimate, truth) -> float:
    estimate = torch.as_tensor(estimate, dtype=F64)
    return float(((estimate - truth) ** 2).sum() / truth.shape[0])


def test_error_ordering_and_oracle_at_p1000():
    """raw > every linear rule >= RIE, and RIE within 10% of the eigenvector oracle."""
    B = 8
    model = SpikedModel(1000, spikes=(20.0, 10.0, 5.0, 3.0, 2.0), noise=B**0.5, bulk=(0.0, 2.0))
    samples = model.sample(B, seed=1)
    truth = model.matrix
    raw = _err(samples.mean(0), truth)
    linear = {cls.__name__: _err(cls(store_precision=False).fit(samples).covariance_, truth)
              for cls in (LedoitWolf, OAS, RMTLinear)}
    rie = RotationInvariant().fit(samples)
    assert rie.noise_variance_ == pytest.approx(1.0, rel=0.05)  # sigma^2 = s^2 / B
    V = rie.eigenvectors_
    oracle_values = ((truth @ V) * V).sum(0)
    oracle = _err((V * oracle_values) @ V.T, truth)
    rie_err = _err(rie.covariance_, truth)
    assert all(raw > e for e in linear.values()), (raw, linear)
    assert all(e >= rie_err for e in linear.values()), (linear, rie_err)
    assert rie_err <= 1.10 * oracle, (rie_err, oracle)
    # trace preserved: sum_i Re g(lambda_i - i eta) = 0
    assert float(rie.eigenvalues_.sum()) == pytest.approx(float(rie.raw_eigenvalues_.sum()),
                                                          rel=1e-10)


def _small_spiked(p=300, B=6, bulk=0.0):
    model = SpikedModel(p, spikes=(12.0, 6.0, 3.0), noise=B**0.5, bulk=bulk, seed=3)
    return model, model.sample(B, seed=4)


def test_pure_noise_is_cleaned_to_its_centre():
    """No signal: the RIE maps the semicircle to about 0, clipping exactly to the mean."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(400, 400, generator=gen, dtype=F64)
    X = (G + G.T) / (2 * 400) ** 0.5
    rie = RotationInvariant(noise_variance=1.0).fit(X)
    assert float(rie.eigenvalues_.abs().max()) < 0.35
    assert float(rie.eigenvalues_.pow(2).mean()) < 0.01  # raw: 1.0
    clip = EigenvalueClipping().fit(X)
    assert clip.n_outliers_ == 0
    torch.testing.assert_close(clip.eigenvalues_, torch.full((400,), float(X.trace() / 400),
                                                             dtype=F64))


def test_inputs_agree_and_noise_from_bulk_fit():
    _, samples = _small_spiked()
    M = samples.mean(0)
    from_samples = RotationInvariant().fit(samples)
    sigma2 = from_samples.noise_variance_
    from_matrix = RotationInvariant(noise_variance=sigma2).fit(M)
    values, vectors = torch.linalg.eigh(M)
    from_pairs = RotationInvariant(noise_variance=sigma2).fit((values, vectors))
    pairs = Eigenpairs(values.flip(0), vectors.flip(1), torch.zeros(300), 0, True)
    from_eigenpairs = RotationInvariant(noise_variance=sigma2).fit(pairs)
    for other in (from_matrix, from_pairs, from_eigenpairs):
        torch.testing.assert_close(other.covariance_, from_samples.covariance_)
    # without a noise level, the semicircle bulk fit supplies it
    fitted = RotationInvariant().fit(M).noise_variance_
    assert fitted == pytest.approx(sigma2, rel=0.1)
    # numpy in, numpy out; matvec/solve apply the cleaned matrix and its inverse
    as_np = RotationInvariant(noise_variance=sigma2).fit(M.numpy())
    assert isinstance(as_np.covariance_, np.ndarray)
    v = torch.randn(300, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(from_matrix.matvec(v), from_matrix.covariance_ @ v)
    torch.testing.assert_close(from_matrix.solve(from_matrix.matvec(v)), v)


def test_matrix_free_matches_dense():
    """Top-k Lanczos + quadrature Stieltjes + probe noise against the dense RIE."""
    model, samples = _small_spiked()
    dense = RotationInvariant().fit(samples)
    op = PerSampleMatrices(samples)
    k = 6
    free = RotationInvariant(k=k, n_probes=20, n_steps=60, seed=0).fit(op)
    assert free.eigenvectors_.shape == (300, k)
    assert free.noise_variance_ == pytest.approx(dense.noise_variance_, rel=0.1)
    torch.testing.assert_close(free.raw_eigenvalues_, dense.raw_eigenvalues_[:k],
                               rtol=1e-6, atol=1e-6)
    # outliers (well separated) cleaned to within 1% of the dense values
    torch.testing.assert_close(free.eigenvalues_[:3], dense.eigenvalues_[:3], rtol=0.01, atol=0)
    eye = torch.eye(300, dtype=F64)
    free_err = _err(free.matvec(eye), model.matrix)
    dense_err = _err(dense.covariance_, model.matrix)
    raw_err = _err(samples.mean(0), model.matrix)
    assert free_err < 0.2 * raw_err and free_err < 1.5 * dense_err
    # the complement is one value: the cleaned bulk's mean from the trace identity
    assert free.bulk_value_ == pytest.approx(float(dense.eigenvalues_[k:].mean()), abs=0.05)
    v = torch.randn(300, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(free.solve(free.matvec(v)), v)
    assert free.n_matvecs_ > 0


def test_clipping_keeps_outliers_and_the_trace():
    model, samples = _small_spiked(bulk=1.0)
    clip = EigenvalueClipping().fit(samples)
    assert clip.n_outliers_ == 3  # all three spikes exceed sigma = 1
    raw = clip.raw_eigenvalues_
    torch.testing.assert_close(clip.eigenvalues_[:3], raw[:3])
    assert torch.unique(clip.eigenvalues_[3:]).numel() == 1
    assert float(clip.eigenvalues_.sum()) == pytest.approx(float(raw.sum()), rel=1e-12)
    assert _err(clip.covariance_, model.matrix) < 0.2 * _err(samples.mean(0), model.matrix)
    free = EigenvalueClipping(k=5, n_probes=10, n_steps=40).fit(PerSampleMatrices(samples))
    assert free.n_outliers_ == 3
    torch.testing.assert_close(free.eigenvalues_[:3], raw[:3])


@pytest.mark.parametrize("shape", [(100, 30), (40, 80), (300, 50)])
@pytest.mark.parametrize("k", [None, 0, 2])
def test_lw2020_equals_nonlinshrink(shape, k):
    nonlinshrink = pytest.importorskip("nonlinshrink")
    rng = np.random.default_rng(sum(shape))
    n, p = shape
    X = rng.standard_normal((n, p)) * np.linspace(0.5, 3.0, p)
    if k is None:
        X = X + 2.0  # demeaned inside
    ref = nonlinshrink.shrink_cov(X, k=k)
    ours = LedoitWolf2020(k=k).fit(X)
    np.testing.assert_allclose(ours.covariance_, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    v = torch.tensor(rng.standard_normal(p))
    torch.testing.assert_close(ours.matvec(v), torch.tensor(ref) @ v)
    torch.testing.assert_close(ours.matvec(ours.solve(v)), v)


def test_lw2020_refuses_small_samples():
    with pytest.raises(CurvlabError, match=">= 12"):
        LedoitWolf2020().fit(np.random.default_rng(0).standard_normal((12, 3)))


def test_nonlinear_params_clone():
    rie = RotationInvariant(noise_variance=0.5, k=4)
    assert clone(rie).get_params() == rie.get_params()
    assert clone(EigenvalueClipping(model="marchenko-pastur")).model == "marchenko-pastur"
    assert clone(LedoitWolf2020(k=0)).k == 0
    with pytest.raises(CurvlabError, match="LedoitWolf2020"):
        RotationInvariant().fit(np.ones((5, 3)))


# ---------------------------------------------------------------------- LW2020 precision
def _lw2020_mpmath(lam, n: int, p: int, dps: int = 60) -> np.ndarray:
    """Eqs. 4.3-4.9 and C.4-C.8 of Ledoit & Wolf (2020) evaluated with ``dps`` digits, the
    formulas exactly as printed (the reference for the stable float64 form)."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    mp.dps = dps
    lam = [mp.mpf(float(v)) for v in lam]
    m = len(lam)
    h = mp.mpf(n) ** (-mp.mpf(1) / 3)
    r5, pi = mp.sqrt(5), mp.pi

    def hilbert(x):
        if abs(x) == r5:
            return -3 * x / (10 * pi)
        return -3 * x / (10 * pi) + 3 / (4 * r5 * pi) * (1 - x**2 / 5) * mp.log(
            abs((r5 - x) / (r5 + x)))

    f, hf = [], []
    for li in lam:
        xs = [((li - lj) / (h * lj), h * lj) for lj in lam]
        f.append(sum(3 / (4 * r5) * max(1 - x**2 / 5, 0) / H for x, H in xs) / m)
        hf.append(sum(hilbert(x) / H for x, H in xs) / m)
    c = mp.mpf(p) / n
    if p <= n:
        d = [li / ((pi * c * li * fi) ** 2 + (1 - c - pi * c * li * hi) ** 2)
             for li, fi, hi in zip(lam, f, hf)]
    else:
        hf0 = (1 / pi) * (3 / (10 * h**2) + 3 / (4 * r5 * h) * (1 - 1 / (5 * h**2))
                          * mp.log((1 + r5 * h) / (1 - r5 * h))) * sum(1 / li for li in lam) / m
        d0 = 1 / (pi * (p - n) / mp.mpf(n) * hf0)
        d = [d0] * (p - n) + [li / (pi**2 * li**2 * (fi**2 + hi**2))
                              for li, fi, hi in zip(lam, f, hf)]
    return np.array([float(v) for v in d])


def _breast_cancer(n: int, seed: int, standardise: bool) -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    X = load_breast_cancer().data
    if standardise:
        X = (X - X.mean(0)) / X.std(0)
    return X[np.random.default_rng(seed).choice(len(X), n, replace=False)]


@pytest.mark.parametrize("n, seed, standardise", [
    (40, 0, True), (40, 1, True), (40, 0, False), (40, 2, False), (20, 0, True),
])
def test_lw2020_equals_a_60_digit_evaluation_on_breast_cancer(n, seed, standardise):
    """Ill-conditioned real data (unscaled: eigenvalue ratio ~1e12): the Hilbert term of
    the printed formula cancels in float64; the series form keeps every digit."""
    X = _breast_cancer(n, seed, standardise)
    fit = LedoitWolf2020().fit(X)
    n_eff, p = n - 1, X.shape[1]
    nonzero = fit.sample_eigenvalues_[max(0, p - n_eff):]
    ref = _lw2020_mpmath(nonzero, n_eff, p)
    np.testing.assert_allclose(fit.eigenvalues_, ref, rtol=1e-9)
    if (n, seed, standardise) == (40, 0, True):  # the case of issue 16
        np.testing.assert_allclose(fit.eigenvalues_[-2:], [11.43, 13.93], atol=0.01)
        np.testing.assert_allclose(fit.sample_eigenvalues_[-2:], [10.34, 16.33], atol=0.01)


def test_lw2020_float64_printed_formula_fails_where_the_series_does_not():
    """The printed float64 formula (as nonlinshrink evaluates it) is far off on this case."""
    from curvlab.shrinkage.ledoit_wolf_2020 import ROOT5, epanechnikov_hilbert

    x = torch.tensor([3e4, 1e6, -5e7], dtype=F64)
    printed = (-3 / 10 / np.pi) * x + (3 / 4 / ROOT5 / np.pi) * (1 - x**2 / 5) * torch.log(
        torch.abs((ROOT5 - x) / (ROOT5 + x)))
    exact = -1 / (np.pi * x) * (1 + 1 / x**2)  # the series' first two terms
    torch.testing.assert_close(epanechnikov_hilbert(x), exact, rtol=1e-12, atol=0)
    assert float(((printed - exact) / exact).abs().max()) > 1e-3
