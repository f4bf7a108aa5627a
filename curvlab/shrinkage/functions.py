"""scikit-learn's covariance functions, on curvlab's float64 statistics.

``empirical_covariance``, ``shrunk_covariance``, ``ledoit_wolf_shrinkage``, ``ledoit_wolf``,
``oas`` and ``log_likelihood`` take the arguments of their ``sklearn.covariance`` namesakes
and return the same numbers (numpy in, numpy out; a torch tensor gives tensors of its dtype;
``log_likelihood`` returns a float).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from curvlab.errors import InvalidInputError
from curvlab.shrinkage._represent import Eigen
from curvlab.shrinkage._traces import vector_stats
from curvlab.shrinkage._validation import as_samples, warn_one_sample
from curvlab.shrinkage.linear import OAS, LedoitWolf
from curvlab.validation import check_int, check_probability

F64 = torch.float64


def empirical_covariance(X: Any, *, assume_centered: bool = False) -> Any:
    """The maximum-likelihood covariance (1/n) sum_k (x_k - m)(x_k - m)^T.

    Parameters
    ----------
    X : array-like or torch.Tensor, [n, p]
        Samples; a 1-D array is one sample (with scikit-learn's warning).
    assume_centered : bool, default False
        Take the mean m as zero.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        [p, p], accumulated in float64.

    References
    ----------
    F. Pedregosa et al., "Scikit-learn: machine learning in Python", JMLR 12 (2011)
    (``sklearn.covariance.empirical_covariance``, which this function matches).

    Examples
    --------
    >>> empirical_covariance([[0, 1], [1, 0]])
    array([[ 0.25, -0.25],
           [-0.25,  0.25]])
    """
    T, numpy_out = as_samples(X, ensure_2d=False)
    warn_one_sample(T.shape[0])
    X64 = T.to(F64)
    if not assume_centered:
        X64 = X64 - X64.mean(dim=0)
    cov = X64.T @ X64 / X64.shape[0]
    return cov.cpu().numpy() if numpy_out else cov.to(T.dtype)


def shrunk_covariance(emp_cov: Any, shrinkage: float = 0.1) -> Any:
    """(1 - shrinkage) C + shrinkage (tr C / p) I for a covariance C or a stack [..., p, p].

    Parameters
    ----------
    emp_cov : array-like or torch.Tensor, [..., p, p]
        Covariance matrices.
    shrinkage : float, default 0.1
        In [0, 1].

    Returns
    -------
    numpy.ndarray or torch.Tensor
        The shrunk matrices, shaped like ``emp_cov``.

    References
    ----------
    F. Pedregosa et al., "Scikit-learn: machine learning in Python", JMLR 12 (2011)
    (``sklearn.covariance.shrunk_covariance``, which this function matches).

    Examples
    --------
    >>> shrunk_covariance([[1.0, 1.0], [1.0, 1.0]], 0.5)
    array([[1. , 0.5],
           [0.5, 1. ]])
    """
    shrinkage = check_probability("shrinkage", shrinkage, include_one=True)
    C, numpy_out = as_samples(emp_cov, allow_nd=True)
    if C.shape[-1] != C.shape[-2]:
        raise InvalidInputError(f"expected square matrices [..., p, p], got {tuple(C.shape)}")
    C64 = C.to(F64)
    p = C.shape[-1]
    mu = torch.diagonal(C64, dim1=-2, dim2=-1).sum(dim=-1) / p
    out = (1.0 - shrinkage) * C64 + shrinkage * mu[..., None, None] * torch.eye(
        p, dtype=F64, device=C.device)
    return out.cpu().numpy() if numpy_out else out.to(C.dtype)


def ledoit_wolf_shrinkage(X: Any, assume_centered: bool = False, block_size: int = 1000
                          ) -> float:
    """The Ledoit–Wolf shrinkage coefficient of samples X [n, p] (1-D: one sample).

    Parameters
    ----------
    X : array-like or torch.Tensor
        Samples.
    assume_centered : bool, default False
        Take the mean as zero.
    block_size : int, default 1000
        Columns per float64 block (memory only).

    Returns
    -------
    float
        rho of :class:`~curvlab.shrinkage.LedoitWolf` (0 for one feature).

    References
    ----------
    O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance
    matrices", J. Multivariate Anal. 88(2) (2004).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> round(ledoit_wolf_shrinkage(X), 3)
    0.107
    """
    T, _ = as_samples(X, estimator="ledoit_wolf_shrinkage", ensure_2d=False)
    if T.shape[1] == 1:
        return 0.0
    warn_one_sample(T.shape[0])
    X64 = T.to(F64)
    if not assume_centered:
        X64 = X64 - X64.mean(dim=0)
    stats, _ = vector_stats(X64, check_int("block_size", block_size, minimum=1))
    return LedoitWolf()._rule(stats)[0]


def ledoit_wolf(X: Any, *, assume_centered: bool = False, block_size: int = 1000):
    """(shrunk covariance, shrinkage) of the Ledoit–Wolf estimator.

    Parameters
    ----------
    X : array-like or torch.Tensor, [n, p]
        Samples.
    assume_centered : bool, default False
        Take the mean as zero.
    block_size : int, default 1000
        Columns per float64 block (memory only).

    Returns
    -------
    covariance : numpy.ndarray or torch.Tensor
        [p, p] the shrunk covariance.
    shrinkage : float
        rho.

    References
    ----------
    O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance
    matrices", J. Multivariate Anal. 88(2) (2004).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> cov, rho = ledoit_wolf(X)
    >>> cov.shape, round(rho, 3)
    ((4, 4), 0.107)
    """
    fit = LedoitWolf(assume_centered=assume_centered, block_size=block_size,
                     store_precision=False).fit(_two_d(X))
    return fit.covariance_, fit.shrinkage_


def oas(X: Any, *, assume_centered: bool = False):
    """(shrunk covariance, shrinkage) of the OAS estimator.

    Parameters
    ----------
    X : array-like or torch.Tensor, [n, p]
        Samples.
    assume_centered : bool, default False
        Take the mean as zero.

    Returns
    -------
    covariance : numpy.ndarray or torch.Tensor
        [p, p] the shrunk covariance.
    shrinkage : float
        rho.

    References
    ----------
    Y. Chen, A. Wiesel, Y. C. Eldar and A. O. Hero, "Shrinkage algorithms for MMSE
    covariance estimation", IEEE Trans. Signal Process. 58(10) (2010), eq. 23.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> cov, rho = oas(X)
    >>> round(rho, 3)
    0.14
    """
    fit = OAS(assume_centered=assume_centered, store_precision=False).fit(_two_d(X))
    return fit.covariance_, fit.shrinkage_


def log_likelihood(emp_cov: Any, precision: Any) -> float:
    """The Gaussian log-likelihood of data with empirical covariance ``emp_cov`` under the
    precision ``precision``, per sample:
    (-tr(S P) + log det P - p log(2 pi)) / 2, and -inf when P (symmetrised) is not positive
    definite to working precision: an eigenvalue at or below p eps max|eigenvalue| (the
    cutoff of ``scipy.linalg.pinvh`` and of the fitted estimators' ``score``), such as the
    pseudo-inverse of a rank-deficient S has. scikit-learn tests only the sign of the
    determinant, so for a precision numerically singular it returns a finite value whose
    size follows rounding.

    Parameters
    ----------
    emp_cov : array-like or torch.Tensor, [p, p]
        The data's maximum-likelihood covariance S (about the model's location).
    precision : array-like or torch.Tensor, [p, p]
        The model's precision P.

    Returns
    -------
    float
        Computed in float64.

    References
    ----------
    F. Pedregosa et al., "Scikit-learn: machine learning in Python", JMLR 12 (2011)
    (``sklearn.covariance.log_likelihood``, which this function matches).

    Examples
    --------
    >>> import numpy as np
    >>> round(log_likelihood(np.eye(2), np.eye(2)), 6)  # -(2 + 2 log(2 pi)) / 2
    -2.837877
    """
    S = _square("emp_cov", emp_cov)
    P = _square("precision", precision)
    if S.shape != P.shape:
        raise InvalidInputError(
            f"emp_cov {tuple(S.shape)} and precision {tuple(P.shape)} must have one shape"
        )
    p = P.shape[0]
    logdet = Eigen.of((P + P.T) / 2).logdet()  # the fitted estimators' cutoff
    if logdet == -math.inf:
        return -math.inf
    return float((-(S * P).sum() + logdet - p * math.log(2 * math.pi)) / 2)


def _square(name: str, A: Any) -> torch.Tensor:
    T = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A)
    if T.ndim != 2 or T.shape[0] != T.shape[1]:
        raise InvalidInputError(f"{name} must be a square [p, p] matrix, got {tuple(T.shape)}")
    return T.to(F64)


def _two_d(X: Any) -> Any:
    """A 1-D array as one sample, as the scikit-learn functions read it."""
    if isinstance(X, torch.Tensor):
        return X.reshape(1, -1) if X.ndim == 1 else X
    arr = X if isinstance(X, np.ndarray) else None
    if arr is not None and arr.ndim == 1:
        return arr.reshape(1, -1)
    return X
