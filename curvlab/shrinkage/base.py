"""Base classes: scikit-learn's estimator and covariance API on curvlab operators.

``BaseShrinkage`` gives every estimator scikit-learn's conventions without importing
scikit-learn (it is imported lazily, only when scikit-learn itself asks for the tags):
keyword-only ``__init__`` parameters stored verbatim, ``get_params``/``set_params`` (so
``sklearn.base.clone``, pipelines and grid searches work), ``__sklearn_tags__`` and
``__sklearn_is_fitted__``. A fitted estimator is a :class:`curvlab.operators.Operator`
(``num_params``, ``dtype``, ``device``, ``matvec``, ``solve``), so the spectral methods,
``to_scipy`` and the operator algebra apply to the shrunk matrix itself::

    fit = LedoitWolf().fit(X)
    curvlab.spectral.eigenpairs(fit, k=3)      # or fit.eigenpairs(k=3)

``CovarianceMixin`` adds ``sklearn.covariance.EmpiricalCovariance``'s methods: ``score``
(the Gaussian log-likelihood, so ``cross_val_score`` works), ``mahalanobis``,
``error_norm`` and ``get_precision``. ``LinearShrinkage`` fits

    (1 - rho) S + rho tau I = (1 - rho) (S + delta I),   delta = tau rho / (1 - rho)

(DESIGN.md section 4) from explicit vector samples [n, p], explicit per-sample matrices
[n, p, p], or a curvature estimator (anything with ``group_matvecs``/``num_samples``/
``num_params``); see ``_represent`` for how the fitted matrix is stored (the n x n Gram
matrix when n < p: no p x p factorisation).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch

from curvlab._random import Seed
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError
from curvlab.operators import Operator
from curvlab.operators import is_operator as _is_operator_protocol
from curvlab.shrinkage._represent import Dense, LowRankPlusIdentity, ShiftedOperator
from curvlab.shrinkage._traces import (
    TraceStats,
    factor_stats,
    matrix_stats,
    probe_stats,
    vector_stats,
)
from curvlab.shrinkage._validation import (
    NotFittedError,
    as_samples,
    check_n_features,
    warn_one_sample,
)
from curvlab.validation import check_int

F64 = torch.float64


class BaseShrinkage(Operator):
    """Parameter handling (scikit-learn semantics) and the operator of a fitted estimator.

    Subclasses set, at fit: ``n_features_in_``, ``_rep`` (a ``_represent`` object),
    ``_dtype``, ``_device`` and ``_numpy`` (numpy in, numpy out).

    References
    ----------
    L. Buitinck et al., "API design for machine learning software: experiences from the
    scikit-learn project", ECML PKDD workshop (2013) (the estimator conventions followed).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.shrinkage import LedoitWolf
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> fit = LedoitWolf(n_probes=10).fit(X)
    >>> fit.get_params()["n_probes"], fit.num_params
    (10, 4)
    >>> v = np.ones(4)
    >>> bool(np.allclose(fit.matvec(fit.solve(v)), v))  # a fitted estimator is an operator
    True
    """

    _rep: Any = None

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(
            name
            for name, prm in sig.parameters.items()
            if name != "self" and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)
        )

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters; with ``deep``, nested ones as ``name__sub``.

        Parameters
        ----------
        deep : bool, default True
            Include the parameters of nested estimators.

        Returns
        -------
        dict of str to Any
            Parameter name -> value, as ``sklearn.base.clone`` needs.
        """
        out = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update({f"{name}__{k}": v for k, v in value.get_params().items()})
            out[name] = value
        return out

    def set_params(self, **params: Any) -> BaseShrinkage:
        """Set constructor parameters (``name`` or nested ``name__sub``); returns self.

        Parameters
        ----------
        **params : Any
            New values by parameter name.

        Returns
        -------
        BaseShrinkage
            ``self`` (refit to use the new values).

        Raises
        ------
        InvalidInputError
            For a name that is not a constructor parameter.
        """
        valid = self.get_params(deep=True)
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise InvalidInputError(
                    f"invalid parameter {name!r} for {type(self).__name__}; "
                    f"valid parameters: {self._param_names()}"
                )
            if sub:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        shown = [
            f"{name}={getattr(self, name)!r}"
            for name in self._param_names()
            if sig.parameters[name].default is inspect.Parameter.empty
            or not _same(getattr(self, name), sig.parameters[name].default)
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self):
        """scikit-learn's tags (an unsupervised estimator of dense 2-D float data)."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False))

    def __sklearn_is_fitted__(self) -> bool:
        return "n_features_in_" in vars(self)

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet: call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    def _reset(self) -> None:
        """Forget a previous fit (fitted attributes end with an underscore)."""
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)
        self._rep = None

    def _set_space(self, p: int, dtype: torch.dtype, device: Any, numpy_out: bool) -> None:
        self.n_features_in_ = int(p)
        self._dtype, self._device, self._numpy = dtype, torch.device(device), numpy_out

    def _out(self, t: torch.Tensor):
        """A fitted tensor as the user gave the input: numpy float64, or the input's dtype."""
        return t.detach().cpu().numpy() if self._numpy else t.to(self._dtype)

    # ------------------------------------------------------------------ operator
    @property
    def num_params(self) -> int:  # type: ignore[override]
        """P, the dimension of the fitted matrix."""
        self._check_fitted()
        return self.n_features_in_

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        """The dtype of the vectors ``matvec`` takes (float64 for numpy input)."""
        self._check_fitted()
        return self._dtype

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        """The device of the vectors ``matvec`` takes (the fit's input device)."""
        self._check_fitted()
        return self._device

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self._rep.matvec(V)

    def _as_vector(self, v: Any) -> tuple[torch.Tensor, bool]:
        self._check_fitted()
        if isinstance(v, torch.Tensor):
            return self.check_vector(v), False
        arr = np.asarray(v, dtype=np.float64)
        return self.check_vector(torch.as_tensor(arr, device=self._device).to(self._dtype)), True

    def matvec(self, v: Any) -> Any:
        """The fitted matrix times ``v``.

        Parameters
        ----------
        v : torch.Tensor or array-like
            [P] or [P, k]; a tensor must have the fit's ``dtype`` and ``device``, numpy
            input gives numpy output.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            The product, shaped like ``v``.
        """
        V, numpy_out = self._as_vector(v)
        out = super().matvec(V)
        return out.cpu().numpy() if numpy_out else out

    def solve(self, v: Any, **options: Any) -> Any:
        """The fitted matrix's (pseudo-)inverse times ``v`` ([P] or [P, k]; as ``matvec``).

        The factorisation is formed once (at fit, or at the first solve) and reused: the
        Woodbury identity through the n x n Gram matrix when the fit has n < p samples or
        per-sample factors, the eigendecomposition otherwise, conjugate gradients for
        matrix-free fits (``options``: ``tol``, ``max_iter``).

        Parameters
        ----------
        v : torch.Tensor or array-like
            [P] or [P, k], as for :meth:`matvec`.
        **options : Any
            ``tol`` and ``max_iter`` of the conjugate gradients (matrix-free fits only).

        Returns
        -------
        torch.Tensor or numpy.ndarray
            The solution, shaped like ``v``.
        """
        V, numpy_out = self._as_vector(v)
        block = V if V.ndim == 2 else V[:, None]
        out = self._rep.solve(block, **options)
        out = out if V.ndim == 2 else out[:, 0]
        return out.cpu().numpy() if numpy_out else out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays and tensors compare elementwise
        return a is b


