"""largest_stable_lr and preconditioned_sharpness (paper section 8) on cases whose answer is
known: stability thresholds, collapsed classifiers, dense preconditioned Hessians."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from helpers import dense_ggn, dense_hessian
from torch import nn

import curvlab
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError
from curvlab.optim import KFAC, KFACFactors, largest_stable_lr
from curvlab.optim.stable_lr import default_grid, preconditioned_sharpness

MSE = nn.MSELoss()


def sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr)


def quadratic_problem():
    """L(w) = mean_n (x_n . w)^2 with H = 2 X^T X / N = diag(1, 10): GD is stable iff lr < 0.2."""
    x = torch.diag(torch.tensor([1.0, math.sqrt(10.0)], dtype=torch.float64))
    y = torch.zeros(2, 1, dtype=torch.float64)

    def model_factory():
        model = nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            model.weight.fill_(1.0)
        return model

    return model_factory, (x, y)


def test_gradient_descent_threshold_is_two_over_lambda_max():
    model_factory, data = quadratic_problem()
    grid = [10 ** (-3 + 0.25 * i) for i in range(13)] + [1e4]  # 1e-3 ... 1, and a blow-up
    rng_before = torch.get_rng_state()
    result = largest_stable_lr(sgd, model_factory, MSE, data, lrs=grid, n_steps=40)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert result.lrs == tuple(sorted(grid))
    assert result.initial_loss == pytest.approx(5.5)  # (1 + 10) / 2
    # GD multiplies the sharp coordinate by (1 - 10 lr): it shrinks iff lr < 2 / 10
    assert result.stable == tuple(lr < 0.2 for lr in result.lrs)
    assert result.lr == pytest.approx(10**-0.75)  # 0.178, the last grid value below 0.2
    by_lr = dict(zip(result.lrs, result.final_losses))
    assert by_lr[10**-0.5] > result.initial_loss and math.isfinite(by_lr[10**-0.5])
    assert not math.isfinite(by_lr[1e4])  # overflowed: unstable under the "finite" clause
    assert result.n_steps == 40


def test_no_stable_rate_gives_none():
    model_factory, data = quadratic_problem()
    result = largest_stable_lr(sgd, model_factory, MSE, data, lrs=[1.0, 10.0], n_steps=5)
    assert result.lr is None
    assert result.stable == (False, False)


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (torch.tensor(x / 16.0, dtype=torch.float64), torch.tensor(y))


def test_digits_logistic_regression_sgd():
    x, y = digits()
    ce = nn.CrossEntropyLoss()

    def model_factory():
        return nn.Linear(64, 10).double()

    grid = [10.0**i for i in range(-2, 4)]
    result = largest_stable_lr(sgd, model_factory, ce, (x, y), lrs=grid, n_steps=20, seed=0)
    for final, ok in zip(result.final_losses, result.stable):  # the stated definition
        assert ok == (math.isfinite(final) and final < result.initial_loss)
    assert result.lr == max(lr for lr, ok in zip(result.lrs, result.stable) if ok)
    # The loss is L-smooth with L <= lambda_max(X~^T X~ / N) (softmax curvature <= 1, X~ with
    # a bias column), so by the descent lemma every lr < 2 / L decreases the loss each step.
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    smoothness = torch.linalg.eigvalsh(xt.T @ xt / len(x))[-1].item()
    assert all(ok for lr, ok in zip(result.lrs, result.stable) if lr < 2 / smoothness)
    # cross-entropy grows only linearly in the logits, so GD stays stable far above 2 / L;
    # full batch on a convex loss: stability is monotone along this grid, and 1e3 diverges
    first_unstable = result.stable.index(False)
    assert all(result.stable[:first_unstable]) and not any(result.stable[first_unstable:])
    assert 2 / smoothness < result.lr < 1e3


def test_default_grid():
    assert default_grid() == pytest.approx([10 ** (-5 + 0.5 * i) for i in range(13)], rel=1e-12)


def test_same_seed_same_answer_and_bad_input():
    model_factory, data = quadratic_problem()
    a = largest_stable_lr(sgd, model_factory, MSE, data, lrs=[0.01, 0.5], n_steps=3)
    b = largest_stable_lr(sgd, model_factory, MSE, data, lrs=[0.5, 0.01], n_steps=3)
    assert a == b  # the grid's order does not matter

    def random_init():  # the seed decides the initial weights
        return nn.Linear(2, 1, bias=False).double()

    runs = [
        largest_stable_lr(sgd, random_init, MSE, data, lrs=[0.01, 0.5], n_steps=3, seed=s)
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0].final_losses != runs[2].final_losses
    with pytest.raises(InvalidInputError):
        largest_stable_lr(sgd, model_factory, MSE, data, lrs=[-1.0], n_steps=3)
    with pytest.raises(InvalidInputError):
        largest_stable_lr(sgd, model_factory, MSE, data, lrs=[0.1], n_steps=0)


# --------------------------------------------------------------------------- collapse


class CollapseAbove(torch.optim.Optimizer):
    """SGD below ``threshold``; at or above it, the first step kills every ReLU (first-layer
    bias -1e3) and sets the output bias to the log label frequencies: the best constant
    classifier, whose loss (the label entropy) is below a random network's."""

    def __init__(self, model, lr, log_prior, threshold=1.0):
        super().__init__(model.parameters(), {"lr": lr})
        self.model, self.log_prior, self.threshold = model, log_prior, threshold

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        if self.param_groups[0]["lr"] >= self.threshold:
            self.model[0].bias.fill_(-1e3)
            self.model[2].bias.copy_(self.log_prior)
        else:
            for p in self.model.parameters():
                p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        return loss


