"""What the Fisher needs to know about a loss: its likelihood and its normalisation.

For a mean-reduced loss L = N^-1 sum_n l_n with l_n = c * (-log p(y_n | f_n)) + const, the
Fisher is c * E_{y~p}[grad(-log p) grad(-log p)^T] in output space, which equals the loss's
output Hessian for these canonical-link losses (so type-2 Fisher = GGN):

- CrossEntropyLoss: categorical, c = 1.
- MSELoss (mean over N*D entries): l_n = D^-1 ||f - y||^2 = (2/D) * (1/2)||f - y||^2, unit
  Gaussian, c = 2/D.
- BCEWithLogitsLoss (mean over N*D entries): Bernoulli per entry, c = 1/D.
"""

from __future__ import annotations

import torch
from torch import nn

from curvlab.errors import InvalidInputError, NumericalError, UnsupportedModelError

SUPPORTED = "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss"


def loss_kind(loss_fn) -> str | None:
    """'mse', 'ce', 'bce' for the supported torch losses, else None."""
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            return None
        return "ce"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            return None
        return "bce"
    return None


def check_reduction(loss_fn) -> None:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise InvalidInputError(
            f"{type(loss_fn).__name__} has reduction={reduction!r}; curvlab needs the loss "
            "averaged over samples: use reduction='mean'"
        )


def check_scalar_mean_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Evaluate the loss on the first batch once; refuse non-scalar, non-mean-reduced and
    non-finite losses."""
    check_reduction(loss_fn)
    loss = loss_fn(out, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InvalidInputError(
            f"loss_fn must return a scalar averaged over the batch, got {shape}; "
            "use reduction='mean'"
        )
    n = out.shape[0]
    if not hasattr(loss_fn, "reduction") and n >= 2 and torch.isfinite(loss):
        # a plain callable: the loss of the whole batch must be the size-weighted mean
        # of the losses of its two halves (fails for sum-reduced losses)
        k = n // 2
        with torch.no_grad():
            halves = (k * loss_fn(out[:k], y[:k]) + (n - k) * loss_fn(out[k:], y[k:])) / n
        if not torch.allclose(halves.detach(), loss.detach(), rtol=1e-4, atol=1e-6):
            raise InvalidInputError(
                "loss_fn does not average over samples (the batch loss is not the mean of its "
                "halves' losses); use a mean-reduced loss"
            )
    if not torch.isfinite(loss):
        raise NumericalError(f"the loss is {loss.item()} on the first batch; check data and model")
    return loss


def fisher_scale(kind: str, out: torch.Tensor) -> float:
    """c in l_n = c * (-log p): 1 for CE, 2/D for MSE, 1/D for BCE (D outputs per sample)."""
    per_sample = out[0].numel()
    return {"ce": 1.0, "mse": 2.0 / per_sample, "bce": 1.0 / per_sample}[kind]


def sample_residuals(
    kind: str, out: torch.Tensor, mc_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """[M, n, D] scaled gradients sqrt(c) * grad_f(-log p(y~ | f)) at sampled labels y~ ~ p(.|f).

    E over samples of r r^T equals the output Hessian of l_n (Monte-Carlo Fisher).
    """
    out = out.detach()
    n = out.shape[0]
    flat = out.reshape(n, -1)
    scale = fisher_scale(kind, out) ** 0.5
    draws = []
    if kind == "ce" and out.ndim != 2:
        raise UnsupportedModelError(
            "the Monte-Carlo Fisher for CrossEntropyLoss needs [N, C] logits"
        )
    for _ in range(mc_samples):
        if kind == "ce":
            probs = torch.softmax(flat, dim=1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            r = probs - torch.nn.functional.one_hot(labels, flat.shape[1]).to(flat.dtype)
        elif kind == "mse":
            noise = torch.randn(
                flat.shape, generator=generator, dtype=flat.dtype, device=flat.device
            )
            r = -noise
        else:
            probs = torch.sigmoid(flat)
            labels = torch.bernoulli(probs, generator=generator)
            r = probs - labels
        draws.append(scale * r)
    return torch.stack(draws)
