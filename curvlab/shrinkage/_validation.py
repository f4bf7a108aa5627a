"""Input validation with scikit-learn's messages and exception types (``check_array``).

Samples are numpy arrays, array-likes (lists, pandas frames) or torch tensors. Numpy and
array-like input is read as float64 (so float32 arrays lose nothing) and gives numpy
output; a floating torch tensor keeps its dtype and device for the output, while every
statistic is accumulated in float64. Refused, as scikit-learn refuses them:

- sparse input (scipy.sparse or a sparse tensor): :class:`InputTypeError` (a TypeError);
- complex input: ``"Complex data not supported"`` (a ValueError; the imaginary part is
  never dropped silently);
- object arrays that do not convert to numbers: numpy's TypeError or ValueError message;
- NaN or infinite values, 0 samples or 0 features, a wrong number of dimensions, and a
  different number of features at ``score``/``mahalanobis`` time than at ``fit``.

Every error is a :class:`~curvlab.errors.CurvlabError` and also the built-in exception
scikit-learn raises, so ``except ValueError`` and ``pytest.raises(TypeError)`` both work.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from curvlab.errors import CurvlabError, InvalidInputError

#: scikit-learn's warning text for a single sample (``empirical_covariance``).
ONE_SAMPLE_WARNING = "Only one sample available. You may want to reshape your data array"


class InputTypeError(InvalidInputError, TypeError):
    """Input of a type curvlab cannot read (sparse data, non-numeric objects).

    Also a ``TypeError`` (as scikit-learn raises) and an ``InvalidInputError``.

    Examples
    --------
    >>> import scipy.sparse
    >>> from curvlab.shrinkage import InputTypeError, LedoitWolf
    >>> try:
    ...     LedoitWolf().fit(scipy.sparse.eye(3, format="csr"))
    ... except InputTypeError as error:
    ...     print(str(error)[:40])
    Sparse data was passed for X, but dense
    """


class NotFittedError(CurvlabError, ValueError, AttributeError):
    """A fitted attribute or method was used before ``fit`` (scikit-learn's NotFittedError
    is also a ValueError and an AttributeError, so ``hasattr`` stays False).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.shrinkage import LedoitWolf, NotFittedError
    >>> try:
    ...     LedoitWolf().matvec(np.ones(3))
    ... except NotFittedError as error:
    ...     print(str(error)[:40])
    This LedoitWolf instance is not fitted y
    """


def _is_sparse(X: Any) -> bool:
    if isinstance(X, torch.Tensor):
        return X.layout != torch.strided
    try:
        from scipy import sparse
    except ImportError:  # pragma: no cover - scipy is a torch-ecosystem given
        return False
    return sparse.issparse(X)


def _context(estimator: Any) -> str:
    if estimator is None:
        return ""
    name = estimator if isinstance(estimator, str) else type(estimator).__name__
    return f" by {name}"


def as_samples(
    X: Any,
    *,
    estimator: Any = None,
    allow_nd: bool = False,
    ensure_2d: bool = True,
    ensure_min_samples: int = 1,
    ensure_min_features: int = 1,
) -> tuple[torch.Tensor, bool]:
    """(a validated floating tensor, whether the input was not a tensor).

    Parameters
    ----------
    X : array-like, torch.Tensor
        [n, p] samples (or [n, p, p] matrices when ``allow_nd``).
    estimator : object or str, optional
        Named in the messages, as scikit-learn does (" ... is required by LedoitWolf.").
    allow_nd : bool, default False
        Accept 3-D input (per-sample matrices).
    ensure_2d : bool, default True
        Refuse 0-D and 1-D input (False reads a 1-D array as one sample, as
        ``sklearn.covariance.empirical_covariance`` does).
    ensure_min_samples, ensure_min_features : int, default 1
        The fewest rows and columns accepted.

    Returns
    -------
    (torch.Tensor, bool)
        The samples (float64 for non-tensor input, the tensor's own floating dtype
        otherwise; integer tensors become float64) and whether numpy output is wanted.

    Examples
    --------
    >>> T, numpy_out = as_samples([[1, 2], [3, 4]])
    >>> T.dtype, numpy_out
    (torch.float64, True)
    """
    context = _context(estimator)
    if _is_sparse(X):
        raise InputTypeError(
            "Sparse data was passed for X, but dense data is required. Use '.toarray()' to "
            "convert to a dense numpy array."
        )
    if isinstance(X, torch.Tensor):
        if X.is_complex():
            raise InvalidInputError(
                f"Complex data not supported{context}: pass the real part (X.real) or "
                "stack real and imaginary parts as features"
            )
        T = X.detach()
        if not T.is_floating_point():
            T = T.to(torch.float64)
        numpy_out = False
    else:
        T = torch.from_numpy(_as_float64(X, context))
        numpy_out = True
    if T.ndim == 1 and not ensure_2d:
        T = T.reshape(1, -1)
    if T.ndim < 2:
        kind = "scalar" if T.ndim == 0 else "1D"
        raise InvalidInputError(
            f"Expected 2D array, got {kind} array instead{context}. Reshape your data either "
            "using array.reshape(-1, 1) if your data has a single feature or "
            "array.reshape(1, -1) if it contains a single sample."
        )
    if T.ndim > (3 if allow_nd else 2):
        raise InvalidInputError(
            f"Found array with dim {T.ndim}, while dim <= {3 if allow_nd else 2} is "
            f"required{context}."
        )
    shape = tuple(T.shape)
    if shape[0] < ensure_min_samples:
        raise InvalidInputError(
            f"Found array with {shape[0]} sample(s) (shape={shape}) while a minimum of "
            f"{ensure_min_samples} is required{context}."
        )
    if T.ndim == 2 and shape[1] < ensure_min_features:
        raise InvalidInputError(
            f"Found array with {shape[1]} feature(s) (shape={shape}) while a minimum of "
            f"{ensure_min_features} is required{context}."
        )
    if not bool(torch.isfinite(T).all()):
        what = "NaN" if bool(torch.isnan(T).any()) else "infinity"
        raise InvalidInputError(
            f"Input X contains {what}{context}; remove or impute non-finite values (inf, NaN)"
        )
    return T, numpy_out


def _as_float64(X: Any, context: str) -> np.ndarray:
    """``X`` as a writeable float64 numpy array, refusing complex and non-numeric data."""
    raw = X if isinstance(X, np.ndarray) else None
    if raw is None:
        try:
            raw = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise InputTypeError(f"cannot read {type(X).__name__} as samples: {exc}") from exc
    if raw.dtype.kind == "c":
        raise InvalidInputError(
            f"Complex data not supported{context}: pass the real part (X.real) or stack "
            "real and imaginary parts as features"
        )
    if raw.dtype.kind in "USV":
        raise InvalidInputError(
            f"dtype='numeric' is not compatible with arrays of bytes/strings{context}. "
            "Convert your data to numeric values explicitly instead."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            arr = np.array(raw, dtype=np.float64, copy=None)
    except np.exceptions.ComplexWarning as exc:
        raise InvalidInputError(f"Complex data not supported{context}") from exc
    except TypeError as exc:  # e.g. a dict in an object array: numpy's own message
        raise InputTypeError(f"{exc}; X must hold numbers only{context}") from exc
    except ValueError as exc:  # e.g. "could not convert string to float"
        raise InvalidInputError(f"{exc}; X must hold numbers only{context}") from exc
    if not arr.flags.writeable or (arr.strides and min(arr.strides) < 0):
        arr = arr.copy()  # torch shares memory and refuses read-only or negative strides
    return arr


def check_n_features(estimator: Any, T: torch.Tensor) -> None:
    """scikit-learn's message when ``T`` has a different number of features than at fit."""
    expected = estimator.n_features_in_
    if T.ndim != 2 or T.shape[1] != expected:
        got = T.shape[1] if T.ndim == 2 else tuple(T.shape)
        raise InvalidInputError(
            f"X has {got} features, but {type(estimator).__name__} is expecting {expected} "
            "features as input."
        )


def warn_one_sample(n: int) -> None:
    """scikit-learn's UserWarning for a single sample (its covariance is zero)."""
    if n == 1:
        warnings.warn(ONE_SAMPLE_WARNING, UserWarning, stacklevel=3)