def test_a_collapsed_classifier_is_unstable():
    x, y = digits()
    x, y = x[:300].float(), y[:300]
    counts = torch.bincount(y, minlength=10).float()
    log_prior = (counts / counts.sum()).log()

    def model_factory():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def factory(model, lr):
        return CollapseAbove(model, lr, log_prior)

    ce = nn.CrossEntropyLoss()
    result = largest_stable_lr(factory, model_factory, ce, (x, y), lrs=[0.1, 1.0], n_steps=5)
    entropy = float(-(counts / counts.sum() * log_prior).sum())
    collapsed_loss = result.final_losses[1]
    assert collapsed_loss == pytest.approx(entropy, rel=1e-5)
    assert collapsed_loss < result.initial_loss  # clause 2 alone would call it stable
    assert result.collapsed == (False, True)
    assert result.output_spreads[1] == 0.0 and result.output_spreads[0] > 0.5
    assert result.final_accuracies[1] == pytest.approx(float(counts.max() / counts.sum()))
    assert result.stable == (True, False) and result.lr == 0.1
    off = largest_stable_lr(
        factory, model_factory, ce, (x, y), lrs=[0.1, 1.0], n_steps=5, collapse_tol=0.0
    )
    assert off.stable == (True, True)  # the clause switched off: the loss criterion only


def test_regression_that_converges_to_a_constant_is_not_a_collapse():
    model_factory, data = quadratic_problem()  # the optimum predicts 0 for every input
    result = largest_stable_lr(sgd, model_factory, MSE, data, lrs=[0.15], n_steps=200)
    assert result.output_spreads[0] < 1e-6 and result.collapsed == (False,)
    assert result.final_accuracies == (None,) and result.stable == (True,)


# --------------------------------------------------------------------------- sharpness


