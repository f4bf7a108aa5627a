"""The scikit-learn covariance API beyond the ported tests: validation messages and types,
score/mahalanobis/precision against scikit-learn, the wide-data (Woodbury) route, and the
fitted estimator as a curvlab Operator."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import sparse
from sklearn import covariance as skcov
from sklearn.model_selection import cross_val_score

from curvlab.errors import CurvlabError, InvalidInputError
from curvlab.shrinkage import (
    OAS,
    EigenvalueClipping,
    EmpiricalCovariance,
    FixedShrinkage,
    LedoitWolf,
    LedoitWolf2020,
    RMTLinear,
    RotationInvariant,
    ShrunkCovariance,
    SpikedModel,
    empirical_covariance,
    log_likelihood,
)

F64 = torch.float64


def _samples(n, p, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) / np.sqrt(p) + 2.0


def test_import_does_not_load_sklearn():
    code = "import sys, curvlab, curvlab.shrinkage; assert 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, exc, match", [
    (np.ones((4, 3)) + 1j, ValueError, "Complex data not supported"),
    (torch.ones(4, 3, dtype=torch.complex64), ValueError, "Complex data not supported"),
    (sparse.csr_matrix(np.eye(4)), TypeError, "Sparse data was passed"),
    (torch.eye(4).to_sparse(), TypeError, "Sparse data was passed"),
    (np.array([[1.0, {"a": 1}], [2.0, 3.0]], dtype=object), TypeError,
     "argument must be a string or a real number"),
    (np.array([["a", "b"], ["c", "d"]]), ValueError, "bytes/strings"),
    (np.zeros((0, 3)), ValueError, r"Found array with 0 sample\(s\) \(shape=\(0, 3\)\) while a "
                                   r"minimum of 1 is required by LedoitWolf\."),
    (np.zeros((5, 0)), ValueError, r"Found array with 0 feature\(s\) \(shape=\(5, 0\)\)"),
    (np.ones(4), ValueError, "Expected 2D array, got 1D array"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "Input X contains NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "Input X contains infinity"),
    (np.zeros((2, 3, 4)), ValueError, "per-sample matrices"),
])
def test_bad_input_messages_and_types(bad, exc, match):
    with pytest.raises(exc, match=match) as info:
        LedoitWolf().fit(bad)
    assert isinstance(info.value, CurvlabError)


def test_object_arrays_of_numbers_are_read():
    X = _samples(20, 3)
    a = LedoitWolf().fit(X.astype(object))
    assert a.shrinkage_ == pytest.approx(LedoitWolf().fit(X).shrinkage_, rel=1e-14)


def test_score_checks_the_number_of_features():
    fit = OAS().fit(_samples(20, 4))
    with pytest.raises(ValueError, match="X has 3 features, but OAS is expecting 4 features"):
        fit.score(_samples(5, 3))


def test_one_sample_warns_and_rmt_needs_two():
    with pytest.warns(UserWarning, match="Only one sample available"):
        fit = ShrunkCovariance().fit(np.arange(4.0)[None])
    np.testing.assert_array_equal(fit.covariance_, np.zeros((4, 4)))
    assert fit.score(np.ones((2, 4))) == -math.inf  # as scikit-learn: a singular model
    with pytest.raises(ValueError, match=r"1 sample\(s\).*minimum of 2 is required by RMTLinear"):
        RMTLinear().fit(np.arange(4.0)[None])


def test_unfitted_use_is_refused():
    with pytest.raises(CurvlabError, match="not fitted") as info:
        LedoitWolf().score(np.ones((3, 2)))
    assert isinstance(info.value, AttributeError) and isinstance(info.value, ValueError)
    assert not hasattr(LedoitWolf(), "num_params")


# ---------------------------------------------------------------------- vs scikit-learn
CASES = [(80, 6), (25, 25), (12, 40), (6, 150)]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("ours,theirs", [
    (LedoitWolf, skcov.LedoitWolf), (OAS, skcov.OAS),
    (EmpiricalCovariance, skcov.EmpiricalCovariance),
    (lambda **kw: ShrunkCovariance(shrinkage=0.3, **kw),
     lambda **kw: skcov.ShrunkCovariance(shrinkage=0.3, **kw)),
])
def test_covariance_api_equals_sklearn(shape, ours, theirs):
    X = _samples(*shape, seed=sum(shape))
    X_test = _samples(9, shape[1], seed=99)
    a, b = ours().fit(X), theirs().fit(X)
    scale = np.abs(b.precision_).max()
    np.testing.assert_allclose(a.covariance_, b.covariance_, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(a.precision_, b.precision_, rtol=0, atol=1e-9 * scale)
    singular = ours is EmpiricalCovariance and shape[0] <= shape[1]
    if singular:
        # the covariance of n <= p centred samples is singular: the likelihood is -inf
        # (scikit-learn's value follows the sign LAPACK gives a singular determinant)
        assert a.score(X_test) == -math.inf
    else:
        assert a.score(X_test) == pytest.approx(b.score(X_test), rel=1e-9)
    np.testing.assert_allclose(a.mahalanobis(X_test), b.mahalanobis(X_test), rtol=1e-8)
    lazy = ours(store_precision=False).fit(X)
    assert lazy.precision_ is None
    np.testing.assert_allclose(lazy.get_precision(), b.precision_, rtol=0, atol=1e-9 * scale)
    for norm in ("frobenius", "spectral"):
        for scaling in (True, False):
            assert a.error_norm(np.eye(shape[1]), norm=norm, scaling=scaling, squared=False) == \
                pytest.approx(b.error_norm(np.eye(shape[1]), norm=norm, scaling=scaling,
                                           squared=False), rel=1e-9)
    # torch in, torch out, same numbers
    t = ours().fit(torch.tensor(X))
    assert isinstance(t.covariance_, torch.Tensor) and isinstance(t.location_, torch.Tensor)
    assert t.score(torch.tensor(X_test)) == a.score(X_test)


def test_log_likelihood_equals_sklearn():
    for n, p in CASES:
        X = _samples(n, p, seed=n + p)
        S = empirical_covariance(X)
        for fitted in (skcov.EmpiricalCovariance().fit(X), skcov.LedoitWolf().fit(X)):
            P = fitted.precision_
            ours = log_likelihood(S, P)
            assert log_likelihood(torch.tensor(S), torch.tensor(P)) == ours
            if type(fitted) is skcov.EmpiricalCovariance and n <= p:
                assert ours == -math.inf  # the pseudo-inverse of a singular S
            else:
                assert ours == pytest.approx(skcov.log_likelihood(S, P), rel=1e-10)
    assert log_likelihood(np.eye(2), -np.eye(2)) == -math.inf  # not positive definite
    with pytest.raises(InvalidInputError, match="square"):
        log_likelihood(np.eye(2), np.ones(3))
    with pytest.raises(InvalidInputError, match="one shape"):
        log_likelihood(np.eye(2), np.eye(3))


def test_cross_val_score_equals_sklearn():
    X = _samples(60, 8, seed=5)
    for ours, theirs in ((LedoitWolf(), skcov.LedoitWolf()), (OAS(), skcov.OAS())):
        np.testing.assert_allclose(cross_val_score(ours, X, cv=3),
                                   cross_val_score(theirs, X, cv=3), rtol=1e-10)


def test_rank_deficient_precision_is_the_pseudo_inverse():
    X = _samples(8, 30, seed=3)
    a = ShrunkCovariance(shrinkage=0.0).fit(X)
    b = skcov.EmpiricalCovariance().fit(X)
    np.testing.assert_allclose(a.precision_, b.precision_, rtol=0,
                               atol=1e-9 * np.abs(b.precision_).max())
    assert a.score(X) == b.score(X) == -math.inf


# ---------------------------------------------------------------------- wide data
def test_wide_data_never_factorises_p_by_p(monkeypatch):
    """n << p: one n x n eigendecomposition at fit; solves, scores and the precision reuse
    it (no p x p eigh, pinv, solve, cholesky or inverse anywhere)."""
    n, p = 15, 400
    X = _samples(n, p, seed=7)
    calls = []
    for name in ("eigh", "pinv", "solve", "cholesky", "inv", "slogdet", "eigvalsh", "svd"):
        original = getattr(torch.linalg, name)

        def spy(A, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, tuple(A.shape)))
            return _original(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, spy)
    fit = LedoitWolf().fit(X)
    v = torch.randn(p, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        x = fit.solve(v)
    fit.score(X)
    fit.mahalanobis(X)
    monkeypatch.undo()
    assert calls == [("eigh", (n, n))]
    ref = skcov.LedoitWolf().fit(X)
    torch.testing.assert_close(x, torch.tensor(ref.precision_) @ v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fit.matvec(x), v, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fit.precision_, ref.precision_, rtol=0,
                               atol=1e-10 * np.abs(ref.precision_).max())
    assert fit.score(X) == pytest.approx(ref.score(X), rel=1e-10)


# ---------------------------------------------------------------------- operators
def test_a_fitted_shrinkage_is_an_operator():
    import curvlab
    from curvlab.operators import IdentityOperator, Operator
    from curvlab.optim.lanczos_opt import lanczos_direction
    from curvlab.spectral import eigenpairs

    X = _samples(40, 12, seed=8)
    fit = LedoitWolf().fit(X)
    assert isinstance(fit, Operator)
    assert (fit.num_params, fit.dtype, fit.device) == (12, F64, torch.device("cpu"))
    ref = np.linalg.eigvalsh(fit.covariance_)[::-1]
    pairs = eigenpairs(fit, k=3, seed=0)
    np.testing.assert_allclose(pairs.values.numpy(), ref[:3], rtol=1e-8)
    np.testing.assert_allclose(fit.eigenpairs(k=3).values.numpy(), ref[:3], rtol=1e-8)
    # the operator algebra and scipy see the same matrix
    damped = fit + 0.5 * IdentityOperator.like(fit)
    v = torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(damped @ v, torch.tensor(fit.covariance_) @ v + 0.5 * v)
    from scipy.sparse.linalg import eigsh

    assert float(eigsh(fit.to_scipy(), k=1)[0][0]) == pytest.approx(ref[0], rel=1e-10)
    # LanczosOPT's step with all P eigenpairs of the shrunk matrix is its damped solve
    full = eigenpairs(fit, k=12, tol=1e-12, seed=0)
    step = lanczos_direction(v, full.values, full.vectors, damping=0.5)
    torch.testing.assert_close(step, torch.linalg.solve(damped.to_dense(), v), rtol=1e-7,
                               atol=1e-9)
    # a fitted shrinkage can itself be shrunk (any operator takes a FixedShrinkage)
    twice = FixedShrinkage(damping=1.0).fit(fit)
    torch.testing.assert_close(twice.matvec(v), 0.5 * (fit.matvec(v) + v))
    # numpy vectors in, numpy out
    assert isinstance(fit.solve(np.ones(12)), np.ndarray)
    with pytest.raises(CurvlabError, match="shape"):
        fit.matvec(torch.ones(5, dtype=F64))
    assert curvlab.Operator is Operator


@pytest.mark.parametrize("make", [
    lambda: LedoitWolf2020().fit(np.random.default_rng(0).standard_normal((60, 10))),
    lambda: RotationInvariant().fit(SpikedModel(30, spikes=(8.0,), noise=2.0).sample(6)),
    lambda: EigenvalueClipping().fit(SpikedModel(30, spikes=(8.0,), noise=2.0).sample(6)),
    lambda: RMTLinear().fit(SpikedModel(20, spikes=(8.0,), noise=2.0).sample(6)),
])
def test_every_fit_is_an_operator(make):
    from curvlab.spectral import eigenpairs

    fit = make()
    dense = torch.as_tensor(fit.covariance_, dtype=F64)
    top = float(eigenpairs(fit, k=1, seed=0).values[0])
    assert top == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)


@pytest.mark.parametrize("shape", [(30, 5), (7, 20), (1, 4), (12, 1)])
@pytest.mark.parametrize("centred", [False, True])
def test_function_forms_equal_sklearn(shape, centred):
    import warnings

    from curvlab.shrinkage import (
        empirical_covariance,
        ledoit_wolf,
        ledoit_wolf_shrinkage,
        oas,
        shrunk_covariance,
    )

    X = _samples(*shape, seed=shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one sample: both warn (tested above)
        ours = empirical_covariance(X, assume_centered=centred)
        theirs = skcov.empirical_covariance(X, assume_centered=centred)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(shrunk_covariance(theirs, 0.3),
                                   skcov.shrunk_covariance(theirs, 0.3), rtol=1e-13)
        assert ledoit_wolf_shrinkage(X, assume_centered=centred, block_size=3) == \
            pytest.approx(skcov.ledoit_wolf_shrinkage(X, assume_centered=centred), abs=1e-12)
        for ours_fn, theirs_fn in ((ledoit_wolf, skcov.ledoit_wolf), (oas, skcov.oas)):
            cov, rho = ours_fn(X, assume_centered=centred)
            ref_cov, ref_rho = theirs_fn(X, assume_centered=centred)
            assert rho == pytest.approx(ref_rho, abs=1e-12)
            np.testing.assert_allclose(cov, ref_cov, rtol=1e-11, atol=1e-13)
        assert empirical_covariance(torch.tensor(X, dtype=torch.float32)).dtype == torch.float32
