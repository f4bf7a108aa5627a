"""Spectral algorithms on model Hessians (autograd backend) against dense torch.func Hessians."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    MODELS,
    assert_state_equal,
    dense_hessian,
    make_data,
    make_model,
    model_state,
)
from torch import nn

import curvlab

F64 = torch.float64


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", MODELS)
def test_eigenpairs_of_model_hessians(name, which):
    """Top / bottom 10 of indefinite Hessians at initialization; ncv=20 forces restarts."""
    model = make_model(name)
    x, y = make_data(name)
    loss = nn.CrossEntropyLoss()
    H = dense_hessian(model, loss, x, y)
    evals = torch.linalg.eigvalsh(H)
    expected = evals.flip(0)[:10] if which == "largest" else evals[:10].flip(0)
    before = model_state(model)
    est = curvlab.estimator("autograd", model, loss, (x, y))
    res = est.eigenpairs(k=10, which=which, tol=1e-6, ncv=20, seed=0)
    assert_state_equal(before, model_state(model))
    assert est.num_params > 2 * 20  # the Lanczos path, not the dense fallback
    assert res.converged and res.n_matvecs == est.n_matvecs
    assert ((res.values - expected).abs() / expected.abs()).max() <= 1e-6
    true_res = (H @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert torch.allclose(res.residuals, true_res, rtol=0, atol=1e-12 * float(evals.abs().max()))
    assert torch.allclose(res.vectors.T @ res.vectors, torch.eye(10, dtype=F64), atol=1e-9)


def test_float32_model():
    model = make_model("cnn", torch.float32)
    x, y = make_data("cnn", dtype=torch.float32)
    loss = nn.CrossEntropyLoss()
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss, x, y).double())
    est = curvlab.estimator("autograd", model, loss, (x, y))
    res = est.eigenpairs(k=5, tol=1e-5, ncv=20)
    assert res.values.dtype == res.vectors.dtype == torch.float32
    assert torch.allclose(res.values.double(), evals.flip(0)[:5], rtol=1e-4)


@pytest.fixture(scope="module")
def digits():
    """Softmax regression on scikit-learn's digits with its dense Hessian (P = 650)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=F64)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Linear(64, 10).to(F64)
    loss = nn.CrossEntropyLoss()
    return model, loss, (x, y), dense_hessian(model, loss, x, y)


def test_digits_top_eigenpairs(digits):
    model, loss, data, H = digits
    evals = torch.linalg.eigvalsh(H).flip(0)
    est = curvlab.estimator("autograd", model, loss, data)
    res = est.eigenpairs(k=10, seed=1)
    assert res.converged and res.n_matvecs == est.n_matvecs < 100
    assert ((res.values - evals[:10]).abs() / evals[:10]).max() <= 1e-6


def test_digits_density_trace_and_diagonal(digits):
    model, loss, data, H = digits
    P = H.shape[0]
    est = curvlab.estimator("autograd", model, loss, data)
    sd = est.spectral_density(n_probes=20, n_steps=30, seed=0)
    assert sd.n_matvecs == 20 * 30
    for power, exact in ((1, torch.trace(H)), (2, (H**2).sum())):
        per_probe = (sd.weights * sd.nodes**power).sum(1)
        assert abs(per_probe.mean() - exact / P) <= 4 * per_probe.std() / math.sqrt(20)
    tr = est.trace(n_matvecs=60, seed=0)
    assert abs(tr.value - float(torch.trace(H))) <= 4 * tr.stderr
    sq = est.trace_of_square(n_matvecs=60, seed=0)
    assert abs(sq.value - float((H**2).sum())) <= 4 * sq.stderr
    exact = torch.diagonal(H)
    estimates = {m: est.diagonal(method=m, n_matvecs=100) for m in ("xdiag", "hutchinson")}
    err = {m: float((e.value - exact).norm() / exact.norm()) for m, e in estimates.items()}
    assert err["xdiag"] < err["hutchinson"] < 1
    for e in estimates.values():  # the entrywise standard errors are calibrated
        spread = e.stderr > 0  # entries without off-diagonal mass are exact
        assert torch.allclose(e.value[~spread], exact[~spread], rtol=1e-10, atol=1e-12)
        z = (e.value - exact)[spread] / e.stderr[spread]
        assert 0.5 < float(z.std()) < 2.0 and float((z.abs() > 4).float().mean()) < 0.01