class CovarianceMixin:
    """``EmpiricalCovariance``'s methods for a fitted covariance (``_rep``, ``location_``).

    ``score``, ``mahalanobis``, ``get_precision`` and ``error_norm``, as scikit-learn
    defines them, so ``cross_val_score`` and model selection work.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.shrinkage import LedoitWolf
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> fit = LedoitWolf().fit(X)
    >>> fit.mahalanobis(X[:2]).round(3), round(fit.score(X), 3)
    (array([0.697, 2.671]), -8.668)
    """

    def _centred(self, X: Any) -> tuple[torch.Tensor, bool]:
        self._check_fitted()
        T, numpy_out = as_samples(X, estimator=self)
        check_n_features(self, T)
        location = getattr(self, "location_", None)
        Y = T.to(F64).to(self._device)
        if location is not None:
            Y = Y - torch.as_tensor(location, device=self._device).to(F64)
        return Y, numpy_out

    def score(self, X_test: Any, y: Any = None) -> float:
        """Mean log-likelihood of ``X_test`` under N(location_, covariance_).

        Parameters
        ----------
        X_test : array-like or torch.Tensor, [m, p]
            Test samples (fits without a location, such as per-sample matrices or
            estimators, score under a zero mean).
        y : ignored

        Returns
        -------
        float
            -(tr(S_test Sigma^+) + log det Sigma + p log(2 pi)) / 2, with S_test the
            test samples' second moment about ``location_`` (scikit-learn's
            ``EmpiricalCovariance.score``); -inf when Sigma is singular, as there.
        """
        Y, _ = self._centred(X_test)
        logdet = self._rep.logdet()
        if logdet == -math.inf:
            return -math.inf
        quad = float(self._rep.quad(Y).mean())
        return -0.5 * (quad + logdet + Y.shape[1] * math.log(2 * math.pi))

    def mahalanobis(self, X: Any) -> Any:
        """Squared Mahalanobis distances (x - location_)^T Sigma^+ (x - location_) per row.

        Parameters
        ----------
        X : array-like or torch.Tensor
            [m, p] observations.

        Returns
        -------
        numpy.ndarray or torch.Tensor
            [m] distances (numpy for numpy input).
        """
        Y, numpy_out = self._centred(X)
        out = self._rep.quad(Y)
        return out.cpu().numpy() if numpy_out else out.to(self._dtype)

    def get_precision(self) -> Any:
        """The precision matrix Sigma^+ ([p, p]): ``precision_`` if stored, else formed
        from the cached factorisation."""
        self._check_fitted()
        stored = getattr(self, "precision_", None)
        return stored if stored is not None else self._out(self._rep.dense_inverse())

    def error_norm(self, comp_cov: Any, norm: str = "frobenius", scaling: bool = True,
                   squared: bool = True) -> float:
        """The squared (``squared``) Frobenius or spectral norm of comp_cov - covariance_,
        divided by p when ``scaling`` (scikit-learn's ``error_norm``).

        Parameters
        ----------
        comp_cov : array-like
            [p, p] the matrix to compare with.
        norm : {"frobenius", "spectral"}, default "frobenius"
            Which norm.
        scaling : bool, default True
            Divide by p.
        squared : bool, default True
            Return the squared norm.

        Returns
        -------
        float
            The error.

        Raises
        ------
        UnsupportedCapabilityError
            For a matrix-free fit (no ``covariance_``) or an unknown norm.
        """
        self._check_fitted()
        if not hasattr(self, "covariance_"):
            raise UnsupportedCapabilityError(
                "this fit has no dense covariance_ (a matrix-free fit); compare products "
                "instead (curvlab.shrinkage.heldout_score)"
            )
        error = (torch.as_tensor(np.asarray(comp_cov, dtype=np.float64))
                 - torch.as_tensor(self.covariance_).cpu().to(F64))
        if norm == "frobenius":
            value = float((error**2).sum())
        elif norm == "spectral":
            value = float(torch.linalg.svdvals(error.T @ error).max())
        else:
            raise UnsupportedCapabilityError("Only spectral and frobenius norms are implemented")
        if scaling:
            value /= error.shape[0]
        return value if squared else math.sqrt(value)


