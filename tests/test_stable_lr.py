"""largest_stable_lr (paper section 8) on cases whose stability threshold is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab.errors import InvalidInputError
from curvlab.optim import largest_stable_lr
from curvlab.optim.stable_lr import default_grid

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
