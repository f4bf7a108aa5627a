"""Analytical nonlinear shrinkage of a sample covariance (Ledoit & Wolf 2020).

Ledoit, O. & Wolf, M. (2020), "Analytical nonlinear shrinkage of large-dimensional
covariance matrices", Annals of Statistics 48(5). With the sample eigenvalues lambda
(the nonzero ones when p > n), a kernel estimate of their density f and of its Hilbert
transform Hf with the Epanechnikov kernel of bandwidth h_j = n^-1/3 lambda_j (eqs. 4.7–4.9),
the cleaned eigenvalues are (eq. 4.3, c = p / n)

    d_i = lambda_i / ((pi c lambda_i f_i)^2 + (1 - c - pi c lambda_i Hf_i)^2)   (p <= n),

and for p > n eqs. C.4–C.8 (the p - n null directions share one value). The conventions
follow the authors' code and the ``nonlinshrink`` package: ``k=None`` demeans and uses the
effective sample size n - 1; ``k=0`` neither demeans nor adjusts; ``k >= 1`` treats the data
as already demeaned with k degrees of freedom used (n - k). The effective size must be >= 12.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from curvlab.errors import InvalidInputError, NumericalError
from curvlab.shrinkage.base import BaseShrinkage, as_tensor, check_finite


def analytical_shrinkage(X: torch.Tensor, k: int | None = None):
    """(cleaned eigenvalues [p] ascending, eigenvectors [p, p]) of the sample covariance of X."""
    n, p = X.shape
    if k is None:
        X = X - X.mean(dim=0)
        k = 1
    if k < 0:
        raise InvalidInputError(f"k must be None or >= 0, got {k}")
    n = n - k
    if n < 12:
        raise InvalidInputError(f"the effective sample size n - k must be >= 12, got {n}")
    sample_cov = X.T @ X / n
    lam, U = torch.linalg.eigh(sample_cov)
    lam = lam[max(0, p - n):]
    if bool((lam / lam.sum() < 1e-8).any()):
        raise NumericalError("the sample covariance is singular beyond its null space")
    h = n ** (-1.0 / 3.0)
    H = h * lam[None, :]  # bandwidth h lambda_j, column j
    x = (lam[:, None] - lam[None, :]) / H
    root5 = math.sqrt(5.0)
    ftilde = (3 / 4 / root5) * (torch.clamp(1 - x**2 / 5, min=0) / H).mean(dim=1)
    log_term = torch.log(torch.abs((root5 - x) / (root5 + x)))
    hf = (-3 / 10 / math.pi) * x + (3 / 4 / root5 / math.pi) * (1 - x**2 / 5) * log_term
    edge = torch.abs(x) == root5
    hf = torch.where(edge, (-3 / 10 / math.pi) * x, hf)
    hftilde = (hf / H).mean(dim=1)
    c = p / n
    if p <= n:
        d = lam / ((math.pi * c * lam * ftilde) ** 2 + (1 - c - math.pi * c * lam * hftilde) ** 2)
    else:
        hf0 = (1 / math.pi) * (
            3 / 10 / h**2
            + 3 / 4 / root5 / h * (1 - 1 / 5 / h**2) * math.log((1 + root5 * h) / (1 - root5 * h))
        ) * (1 / lam).mean()
        d0 = 1 / (math.pi * (p - n) / n * hf0)
        d1 = lam / (math.pi**2 * lam**2 * (ftilde**2 + hftilde**2))
        d = torch.cat([d0 * torch.ones(p - n, dtype=lam.dtype), d1])
    return d, U


class LedoitWolf2020(BaseShrinkage):
    """Analytical nonlinear shrinkage for vector samples [n, p] (see module docstring).

    Parameters
    ----------
    k : None (demean, n - 1), 0 (no demeaning, n) or k >= 1 (pre-demeaned, n - k).

    Fitted: ``covariance_``, ``precision_``, ``eigenvalues_`` (cleaned, ascending),
    ``eigenvectors_``, ``n_features_in_``; ``matvec``/``solve`` apply the cleaned matrix.
    """

    def __init__(self, *, k: int | None = None):
        self.k = k

    def fit(self, X: Any, y: Any = None) -> LedoitWolf2020:
        T, numpy = as_tensor(X)
        check_finite(T)
        if T.ndim != 2:
            raise InvalidInputError(f"expected vector samples [n, p], got shape {tuple(T.shape)}")
        d, U = analytical_shrinkage(T, self.k)
        out = (lambda t: t.cpu().numpy()) if numpy else (lambda t: t)
        self._U, self._d = U, d
        self.eigenvalues_ = out(d)
        self.eigenvectors_ = out(U)
        self.covariance_ = out((U * d) @ U.T)
        self.precision_ = out((U / d) @ U.T)
        self.n_features_in_ = T.shape[1]
        return self

    def matvec(self, v):
        """The cleaned covariance times v."""
        return self._apply(v, self._d)

    def solve(self, v):
        """The cleaned covariance's inverse times v."""
        return self._apply(v, 1.0 / self._d)

    def _apply(self, v, scale):
        self._check_fitted()
        V, numpy = as_tensor(v)
        coeff = self._U.T @ V
        out = self._U @ (scale[:, None] * coeff if V.ndim == 2 else scale * coeff)
        return out.cpu().numpy() if numpy else out