def small_classifier(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    return model, x, y


def test_sgd_sharpness_is_the_top_hessian_eigenvalue():
    model, x, y = small_classifier()
    ce = nn.CrossEntropyLoss()
    truth = float(torch.linalg.eigvalsh(dense_hessian(model, ce, x, y))[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert preconditioned_sharpness(model, ce, (x, y), opt, tol=1e-8) == pytest.approx(
        truth, rel=1e-6
    )
    assert preconditioned_sharpness(model, ce, (x, y), tol=1e-8) == pytest.approx(truth, rel=1e-6)


def test_sharpness_takes_an_estimator_factory_as_the_backend():
    """A backend name is an alias of curvlab.estimator(name, ...); any factory
    (model, loss_fn, data, params=) -> Operator may provide H instead: here the dense GGN,
    whose top eigenvalue is the truth."""
    model, x, y = small_classifier()
    ce = nn.CrossEntropyLoss()
    ggn = dense_ggn(model, ce, x, y)
    seen = []

    def dense_factory(model_, loss_fn, data, params):
        seen.append(len(params))
        return curvlab.DenseOperator(ggn)

    got = preconditioned_sharpness(model, ce, (x, y), backend=dense_factory, tol=1e-8)
    assert got == pytest.approx(float(torch.linalg.eigvalsh(ggn)[-1]), rel=1e-6)
    assert seen == [4]
    with pytest.raises(InvalidInputError, match="backend must be a backend name or"):
        preconditioned_sharpness(model, ce, (x, y), backend=3)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_sharpness_matches_the_dense_diagonally_preconditioned_hessian(amsgrad):
    model, x, y = small_classifier()
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3, amsgrad=amsgrad)
    for _ in range(5):
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()
    # B = sqrt(v / (1 - beta2^t)) + eps, torch's Adam denominator, read from its state
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    b = torch.cat(
        [
            ((opt.state[p][key] / (1 - 0.999**5)).sqrt() + 1e-3).reshape(-1)
            for p in model.parameters()
        ]
    )
    h = dense_hessian(model, ce, x, y)
    truth = float(torch.linalg.eigvalsh(h / torch.outer(b.sqrt(), b.sqrt()))[-1])
    got = preconditioned_sharpness(model, ce, (x, y), opt, tol=1e-8)
    assert got == pytest.approx(truth, rel=1e-6)


def _kfac_dense_preconditioner(opt, model) -> torch.Tensor:
    """B = G (x) A + delta I of a one-Linear model, in the flat order [W.flatten(), b]:
    (G (x) A) acts on the row-major vector of [W | b] (bias column last)."""
    ((A, G),) = opt.factors().values()
    d_out, d_in = model.weight.shape
    kron = torch.kron(G, A)  # row-major vec of the [d_out, d_in + 1] matrix
    order = [i * (d_in + 1) + j for i in range(d_out) for j in range(d_in)]
    order += [i * (d_in + 1) + d_in for i in range(d_out)]
    perm = torch.tensor(order)
    b = kron[perm][:, perm]
    return b + opt.param_groups[0]["damping"] * torch.eye(len(order), dtype=b.dtype)


def test_kfac_sharpness_matches_the_dense_generalised_eigenproblem():
    model, x, y = small_classifier()
    model = model[0]  # one Linear layer (softmax regression on 6 features)
    ce = nn.CrossEntropyLoss()
    opt = KFAC(model, ce, lr=0.5, damping=0.05, factors=KFACFactors(fisher_type="type-2"))
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(ce(model(x), y), list(model.parameters()))
    opt.step((x, y))
    b = _kfac_dense_preconditioner(opt, model)
    g = torch.cat([t.reshape(-1) for t in grads])
    moved = torch.cat([(w0 - w).reshape(-1) for w0, w in zip(before, model.parameters())])
    # the layout is KFAC's own: its first step is lr B^-1 g with these factors
    torch.testing.assert_close(moved / 0.5, torch.linalg.solve(b, g), rtol=1e-8, atol=1e-10)
    h = dense_hessian(model, ce, x, y)
    truth = float(scipy.linalg.eigh(h.numpy(), b.numpy(), eigvals_only=True)[-1])
    got = preconditioned_sharpness(model, ce, (x, y), opt, tol=1e-8)
    assert got == pytest.approx(truth, rel=1e-6)


def test_sharpness_in_the_stable_lr_search_and_unsupported_optimizers():
    model_factory, data = quadratic_problem()
    result = largest_stable_lr(
        sgd, model_factory, MSE, data, lrs=[0.1, 0.15, 0.3], n_steps=40, sharpness=True
    )
    assert result.lr == 0.15
    assert result.sharpness == pytest.approx(10.0, rel=1e-6)  # H = diag(1, 10)
    assert result.lr_times_sharpness == pytest.approx(1.5, rel=1e-6)
    plain = largest_stable_lr(sgd, model_factory, MSE, data, lrs=[0.1], n_steps=3)
    assert plain.sharpness is None and plain.lr_times_sharpness is None
    model = model_factory()
    with pytest.raises(UnsupportedCapabilityError, match="RMSprop"):
        preconditioned_sharpness(model, MSE, data, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(InvalidInputError, match="not taken a step"):
        preconditioned_sharpness(model, MSE, data, torch.optim.Adam(model.parameters()))


def test_kfac_is_stepped_on_the_batch():
    x, y = digits()
    ce = nn.CrossEntropyLoss()

    def model_factory():
        return nn.Linear(64, 10).double()

    def factory(model, lr):
        return KFAC(model, ce, lr=lr, damping=0.1)

    batches = [(x[i : i + 200], y[i : i + 200]) for i in range(0, 600, 200)]
    result = largest_stable_lr(
        factory, model_factory, ce, batches, lrs=[0.01, 1e4], n_steps=6, sharpness=True
    )
    assert result.stable == (True, False) and result.lr == 0.01
    assert result.sharpness > 0 and math.isfinite(result.sharpness)
