"""diagonal(): the same exact answer on every backend by default; estimates carry stderr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from curvlab import DiagonalEstimate, InvalidInputError

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(F64)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen, dtype=F64), torch.randint(0, 4, (40,), generator=gen)
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.mark.parametrize(
    ("backend", "curvature"),
    [("autograd", "hessian"), ("pyhessian", "hessian"), ("backpack", "hessian"),
     ("autograd", "ggn"), ("backpack", "ggn")],
)
def test_default_diagonal_is_exact_on_every_backend(backend, curvature):
    model, loss_fn, data = _setup()
    est = curvlab.estimator(backend, model, loss_fn, data, curvature=curvature)
    dense = curvlab.estimator("autograd", model, loss_fn, data, curvature=curvature).to_dense()
    d = est.diagonal()
    assert isinstance(d, torch.Tensor)
    torch.testing.assert_close(d, dense.diagonal(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["xdiag", "hutchinson"])
def test_an_estimate_with_budget_for_exactness_uses_the_backends_own_diagonal(method):
    model, loss_fn, data = _setup()
    est = curvlab.estimator("backpack", model, loss_fn, data, curvature="ggn")
    exact = est.diagonal()
    before = est.n_matvecs
    got = est.diagonal(method=method, n_matvecs=est.num_params)
    assert est.n_matvecs == before and got.exact and got.n_matvecs == 0
    assert torch.equal(got.value, exact) and torch.equal(got.stderr, torch.zeros_like(exact))


@pytest.mark.parametrize("method", ["xdiag", "hutchinson"])
def test_estimates_carry_a_calibrated_standard_error(method):
    model, loss_fn, data = _setup()
    est = curvlab.estimator("autograd", model, loss_fn, data)
    exact = est.diagonal()
    z = []
    for seed in range(20):
        e = est.diagonal(method=method, n_matvecs=30, seed=seed)
        assert isinstance(e, DiagonalEstimate) and not e.exact and e.n_matvecs == 30
        z.append((e.value - exact) / e.stderr)
    z = torch.cat(z)
    assert 0.6 < float(z.std()) < 1.6  # standard errors of the right size
    full = est.diagonal(method=method, n_matvecs=est.num_params)
    assert full.exact and torch.equal(full.stderr, torch.zeros_like(exact))
    torch.testing.assert_close(full.value, exact, rtol=1e-12, atol=1e-14)


def test_a_budget_without_an_estimation_method_is_refused():
    model, loss_fn, data = _setup()
    est = curvlab.estimator("autograd", model, loss_fn, data)
    with pytest.raises(InvalidInputError, match="method"):
        est.diagonal(n_matvecs=10)
    with pytest.raises(InvalidInputError, match="method"):
        est.diagonal(method="exactly")


def test_callback_reports_the_products_of_an_exact_diagonal():
    model, loss_fn, data = _setup()
    est = curvlab.estimator("autograd", model, loss_fn, data)
    events = []
    est.diagonal(callback=events.append, progress=False)
    assert events and events[-1].info["n_matvecs"] == est.num_params