# ---------------------------------------------------------------------- inputs
def is_sample_operator(X: Any) -> bool:
    """A curvature estimator or anything exposing per-sample products.

    Parameters
    ----------
    X : object
        Anything.

    Returns
    -------
    bool
        Whether ``X`` has ``group_matvecs``, ``num_samples`` and ``num_params``.

    Examples
    --------
    >>> import torch
    >>> from curvlab.shrinkage import PerSampleMatrices
    >>> from curvlab.shrinkage.base import is_sample_operator
    >>> is_sample_operator(PerSampleMatrices(torch.ones(3, 2, 2))), is_sample_operator(3)
    (True, False)
    """
    return all(hasattr(X, a) for a in ("group_matvecs", "num_samples", "num_params"))


def is_operator(X: Any) -> bool:
    """An operator to fit matrix-free (not an array or tensor of samples).

    Parameters
    ----------
    X : object
        What ``fit`` was given.

    Returns
    -------
    bool
        True for operators (:func:`curvlab.operators.is_operator`), False for arrays and
        tensors.

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.shrinkage.base import is_operator
    >>> is_operator(curvlab.IdentityOperator(2)), is_operator(torch.eye(2))
    (True, False)
    """
    return not isinstance(X, (torch.Tensor, np.ndarray)) and _is_operator_protocol(X)


