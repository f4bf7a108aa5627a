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

Numerical stability. The kernel's Hilbert transform at x = (lambda_i - lambda_j) / h_j,

    H(x) = -3 x / (10 pi) + 3 / (4 sqrt(5) pi) (1 - x^2 / 5) log|(sqrt(5) - x) / (sqrt(5) + x)|,

is a difference of two terms of size |x| that leaves about 1 / (pi |x|): evaluated as
written it loses all digits once |x| ~ 1e5, which ill-conditioned data (eigenvalue ratios
of 1e6 and more, such as unscaled features) reach, and the cleaned top eigenvalues then
come out orders of magnitude too small (the authors' formula in ``nonlinshrink`` does the
same). For |x| > 2 sqrt(5) we use the exact series in u = sqrt(5) / x instead,

    H(x) = -3 / (sqrt(5) pi) sum_{k >= 0} u^(2k+1) / ((2k + 1)(2k + 3)),

(from log|(1 - u)/(1 + u)| = -2 atanh(u)), whose terms all have one sign; 30 terms reach
machine precision for |u| <= 1/2. Tests compare with a 60-digit mpmath evaluation of the
same formulas.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from curvlab.errors import InvalidInputError, NumericalError
from curvlab.shrinkage._represent import Eigen
from curvlab.shrinkage._validation import as_samples
from curvlab.shrinkage.base import BaseShrinkage, CovarianceMixin
from curvlab.validation import check_int

F64 = torch.float64
ROOT5 = math.sqrt(5.0)
_SERIES_TERMS = 30


def epanechnikov_hilbert(x: torch.Tensor) -> torch.Tensor:
    """H(x) of the module docstring, stable for every x (float64).

    Parameters
    ----------
    x : torch.Tensor
        Points (any shape).

    Returns
    -------
    torch.Tensor
        H(x) in float64, x's shape: the direct formula for |x| <= 2 sqrt(5), the series
        beyond.

    References
    ----------
    O. Ledoit and M. Wolf, "Analytical nonlinear shrinkage of large-dimensional covariance
    matrices", Ann. Statist. 48(5) (2020), eq. 4.9.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([1e6], dtype=torch.float64)
    >>> round(float(epanechnikov_hilbert(x) * -torch.pi * x), 9)  # -> 1 as x grows
    1.0
    """
    x = x.to(F64)
    far = x.abs() > 2 * ROOT5
    near = torch.where(far, 0.0, x)
    log_term = torch.log(torch.abs((ROOT5 - near) / (ROOT5 + near)))
    direct = (-3 / 10 / math.pi) * near + (3 / 4 / ROOT5 / math.pi) * (1 - near**2 / 5) * log_term
    direct = torch.where(near.abs() == ROOT5, (-3 / 10 / math.pi) * near, direct)
    u = ROOT5 / torch.where(far, x, 1.0)
    u2 = u * u
    series = torch.zeros_like(u)
    for k in reversed(range(_SERIES_TERMS)):
        series = series * u2 + 1.0 / ((2 * k + 1) * (2 * k + 3))
    return torch.where(far, (-3 / ROOT5 / math.pi) * u * series, direct)


