"""The PyHessian adapter: exact products, its own algorithms repaired, the model left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    CUDA,
    LOSSES,
    assert_state_equal,
    dense_hessian,
    make_data,
    make_model,
    model_state,
)
from pyhessian import hessian as PyHessian
from torch import nn

import curvlab
from curvlab.errors import InvalidInputError, UnsupportedModelError
from curvlab.results import Eigenpairs, Estimate, SpectralDensity

F64 = torch.float64
EXACT = dict(rtol=1e-10, atol=1e-12)


def uneven(x, y):
    return [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]


def probes(n: int, k: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, k, dtype=F64, generator=torch.Generator().manual_seed(seed))


def estimator(name="tanh_mlp", target="ce", batches=True, **kw):
    model = make_model(name)
    x, y = make_data(name, target=target)
    loss_fn = LOSSES[target]()
    data = uneven(x, y) if batches else (x, y)
    return curvlab.estimator("pyhessian", model, loss_fn, data, **kw), model, loss_fn, x, y


@pytest.mark.parametrize(
    "name,target", [("tanh_mlp", "ce"), ("cnn", "mse"), ("buffer_frozen", "ce")]
)
def test_products_match_dense_hessian_over_uneven_batches(name, target):
    est, model, loss_fn, x, y = estimator(name, target)
    H = dense_hessian(model, loss_fn, x, y)
    V = probes(est.num_params)
    torch.testing.assert_close(est.matvec(V), H @ V, **EXACT)
    torch.testing.assert_close(est.matvec(V[:, 0]), H @ V[:, 0], **EXACT)
    assert est.n_matvecs == 5


def test_model_mode_grads_and_flags_left_exactly_as_found():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    model.train()
    grads = {}
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:  # some .grad set by the user, some None
            p.grad = torch.full_like(p, 0.5)
            grads[i] = p.grad
    before = model_state(model)
    last = list(model.parameters())[-2:]
    est = curvlab.estimator("pyhessian", model, nn.CrossEntropyLoss(), (x, y), params=last)
    V = probes(est.num_params)
    est.matvec(V)
    est.power_eigenvalues(top_n=1, maxIter=5)
    est.native_trace(maxIter=3)
    est.native_density(iter=5)
    assert_state_equal(before, model_state(model))
    assert model.training
    for i, p in enumerate(model.parameters()):
        assert p.grad is grads.get(i)  # the very same tensor (or None), no graph attached
    H = dense_hessian(model, nn.CrossEntropyLoss(), x, y)[-21:, -21:]  # last layer block
    torch.testing.assert_close(est.matvec(V), H @ V, **EXACT)


def test_follows_in_place_parameter_updates_and_release():
    est, model, loss_fn, x, y = estimator()
    V = probes(est.num_params)
    est.matvec(V)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(est.matvec(V), dense_hessian(model, loss_fn, x, y) @ V, **EXACT)
    est.release()
    torch.testing.assert_close(est.matvec(V), dense_hessian(model, loss_fn, x, y) @ V, **EXACT)


def test_power_iteration_finds_the_largest_magnitude_eigenvalues():
    est, model, loss_fn, x, y = estimator()
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, x, y))
    top = evals[evals.abs().argsort(descending=True)[:2]].sort(descending=True).values
    start = est.n_matvecs
    pairs = est.power_eigenvalues(top_n=2, maxIter=500, tol=1e-9, seed=1)
    assert isinstance(pairs, Eigenpairs) and pairs.converged
    assert pairs.n_matvecs == est.n_matvecs - start > 2
    torch.testing.assert_close(pairs.values, top, rtol=1e-5, atol=0)
    assert pairs.vectors.shape == (est.num_params, 2)
    unit = torch.ones(2, dtype=F64)
    torch.testing.assert_close(pairs.vectors.norm(dim=0), unit, rtol=1e-5, atol=0)
    assert (pairs.residuals < 1e-3).all()
    again = est.power_eigenvalues(top_n=2, maxIter=500, tol=1e-9, seed=1)
    assert torch.equal(again.values, pairs.values)


def test_native_trace_is_an_estimate_with_an_error_bar():
    est, model, loss_fn, x, y = estimator()
    true = float(dense_hessian(model, loss_fn, x, y).trace())
    tr = est.native_trace(maxIter=200, tol=1e-4, seed=2)
    assert isinstance(tr, Estimate) and tr.n_matvecs == len(tr.samples) >= 2
    assert tr.stderr > 0
    assert abs(tr.value - true) < 4 * tr.stderr


def test_native_trace_does_not_stop_early_on_a_negative_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(F64)
    x, y = make_data("tanh_mlp", target="mse")

    def neg_mse(out, t):  # a concave loss: its Hessian's trace is negative
        return -nn.functional.mse_loss(out, t)

    # PyHessian 0.1 itself divides by the signed trace and stops after two samples
    samples = PyHessian(copy.deepcopy(model), neg_mse, data=(x, y), cuda=False).trace(maxIter=50)
    assert len(samples) == 2
    est = curvlab.estimator("pyhessian", model, neg_mse, (x, y))
    true = float(dense_hessian(model, neg_mse, x, y).trace())
    assert true < 0
    tr = est.native_trace(maxIter=50, tol=1e-3, seed=0)
    assert tr.n_matvecs > 2
    assert abs(tr.value - true) < 4 * tr.stderr + 1e-9


def test_native_density_runs_on_current_torch_and_matches_curvlab_slq():
    est, model, loss_fn, x, y = estimator(batches=False)
    H = dense_hessian(model, loss_fn, x, y)
    P = est.num_params
    dens = est.native_density(iter=P, n_v=2, seed=4)
    assert isinstance(dens, SpectralDensity) and dens.nodes.shape == (2, P)
    assert dens.n_matvecs == 2 * P
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(2, dtype=F64), rtol=1e-5, atol=0)
    step = float(dens.grid[1] - dens.grid[0])
    assert abs(float(dens.density.sum()) * step - 1.0) < 1e-9
    # a full Lanczos run recovers the spectrum: the extreme nodes are the extreme eigenvalues
    evals = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(dens.nodes[:, -1], evals[-1].expand(2), rtol=1e-5, atol=0)
    torch.testing.assert_close(dens.nodes[:, 0], evals[0].expand(2), rtol=1e-5, atol=0)
    # same seed, same probes: PyHessian's quadrature matches curvlab's probe by probe
    ours = est.native_density(iter=12, n_v=3, seed=7)
    slq = est.spectral_density(n_probes=3, n_steps=12, seed=7)
    torch.testing.assert_close(ours.nodes, slq.nodes, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.weights, slq.weights, rtol=0, atol=1e-5)
    with pytest.raises(InvalidInputError, match="iter"):
        est.native_density(iter=P + 1)


def test_top_eigenvalues_agree_with_curvlab_lanczos():
    est, model, loss_fn, x, y = estimator()
    lanczos = est.eigenpairs(k=2, seed=0)
    power = est.power_eigenvalues(top_n=2, maxIter=500, tol=1e-9)
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, x, y))
    torch.testing.assert_close(lanczos.values, evals[-2:].flip(0), rtol=1e-8, atol=1e-10)
    if (evals[-2:] > evals[:2].abs().max()).all():  # power iteration finds the same pair
        torch.testing.assert_close(power.values, lanczos.values, rtol=1e-5, atol=0)


def test_bad_inputs_raise():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    with pytest.raises(InvalidInputError, match="reduction='mean'"):
        curvlab.estimator("pyhessian", model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    def per_sample(out, target):
        return nn.functional.cross_entropy(out, target, reduction="none")

    with pytest.raises(InvalidInputError, match="scalar"):
        curvlab.estimator("pyhessian", model, per_sample, (x, y))
    assert model.training  # the failed construction restored the mode

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(5, 3)
            self.spare = nn.Linear(5, 3)

        def forward(self, inp):
            return self.used(inp)

    spare = Unused().to(F64)
    est = curvlab.estimator("pyhessian", spare, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(UnsupportedModelError, match=r"spare\.weight"):
        est.matvec(torch.zeros(est.num_params, dtype=F64))
    assert all(p.grad is None for p in spare.parameters())
    est = curvlab.estimator("pyhessian", model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(InvalidInputError):
        est.power_eigenvalues(top_n=0)
    with pytest.raises(InvalidInputError, match="two samples"):
        est.native_trace(maxIter=1)


@CUDA
def test_runs_on_the_parameters_cuda_device():
    est, model, loss_fn, x, y = estimator(batches=False)
    H = dense_hessian(model, loss_fn, x, y)
    model.cuda()
    est = curvlab.estimator("pyhessian", model, loss_fn, (x.cuda(), y.cuda()))
    V = probes(est.num_params)
    torch.testing.assert_close(est.matvec(V.cuda()).cpu(), H @ V, rtol=1e-8, atol=1e-10)
