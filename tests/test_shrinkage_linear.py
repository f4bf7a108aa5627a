"""Linear shrinkage: equality with scikit-learn, probe convergence, operators, conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import covariance as skcov
from sklearn.base import clone

from curvlab.errors import CurvlabError, InvalidInputError
from curvlab.shrinkage import (
    OAS,
    FixedShrinkage,
    LedoitWolf,
    PerSampleMatrices,
    RMTLinear,
    damping_to_shrinkage,
    learning_rate_scale,
    shrinkage_to_damping,
)

F64 = torch.float64


def _samples(n, p, seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + shift


@pytest.mark.parametrize("shape", [(10, 30), (60, 8), (25, 1), (9, 9), (2, 5)])
@pytest.mark.parametrize("assume_centered", [False, True])
@pytest.mark.parametrize("ours,theirs", [(LedoitWolf, skcov.LedoitWolf), (OAS, skcov.OAS)])
def test_equals_sklearn(shape, assume_centered, ours, theirs):
    X = _samples(*shape, seed=sum(shape))
    a = ours(assume_centered=assume_centered).fit(X)
    b = theirs(assume_centered=assume_centered).fit(X)
    assert isinstance(a.covariance_, np.ndarray)
    assert abs(a.shrinkage_ - b.shrinkage_) <= 1e-10
    np.testing.assert_allclose(a.covariance_, b.covariance_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.location_, b.location_, rtol=0, atol=1e-12)
    scale = np.abs(b.precision_).max()
    np.testing.assert_allclose(a.precision_, b.precision_, rtol=0, atol=1e-9 * scale)
    # torch in, torch out, same numbers
    t = ours(assume_centered=assume_centered).fit(torch.tensor(X))
    assert isinstance(t.covariance_, torch.Tensor)
    np.testing.assert_allclose(t.covariance_.numpy(), b.covariance_, rtol=1e-10, atol=1e-12)


def test_per_sample_matrices_generalize_vectors():
    """M_k = x_k x_k^T as explicit matrices gives the vector-sample answer."""
    X = torch.tensor(_samples(15, 6, shift=0.0))
    M = X[:, :, None] * X[:, None, :]
    for cls in (LedoitWolf, OAS, RMTLinear):
        a = cls(assume_centered=True).fit(X)
        b = cls().fit(M)
        assert a.shrinkage_ == pytest.approx(b.shrinkage_, rel=1e-12, abs=1e-14)
        torch.testing.assert_close(a.covariance_, b.covariance_, rtol=1e-12, atol=1e-12)


def test_matrix_formulas_against_naive():
    """DESIGN section 4 trace formulas written out on explicit matrices."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(12, 7, 7, generator=gen, dtype=F64)
    M = A + A.transpose(1, 2) + 3 * torch.eye(7, dtype=F64)
    n, p = 12, 7
    S = M.mean(0)
    mu = torch.trace(S) / p
    d2 = ((S - mu * torch.eye(p, dtype=F64)) ** 2).sum() / p
    b2 = sum(((Mk - S) ** 2).sum() for Mk in M) / (n**2 * p)
    rho_lw = float(min(b2, d2) / d2)
    tr2, trsq = float(torch.trace(S @ S)), float(torch.trace(S) ** 2)
    rho_oas = min(1.0, (tr2 + trsq) / ((n + 1) * (tr2 - trsq / p)))
    s2 = float(sum(((Mk - S) ** 2).sum() for Mk in M) / ((n - 1) * p))
    assert LedoitWolf().fit(M).shrinkage_ == pytest.approx(rho_lw, rel=1e-12)
    assert OAS().fit(M).shrinkage_ == pytest.approx(rho_oas, rel=1e-12)
    rmt = RMTLinear().fit(M)
    assert rmt.noise_variance_ == pytest.approx(s2 / n, rel=1e-12)
    assert rmt.shrinkage_ == pytest.approx((s2 / n) / (1 + s2 / n), rel=1e-12)
    assert rmt.target_scale_ == 1.0
    rmt_b = RMTLinear(batch_size=4).fit(M)
    assert rmt_b.damping_ == pytest.approx((1 / 4 - 1 / n) * s2, rel=1e-12)
    lw = LedoitWolf().fit(M)
    assert lw.damping_ == pytest.approx(lw.target_scale_ * lw.shrinkage_ / (1 - lw.shrinkage_))
    expected = (1 - lw.shrinkage_) * S + lw.shrinkage_ * mu * torch.eye(p, dtype=F64)
    torch.testing.assert_close(lw.covariance_, expected, rtol=1e-12, atol=1e-12)


