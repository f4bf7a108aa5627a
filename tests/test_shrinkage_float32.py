"""Float32 input gives the float64 answer: statistics accumulate in float64, two-pass.

Adversarial cases from issue 16: a large common mean (the one-pass dispersion cancels),
near-isotropic data at large n (tr S and tr S^2 from different float32 reductions), and
per-sample gradients that share a large mean gradient. References are float64 computations
on the same (float32-rounded) numbers: scikit-learn, or the formulas on explicit matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import covariance as skcov

from curvlab.shrinkage import OAS, LedoitWolf, PerSampleMatrices, RMTLinear
from curvlab.shrinkage._traces import matrix_stats

F32, F64 = torch.float32, torch.float64


def _float32(X: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The data in float32, and the same numbers in float64 for the references."""
    t = torch.tensor(X, dtype=F32)
    return t, t.to(F64).numpy()


@pytest.mark.parametrize("ours,theirs", [(LedoitWolf, skcov.LedoitWolf), (OAS, skcov.OAS)])
def test_near_isotropic_large_n(ours, theirs):
    rng = np.random.default_rng(0)
    X32, X64 = _float32(rng.standard_normal((100_000, 48)) * (1 + 1e-3 * rng.random(48)))
    fit = ours().fit(X32)
    ref = theirs().fit(X64)
    assert fit.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-9)
    assert 0.9 < ref.shrinkage_ < 1.0  # near-isotropic: strong shrinkage, not the cap
    assert fit.covariance_.dtype == F32
    torch.testing.assert_close(fit.covariance_.to(F64), torch.tensor(ref.covariance_),
                               rtol=1e-6, atol=1e-7)


def _rmt_reference(X64: np.ndarray) -> float:
    """s2 / n from the explicit per-sample matrices x_k x_k^T, centred at their mean."""
    M = torch.tensor(X64)[:, :, None] * torch.tensor(X64)[:, None, :]
    S = M.mean(0)
    n, p = X64.shape
    s2 = float(((M - S) ** 2).sum()) / ((n - 1) * p)
    return s2 / n


def test_rmt_damping_with_a_dominant_mean():
    """One-pass float32 dispersion collapses to 0 here; the two-pass float64 one does not."""
    rng = np.random.default_rng(1)
    X32, X64 = _float32(1e3 + 0.1 * rng.standard_normal((400, 24)))
    fit = RMTLinear(assume_centered=True).fit(X32)
    ref = _rmt_reference(X64)
    assert ref > 1e3
    assert fit.damping_ == pytest.approx(ref, rel=1e-9)
    # the naive float32 one-pass form loses it entirely: the reason for two passes
    K = X32 @ X32.T
    one_pass = float((torch.diagonal(K) ** 2).sum() - (K**2).sum() / 400)
    assert abs(one_pass / (ref * 400 * 399 * 24) - 1) > 0.5


def test_large_mean_lw_oas_match_sklearn_in_float32():
    rng = np.random.default_rng(2)
    X32, X64 = _float32(1e4 + rng.standard_normal((300, 20)) * np.linspace(0.5, 2, 20))
    for ours, theirs in ((LedoitWolf, skcov.LedoitWolf), (OAS, skcov.OAS)):
        for centred in (False, True):
            fit = ours(assume_centered=centred).fit(X32)
            ref = theirs(assume_centered=centred).fit(X64)
            assert fit.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-8, abs=1e-12)


class _GradientsOnly:
    """An 'ef' estimator stand-in: per-sample gradients G (M_k = g_k g_k^T)."""

    curvature = "ef"
    distributed = False

    def __init__(self, G: torch.Tensor):
        self.G = G
        self.num_samples, self.num_params = G.shape
        self.dtype, self.device = G.dtype, G.device
        self.n_matvecs = 0

    def per_sample_gradients(self) -> torch.Tensor:
        return self.G

    def matvec(self, v):
        return self.G.T @ (self.G @ v) / self.num_samples


def test_gram_route_of_gradients_sharing_a_large_mean():
    rng = np.random.default_rng(3)
    G32, G64 = _float32(50.0 + 0.01 * rng.standard_normal((40, 200)))
    M = torch.tensor(G64)[:, :, None] * torch.tensor(G64)[:, None, :]
    exact, _ = matrix_stats(M)
    for cls in (RMTLinear, LedoitWolf, OAS):
        fit = cls(exact=True).fit(_GradientsOnly(G32))
        ref = cls().fit(M)
        assert fit.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-7, abs=1e-14), cls
    rmt = RMTLinear(exact=True).fit(_GradientsOnly(G32))
    assert rmt.noise_variance_ == pytest.approx(exact.mean("dispersion") / (39 * 200 * 40),
                                                rel=1e-7)


def test_probe_route_in_float32_keeps_the_dispersion():
    """Matrix-free statistics of float32 products agree with the float64 exact value."""
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(30, 30, generator=gen, dtype=F64)
    C = 1e3 * (A @ A.T) / 30
    noise = torch.randn(50, 30, 30, generator=gen, dtype=F64)
    M = C + (noise + noise.transpose(1, 2))
    exact = RMTLinear().fit(M).damping_
    fits = [RMTLinear(exact=False, n_probes=64, seed=s).fit(PerSampleMatrices(M.to(F32)))
            for s in range(4)]
    values = np.array([f.damping_ for f in fits])
    stderr = np.mean([f.shrinkage_stderr_ * (1 + f.damping_) ** 2 for f in fits])
    assert values.min() > 0
    assert abs(values.mean() - exact) < 4 * stderr / 2 + 1e-6 * exact