def implied_damping(rho: float, tau: float) -> float:
    """delta = tau rho / (1 - rho) (negative when the target scale is; inf at rho = 1).

    Parameters
    ----------
    rho : float
        Shrinkage intensity.
    tau : float
        Target scale.

    Returns
    -------
    float
        The damping delta with (1 - rho) S + rho tau I = (1 - rho)(S + delta I).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13.

    Examples
    --------
    >>> from curvlab.shrinkage.base import implied_damping
    >>> implied_damping(0.5, 2.0), implied_damping(1.0, 2.0)
    (2.0, inf)
    """
    return math.inf if rho >= 1.0 else tau * rho / (1.0 - rho)


# ---------------------------------------------------------------------- linear shrinkage
class LinearShrinkage(CovarianceMixin, BaseShrinkage):
    """Fit (1 - rho) S + rho tau I; subclasses provide ``_rule(stats) -> (rho, tau, noise)``.

    A new rule is a subclass with a keyword-only ``__init__`` (parameters stored verbatim)
    and ``_rule``, which maps the trace statistics of the n observations to (rho, tau, the
    noise variance or None).

    Attributes
    ----------
    shrinkage_ : float
        rho.
    shrinkage_stderr_ : float
        Its jackknife standard error over probes (0 when exact).
    target_scale_ : float
        tau.
    damping_ : float
        delta = tau rho / (1 - rho).
    noise_variance_ : float or None
        The rule's noise estimate, where it has one.
    n_samples_, n_features_in_, n_matvecs_ : int
        n, p and the products spent.
    precision_ : array, tensor or None
        None unless ``store_precision``, and always None for estimators (P x P).
    covariance_ : array or tensor
        The fitted matrix (explicit inputs only).
    location_ : array or tensor
        The mean (vector samples only).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13 (damping is linear shrinkage).
    O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance
    matrices", J. Multivariate Anal. 88(2) (2004).

    Examples
    --------
    A rule that always shrinks halfway toward the identity:

    >>> import numpy as np
    >>> from curvlab.shrinkage import LinearShrinkage
    >>> class Half(LinearShrinkage):
    ...     def __init__(self, *, store_precision=True, assume_centered=False):
    ...         self.store_precision = store_precision
    ...         self.assume_centered = assume_centered
    ...     def _rule(self, stats):
    ...         return 0.5, 1.0, None
    >>> fit = Half().fit(np.random.default_rng(0).standard_normal((20, 3)))
    >>> fit.shrinkage_, fit.damping_
    (0.5, 1.0)
    """

    assume_centered: bool = False
    store_precision: bool = True
    n_probes: int = 30
    probe_batch: int = 1
    seed: Seed = 0
    exact: bool | None = None
    _needs_stats = True
    _min_samples = 1

    def _rule(self, stats: TraceStats | None) -> tuple[float, float, float | None]:
        raise NotImplementedError

    def _block_columns(self) -> int | None:
        return None

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> LinearShrinkage:
        """Fit from samples [n, p], per-sample matrices [n, p, p] or a curvature estimator.

        Parameters
        ----------
        X : array-like, torch.Tensor or operator
            Vector samples [n, p] (numpy in, numpy out; a tensor keeps its dtype and
            device), symmetric per-sample matrices [n, p, p], or a curvature estimator.
        y : None
            Ignored (scikit-learn compatibility).

        Returns
        -------
        LinearShrinkage
            ``self``, fitted.
        """
        self._reset()
        if is_operator(X):
            return self._fit_operator(X)
        T, numpy_out = as_samples(X, estimator=self, allow_nd=True,
                                  ensure_min_samples=self._min_samples)
        n = T.shape[0]
        if T.ndim == 3 and T.shape[1] != T.shape[2]:
            raise InvalidInputError(
                f"expected vector samples [n, p] or per-sample matrices [n, p, p], got shape "
                f"{tuple(T.shape)}"
            )
        p = T.shape[-1]
        self._set_space(p, T.dtype, T.device, numpy_out)
        if T.ndim == 2:
            warn_one_sample(n)
            X64 = T.to(F64)
            location = torch.zeros_like(X64[0]) if self.assume_centered else X64.mean(dim=0)
            Xc = X64 if self.assume_centered else X64 - location
            stats, moments = vector_stats(Xc, self._block_columns())
            self.location_ = self._out(location)
            rho, tau = self._finish(stats, n)
            if moments.gram is not None:  # n <= p: the n x n Gram route
                self._rep = LowRankPlusIdentity(Xc, moments.raw_gram(), (1 - rho) / n, rho * tau)
                cov = self._rep.dense()
            else:
                cov = (1 - rho) * moments.raw_cov()
                cov.diagonal().add_(rho * tau)
                self._rep = Dense(cov)
        else:
            stats, S = matrix_stats(T)
            rho, tau = self._finish(stats, n)
            cov = (1 - rho) * S
            cov.diagonal().add_(rho * tau)
            self._rep = Dense(cov)
        self.covariance_ = self._out(cov)
        self.precision_ = self._out(self._rep.dense_inverse()) if self.store_precision else None
        return self

    def _fit_operator(self, op: Any) -> LinearShrinkage:
        factors = stats = None
        if self._needs_stats:
            factors, stats = self._operator_stats(op)
        self._set_space(int(op.num_params), op.dtype, op.device, False)
        rho, tau = self._finish(stats, getattr(op, "num_samples", None))
        if factors is not None:
            F, K = factors
            n = stats.n
            self._rep = LowRankPlusIdentity(F, K, (1 - rho) / n, rho * tau)
        else:
            self._rep = ShiftedOperator(op, rho, tau)
        self.precision_ = None  # P x P: formed only on request, by get_precision()
        return self

    def _operator_stats(self, op: Any):
        """((stacked factors [n m, p], their float64 Gram) or None, statistics)."""
        factors = None if self.exact is False else exact_factors(op)
        if self.exact and factors is None:
            raise InvalidInputError(
                "exact=True needs per-sample factors on one process: per-sample gradients "
                "(curvature='ef', e.g. on 'autograd') or GGN square roots (curvature 'ggn' or "
                "'fisher' on 'backpack'); use exact=None for probes"
            )
        if factors is not None:
            stats, K = factor_stats(factors)
            return (factors.reshape(-1, factors.shape[-1]), K), stats
        if not is_sample_operator(op):
            raise InvalidInputError(
                f"{type(self).__name__} needs per-sample products: pass a curvature estimator "
                "with group_matvecs (e.g. the 'autograd' backend) or explicit samples"
            )
        return None, probe_stats(op, check_int("n_probes", self.n_probes, minimum=2), self.seed,
                                 probe_batch=check_int("probe_batch", self.probe_batch, minimum=1))

    def _finish(self, stats: TraceStats | None, n: int | None) -> tuple[float, float]:
        rho, tau, noise = self._rule(stats)
        self.shrinkage_ = float(rho)
        self.target_scale_ = float(tau)
        self.damping_ = implied_damping(self.shrinkage_, self.target_scale_)
        self.noise_variance_ = None if noise is None else float(noise)
        self.shrinkage_stderr_ = self._jackknife(stats)
        self.n_samples_ = n
        self.n_matvecs_ = 0 if stats is None else stats.n_matvecs
        return self.shrinkage_, self.target_scale_

    def _jackknife(self, stats: TraceStats | None) -> float:
        if stats is None or stats.exact or stats.n_probes < 2:
            return 0.0
        m = stats.n_probes
        loo = torch.tensor([self._rule(stats.drop(j))[0] for j in range(m)], dtype=F64)
        return float(((m - 1) / m * ((loo - loo.mean()) ** 2).sum()).sqrt())


def exact_factors(op: Any) -> torch.Tensor | None:
    """[n, m, p] per-sample factors with M_k = F_k^T F_k where the estimator has them on one
    process: per-sample gradients for "ef", GGN square roots for "ggn"/"fisher".

    Parameters
    ----------
    op : CurvatureEstimator or operator
        The estimator being fitted.

    Returns
    -------
    torch.Tensor or None
        [n, m, p] factors (m = 1 for gradients), or None where the estimator has none
        (other curvatures, backends without them, or several processes).
    """
    if getattr(op, "distributed", False):  # factors are per rank
        return None
    curvature = getattr(op, "curvature", None)
    if curvature == "ef" and hasattr(op, "per_sample_gradients"):
        return op.per_sample_gradients().detach()[:, None, :]
    if curvature in ("ggn", "fisher") and hasattr(op, "per_sample_sqrt_ggn"):
        return op.per_sample_sqrt_ggn().detach()
    return None