def _probe_case():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 40, generator=gen, dtype=F64) * torch.linspace(0.2, 3, 40, dtype=F64)
    return X[:, :, None] * X[:, None, :]


@pytest.mark.parametrize("cls", [LedoitWolf, OAS])
def test_probes_converge_like_inverse_sqrt(cls):
    M = _probe_case()
    exact = cls().fit(M).shrinkage_
    assert 0.2 < exact < 0.9  # strictly inside: not the cap
    op = PerSampleMatrices(M)
    probes = [16, 64, 256]
    rms = []
    for m in probes:
        errs = [cls(n_probes=m, seed=s).fit(op).shrinkage_ - exact for s in range(16)]
        rms.append(math.sqrt(np.mean(np.square(errs))))
    slope = np.polyfit(np.log(probes), np.log(rms), 1)[0]
    assert -0.68 < slope < -0.32, (slope, rms)
    assert rms[-1] < 0.03
    # the jackknife standard error is honest within a factor of 2
    se = np.mean([cls(n_probes=64, seed=s).fit(op).shrinkage_stderr_ for s in range(6)])
    assert 0.5 * rms[1] < se < 2 * rms[1]


def test_probe_traces_unbiased():
    """Each per-probe statistic averages to its exact value (unit-sphere identities)."""
    from curvlab.shrinkage._traces import matrix_stats, probe_stats

    M = _probe_case()[:20, :10, :10]
    exact, _ = matrix_stats(M)
    est = probe_stats(PerSampleMatrices(M), 4000, seed=1)
    for name in ("trace", "trace_sq", "trace_squared", "dispersion"):
        values = getattr(est, name)
        err = float(values.std() / math.sqrt(values.numel()))
        assert abs(float(values.mean()) - exact.mean(name)) < 4 * err, name


@pytest.fixture
def ef_estimator(digits_logreg):
    from curvlab.adapters.autograd import AutogradEstimator

    model, loss_fn, (x, y) = digits_logreg
    return AutogradEstimator(model, loss_fn, (x[:150], y[:150]), curvature="ef")


def test_gram_route_equals_sklearn_on_gradients(ef_estimator):
    """Exact matrix-free LW/OAS of the empirical Fisher via the n x n Gram matrix."""
    G = ef_estimator.per_sample_gradients().detach().numpy()
    for ours, theirs in ((LedoitWolf, skcov.LedoitWolf), (OAS, skcov.OAS)):
        a = ours(exact=True).fit(ef_estimator)
        b = theirs(assume_centered=True, store_precision=False).fit(G)
        assert a.shrinkage_ == pytest.approx(b.shrinkage_, abs=1e-10)
        assert not hasattr(a, "covariance_")
        V = torch.randn(G.shape[1], 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a.matvec(V), torch.tensor(b.covariance_) @ V)
        # Woodbury solve inverts the shrunk matrix
        torch.testing.assert_close(a.matvec(a.solve(V)), V, rtol=1e-8, atol=1e-8)


def test_gram_route_with_ggn_square_roots_equals_explicit_matrices():
    """BackPACK's per-sample GGN square roots give exact LW/OAS of per-sample GGNs."""
    pytest.importorskip("backpack")
    from helpers import dense_ggn, make_data, make_model

    import curvlab

    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", n=16)
    loss_fn = torch.nn.CrossEntropyLoss()
    est = curvlab.estimator("backpack", model, loss_fn, [(x[:10], y[:10]), (x[10:], y[10:])],
                            curvature="ggn")
    M = torch.stack([dense_ggn(model, loss_fn, x[i : i + 1], y[i : i + 1]) for i in range(16)])
    for cls in (LedoitWolf, OAS):
        a = cls(exact=True).fit(est)
        b = cls().fit(M)
        assert a.shrinkage_ == pytest.approx(b.shrinkage_, rel=1e-10)
        v = torch.randn(est.num_params, dtype=F64, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a.matvec(v), torch.as_tensor(b.covariance_) @ v)
        torch.testing.assert_close(a.matvec(a.solve(v)), v, rtol=1e-8, atol=1e-8)


