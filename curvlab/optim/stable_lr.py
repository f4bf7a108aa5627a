"""The largest stable learning rate on a logarithmic grid (paper section 8).

Section 8 reads the largest learning rate that trains stably as a measure of how well an
optimizer's preconditioner B captures the sharpest curvature: to second order a step is
stable while alpha < 2 / ||B^-1/2 H B^-1/2||_op (for gradient descent, 2 / lambda_max).

Definition used here: a learning rate is *stable* if, after ``n_steps`` optimizer steps from
the same initialization (``model_factory()`` under ``torch.manual_seed(seed)``) over the
same batches in the same order (cycled), every training loss along the way was finite and
the final training loss over all of ``data`` is finite and strictly below its initial value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from curvlab._params import _is_batch, as_batches
from curvlab.errors import InvalidInputError


@dataclass(frozen=True)
class StableLRResult:
    """Outcome of :func:`largest_stable_lr` (grid in ascending order)."""

    lr: float | None  # the largest stable grid value; None if none is stable
    lrs: tuple[float, ...]
    final_losses: tuple[float, ...]  # training loss after n_steps (nan/inf where it diverged)
    stable: tuple[bool, ...]
    initial_loss: float
    n_steps: int


def default_grid() -> tuple[float, ...]:
    """13 learning rates 1e-5 ... 10, half a decade apart."""
    return tuple(float(v) for v in torch.logspace(-5, 1, 13, dtype=torch.float64))


def _full_loss(model: nn.Module, loss_fn, batches) -> float:
    n = sum(int(x.shape[0]) for x, _ in batches)
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) * int(x.shape[0]) for x, y in batches) / n


def _train(optimizer_factory, model_factory, loss_fn, data, lr, n_steps, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise InvalidInputError("model_factory must return a torch.nn.Module")
        batches = as_batches(data, next(model.parameters()).device)
        initial = _full_loss(model, loss_fn, batches)
        optimizer = optimizer_factory(model, lr)
        for t in range(n_steps):
            x, y = batches[t % len(batches)]

            def closure(x=x, y=y):
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            if loss is not None and not math.isfinite(float(torch.as_tensor(loss).detach())):
                return initial, float(torch.as_tensor(loss).detach())
        return initial, _full_loss(model, loss_fn, batches)


def largest_stable_lr(
    optimizer_factory: Callable[[nn.Module, float], torch.optim.Optimizer],
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable,
    data,
    lrs: Sequence[float] | None = None,
    n_steps: int = 100,
    seed: int = 0,
) -> StableLRResult:
    """Train a fresh model at every grid value and report the largest stable one.

    ``optimizer_factory(model, lr)`` builds the optimizer (e.g. ``lambda m, lr:
    torch.optim.SGD(m.parameters(), lr=lr)``); its ``step`` is called with a closure that
    zeroes the gradients, computes the loss on the next batch and back-propagates.
    ``data`` is one (x, y) batch (full-batch training) or a list of batches. Stability is
    defined in the module docstring. The global RNG state is left as found.
    """
    grid = default_grid() if lrs is None else tuple(sorted(float(lr) for lr in lrs))
    if not grid or not all(lr > 0 and math.isfinite(lr) for lr in grid):
        raise InvalidInputError(f"lrs must be a non-empty sequence of positive floats, got {lrs}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise InvalidInputError(f"n_steps must be a positive int, got {n_steps!r}")
    data = data if _is_batch(data) else list(data)  # a one-pass iterable serves every lr
    initials, finals = [], []
    for lr in grid:
        initial, final = _train(optimizer_factory, model_factory, loss_fn, data, lr, n_steps, seed)
        initials.append(initial)
        finals.append(final)
    if not math.isfinite(initials[0]):
        raise InvalidInputError(f"the initial loss is not finite ({initials[0]}); check the model")
    stable = tuple(math.isfinite(f) and f < i for i, f in zip(initials, finals))
    best = max((lr for lr, ok in zip(grid, stable) if ok), default=None)
    return StableLRResult(
        lr=best,
        lrs=grid,
        final_losses=tuple(finals),
        stable=stable,
        initial_loss=initials[0],
        n_steps=n_steps,
    )