def shrink_eigenvalues(lam: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """Cleaned eigenvalues [p] (ascending) from the sample eigenvalues ``lam`` (the nonzero
    ones, ascending, float64) of a covariance of effective sample size n in dimension p.

    Parameters
    ----------
    lam : torch.Tensor
        The min(n, p) nonzero sample eigenvalues, ascending.
    n : int
        Effective sample size.
    p : int
        Dimension.

    Returns
    -------
    torch.Tensor
        [p] cleaned eigenvalues d (eq. 4.3 for p <= n; eqs. C.4-C.8 for p > n, the p - n
        null directions first with one shared value).

    References
    ----------
    O. Ledoit and M. Wolf, "Analytical nonlinear shrinkage of large-dimensional covariance
    matrices", Ann. Statist. 48(5) (2020).

    Examples
    --------
    >>> import torch
    >>> from curvlab.shrinkage.ledoit_wolf_2020 import shrink_eigenvalues
    >>> lam = torch.linspace(0.5, 1.5, 20, dtype=torch.float64)
    >>> shrink_eigenvalues(lam, n=40, p=20).shape
    torch.Size([20])
    """
    lam = lam.to(F64)
    h = n ** (-1.0 / 3.0)
    H = h * lam[None, :]  # bandwidth h lambda_j, column j
    x = (lam[:, None] - lam[None, :]) / H
    ftilde = (3 / 4 / ROOT5) * (torch.clamp(1 - x**2 / 5, min=0) / H).mean(dim=1)
    hftilde = (epanechnikov_hilbert(x) / H).mean(dim=1)
    c = p / n
    if p <= n:
        return lam / ((math.pi * c * lam * ftilde) ** 2
                      + (1 - c - math.pi * c * lam * hftilde) ** 2)
    x0 = torch.tensor([-1.0 / h], dtype=F64)
    hf0 = float(epanechnikov_hilbert(x0)) / h * float((1 / lam).mean())
    d0 = 1 / (math.pi * (p - n) / n * hf0)
    d1 = lam / (math.pi**2 * lam**2 * (ftilde**2 + hftilde**2))
    return torch.cat([torch.full((p - n,), d0, dtype=F64, device=lam.device), d1])


def analytical_shrinkage(X: torch.Tensor, k: int | None = None):
    """(cleaned eigenvalues [p] ascending, eigenvectors [p, p], sample eigenvalues [p]
    ascending, effective n) of the sample covariance of X [n, p] (float64).

    Parameters
    ----------
    X : torch.Tensor
        [n, p] samples.
    k : int or None, default None
        None demeans (effective n - 1); 0 neither demeans nor adjusts; k >= 1 treats X as
        demeaned with k degrees of freedom used (n - k).

    Returns
    -------
    tuple
        (cleaned eigenvalues, eigenvectors, sample eigenvalues, effective sample size).

    Raises
    ------
    InvalidInputError
        When the effective sample size is below 12.
    NumericalError
        When the sample covariance is singular beyond its null space.

    References
    ----------
    O. Ledoit and M. Wolf, "Analytical nonlinear shrinkage of large-dimensional covariance
    matrices", Ann. Statist. 48(5) (2020).

    Examples
    --------
    >>> import torch
    >>> from curvlab.shrinkage import analytical_shrinkage
    >>> X = torch.randn(40, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> cleaned, vectors, sample, n_eff = analytical_shrinkage(X)
    >>> n_eff, float(cleaned.max()) < float(sample.max())  # the top is pulled in
    (39, True)
    """
    n, p = X.shape
    X = X.to(F64)
    if k is None:
        X = X - X.mean(dim=0)
        k = 1
    k = check_int("k", k, minimum=0, fix="or None to centre the data (k = 1)")
    n_eff = n - k
    if n_eff < 12:
        raise InvalidInputError(
            f"Found array with {n} sample(s) (shape={(n, p)}) while a minimum of {12 + k} "
            f"is required by LedoitWolf2020 (effective sample size n - k >= 12)."
        )
    lam, U = torch.linalg.eigh(X.T @ X / n_eff)
    nonzero = lam[max(0, p - n_eff):]
    if float(nonzero.min()) <= p * torch.finfo(F64).eps * float(nonzero.max()):
        raise NumericalError(
            "the sample covariance is singular beyond its null space (a duplicated or "
            "constant feature?); remove such features or use a linear rule"
        )
    return shrink_eigenvalues(nonzero, n_eff, p), U, lam, n_eff


class LedoitWolf2020(CovarianceMixin, BaseShrinkage):
    """Analytical nonlinear shrinkage for vector samples [n, p] (see module docstring).

    Parameters
    ----------
    k : int or None, default None
        None (demean, n - 1), 0 (no demeaning, n) or k >= 1 (pre-demeaned, n - k).
    store_precision : bool, default True
        Store ``precision_``.

    Attributes
    ----------
    covariance_, precision_, location_ : array or tensor
        The cleaned covariance, its inverse (None unless ``store_precision``), the mean
        (zero unless ``k`` is None).
    eigenvalues_, sample_eigenvalues_ : array or tensor
        Cleaned and sample eigenvalues, ascending, for the columns of ``eigenvectors_``.
    eigenvectors_ : array or tensor
        [p, p] the sample eigenvectors.
    n_features_in_ : int
        p.

    Notes
    -----
    The covariance API (``score``, ``mahalanobis``, ``error_norm``, ``get_precision``) and
    the operator (``matvec``, ``solve``, ``eigenpairs``) use the cached eigendecomposition.

    References
    ----------
    O. Ledoit and M. Wolf, "Analytical nonlinear shrinkage of large-dimensional covariance
    matrices", Ann. Statist. 48(5) (2020).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((40, 20))  # truth: the identity
    >>> fit = LedoitWolf2020().fit(X)
    >>> round(float(fit.sample_eigenvalues_[-1]), 2), round(float(fit.eigenvalues_[-1]), 2)
    (2.8, 1.49)
    """

    def __init__(self, *, k: int | None = None, store_precision: bool = True):
        self.k = k
        self.store_precision = store_precision

    def fit(self, X: Any, y: Any = None) -> LedoitWolf2020:
        """Fit from samples X [n, p] (numpy in, numpy out; tensors keep their dtype).

        Parameters
        ----------
        X : array-like or torch.Tensor
            [n, p] samples (n - k >= 12).
        y : None
            Ignored (scikit-learn compatibility).

        Returns
        -------
        LedoitWolf2020
            ``self``, fitted.
        """
        self._reset()
        T, numpy_out = as_samples(X, estimator=self)
        self._set_space(T.shape[1], T.dtype, T.device, numpy_out)
        X64 = T.to(F64)
        location = X64.mean(dim=0) if self.k is None else torch.zeros_like(X64[0])
        d, U, lam, _ = analytical_shrinkage(X64, self.k)
        self._rep = Eigen(U, d)
        self.location_ = self._out(location)
        self.eigenvalues_ = self._out(d)
        self.sample_eigenvalues_ = self._out(lam)
        self.eigenvectors_ = self._out(U)
        self.covariance_ = self._out(self._rep.dense())
        self.precision_ = self._out(self._rep.dense_inverse()) if self.store_precision else None
        return self