def test_probe_route_on_estimator(ef_estimator):
    exact = LedoitWolf(exact=True).fit(ef_estimator)
    approx = LedoitWolf(exact=False, n_probes=24, seed=0).fit(ef_estimator)
    assert approx.n_matvecs_ == 24 * 150
    assert abs(approx.shrinkage_ - exact.shrinkage_) < 4 * approx.shrinkage_stderr_ + 1e-3
    # CG solve of the probe-fitted operator through the estimator's products
    v = torch.randn(ef_estimator.num_params, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = approx.solve(v, tol=1e-11)
    torch.testing.assert_close(approx.matvec(x), v, rtol=1e-7, atol=1e-8)


def test_rmt_damping_equals_noise_variance(ef_estimator):
    pytest.importorskip("curvlab.noise")
    rule = RMTLinear(batch_size=32, n_probes=8, seed=5).fit(ef_estimator)
    ref = ef_estimator.noise_variance(batch_size=32, n_probes=8, seed=5)
    assert rule.damping_ == pytest.approx(ref.value, rel=1e-12)
    assert rule.noise_variance_ == pytest.approx(ref.value, rel=1e-12)
    assert rule.shrinkage_ == pytest.approx(ref.value / (1 + ref.value), rel=1e-12)
    assert rule.noise_estimate_ is not None and rule.n_matvecs_ == ref.n_matvecs


def test_fixed_shrinkage_on_any_operator():
    from curvlab.operators import DenseOperator

    gen = torch.Generator().manual_seed(2)
    A = torch.randn(8, 8, generator=gen, dtype=F64)
    H = A @ A.T
    fixed = FixedShrinkage(damping=0.5, target_scale=2.0).fit(DenseOperator(H))
    rho = 0.5 / 2.5
    assert fixed.shrinkage_ == pytest.approx(rho)
    assert fixed.damping_ == pytest.approx(0.5)
    assert fixed.noise_variance_ is None
    shrunk = (1 - rho) * H + rho * 2.0 * torch.eye(8, dtype=F64)
    v = torch.randn(8, 2, generator=gen, dtype=F64)
    torch.testing.assert_close(fixed.matvec(v), shrunk @ v)
    torch.testing.assert_close(fixed.solve(v), torch.linalg.solve(shrunk, v), rtol=1e-8, atol=1e-9)
    with pytest.raises(InvalidInputError):
        FixedShrinkage(shrinkage=0.1, damping=0.1).fit(DenseOperator(H))
    with pytest.raises(InvalidInputError, match="per-sample"):
        LedoitWolf().fit(DenseOperator(H))


def test_conversions_round_trip():
    for tau in (0.3, 1.0, 7.0):
        for delta in (0.0, 1e-3, 0.5, 40.0):
            rho = damping_to_shrinkage(delta, tau)
            assert shrinkage_to_damping(rho, tau) == pytest.approx(delta, rel=1e-12, abs=1e-15)
            # (1 - rho) H + rho tau I = (1 - rho)(H + delta I)
            assert rho * tau == pytest.approx((1 - rho) * delta, rel=1e-12, abs=1e-15)
    assert learning_rate_scale(0.25) == pytest.approx(1 / 1.25)
    assert shrinkage_to_damping(1.0) == math.inf
    for bad in (lambda: damping_to_shrinkage(-1.0), lambda: shrinkage_to_damping(1.5),
                lambda: damping_to_shrinkage(1.0, tau=0.0)):
        with pytest.raises(InvalidInputError):
            bad()


def test_sklearn_clone_and_params():
    lw = LedoitWolf(assume_centered=True, n_probes=12, seed=3)
    assert lw.get_params() == {"assume_centered": True, "block_size": 1000, "exact": None,
                               "n_probes": 12, "probe_batch": 1, "seed": 3,
                               "store_precision": True}
    twin = clone(lw)
    assert twin is not lw and twin.get_params() == lw.get_params()
    lw.fit(_samples(10, 4))
    assert not hasattr(clone(lw), "shrinkage_")  # clone drops fitted state
    assert lw.set_params(n_probes=5) is lw and lw.n_probes == 5
    with pytest.raises(InvalidInputError, match="invalid parameter"):
        lw.set_params(bogus=1)
    for est in (OAS(), RMTLinear(batch_size=8), FixedShrinkage(shrinkage=0.2)):
        assert clone(est).get_params() == est.get_params()
    assert repr(RMTLinear(batch_size=8)) == "RMTLinear(batch_size=8)"
    with pytest.raises(TypeError):
        LedoitWolf(True)  # keyword-only


def test_bad_input_is_refused():
    with pytest.raises(CurvlabError):
        LedoitWolf().fit(np.zeros((3, 4, 5)))
    with pytest.raises(CurvlabError):
        LedoitWolf().fit(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(CurvlabError, match="symmetric"):
        OAS().fit(torch.randn(4, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(CurvlabError, match="not fitted"):
        LedoitWolf().matvec(torch.zeros(3, dtype=F64))
    with pytest.raises(CurvlabError, match="batch_size"):
        RMTLinear(batch_size=50).fit(_samples(10, 3))
