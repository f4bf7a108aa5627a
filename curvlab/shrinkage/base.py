"""Base classes: scikit-learn parameter conventions and the fitted linear-shrinkage operator.

``BaseShrinkage`` implements ``get_params``/``set_params`` with scikit-learn's semantics
(keyword-only ``__init__`` parameters stored verbatim), so ``sklearn.base.clone`` works
without scikit-learn being a dependency. ``LinearShrinkage`` fits

    (1 - rho) S + rho tau I = (1 - rho) (S + delta I),   delta = tau rho / (1 - rho)

(DESIGN.md section 4) from explicit vector samples [n, p], explicit per-sample matrices
[n, p, p], or a curvature estimator (anything with ``group_matvecs``/``num_samples``/
``num_params``). Explicit inputs give ``covariance_`` and ``precision_`` (numpy in, numpy
out); every fit gives ``matvec`` and ``solve`` of the shrunk matrix, matrix-free for
operators: ``solve`` uses the Woodbury identity when the fit kept per-sample gradients and
conjugate gradients on (1 - rho)(S + delta I) otherwise (S must then be positive
semi-definite, as a GGN, Fisher or empirical Fisher is).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch

from curvlab._random import Seed
from curvlab.errors import InvalidInputError, NotConvergedWarning, NumericalError
from curvlab.shrinkage._traces import (
    TraceStats,
    factor_stats,
    matrix_stats,
    probe_stats,
    vector_stats,
)


class BaseShrinkage:
    """Parameter handling shared by every shrinkage estimator (scikit-learn semantics)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(
            name
            for name, prm in sig.parameters.items()
            if name != "self" and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)
        )

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters; with ``deep``, nested ones as ``name__sub``."""
        out = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update({f"{name}__{k}": v for k, v in value.get_params().items()})
            out[name] = value
        return out

    def set_params(self, **params: Any) -> BaseShrinkage:
        """Set constructor parameters (``name`` or nested ``name__sub``); returns self."""
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

    def _check_fitted(self) -> None:
        if not hasattr(self, "shrinkage_") and not hasattr(self, "eigenvalues_"):
            raise InvalidInputError(f"this {type(self).__name__} is not fitted; call fit first")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays and tensors compare elementwise
        return a is b


# ---------------------------------------------------------------------- inputs
def is_sample_operator(X: Any) -> bool:
    """A curvature estimator or anything exposing per-sample products."""
    return all(hasattr(X, a) for a in ("group_matvecs", "num_samples", "num_params"))


def is_operator(X: Any) -> bool:
    return all(hasattr(X, a) for a in ("matvec", "num_params", "dtype", "device"))


def as_tensor(X: Any) -> tuple[torch.Tensor, bool]:
    """An array-like as a floating tensor (numpy and lists -> float64); flags numpy input."""
    if isinstance(X, torch.Tensor):
        if not X.is_floating_point():
            X = X.to(torch.float64)
        return X.detach(), False
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read {type(X).__name__} as samples: pass an [n, p] or [n, p, p] "
            "array or tensor, or a curvature estimator"
        ) from exc
    return torch.from_numpy(arr), True


def check_finite(X: torch.Tensor) -> None:
    if not torch.isfinite(X).all():
        raise InvalidInputError("the samples contain NaN or infinite values")


def implied_damping(rho: float, tau: float) -> float:
    """delta = tau rho / (1 - rho) (negative when the target scale is; inf at rho = 1)."""
    return math.inf if rho >= 1.0 else tau * rho / (1.0 - rho)


# ---------------------------------------------------------------------- linear shrinkage
class LinearShrinkage(BaseShrinkage):
    """Fit (1 - rho) S + rho tau I; subclasses provide ``_rule(stats) -> (rho, tau, noise)``.

    Fitted attributes: ``shrinkage_`` (rho), ``shrinkage_stderr_`` (jackknife over probes;
    0 when exact), ``target_scale_`` (tau), ``damping_`` (delta), ``noise_variance_``,
    ``n_samples_``, ``n_features_in_``, ``n_matvecs_``; ``covariance_``, ``precision_`` and
    ``location_`` (vector samples) for explicit inputs.
    """

    assume_centered: bool = False
    store_precision: bool = True
    n_probes: int = 30
    seed: Seed = 0
    exact: bool | None = None
    _needs_stats = True

    def _rule(self, stats: TraceStats | None) -> tuple[float, float, float | None]:
        raise NotImplementedError

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> LinearShrinkage:
        """Fit from samples [n, p], per-sample matrices [n, p, p] or a curvature estimator."""
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)
        self._op = self._factors = self._factor_samples = None
        self._numpy = False
        if is_operator(X):
            stats = self._operator_stats(X) if self._needs_stats else None
            self._op = X
            self._finish(stats, int(X.num_params), getattr(X, "num_samples", None))
            return self
        T, self._numpy = as_tensor(X)
        check_finite(T)
        if T.ndim == 2:
            if T.shape[0] < 1 or T.shape[1] < 1:
                raise InvalidInputError(f"need samples and features, got {tuple(T.shape)}")
            location = torch.zeros_like(T[0]) if self.assume_centered else T.mean(dim=0)
            Xc = T - location
            S = Xc.T @ Xc / T.shape[0]
            stats = vector_stats(Xc, S)
            self.location_ = self._out(location)
        elif T.ndim == 3 and T.shape[1] == T.shape[2]:
            stats, S = matrix_stats(T)
        else:
            raise InvalidInputError(
                f"expected vector samples [n, p] or per-sample matrices [n, p, p], got shape "
                f"{tuple(T.shape)}"
            )
        self._finish(stats, S.shape[0], T.shape[0], S=S)
        return self

    def _operator_stats(self, op: Any) -> TraceStats:
        factors = None if self.exact is False else exact_factors(op)
        if self.exact and factors is None:
            raise InvalidInputError(
                "exact=True needs per-sample factors on one process: per-sample gradients "
                "(curvature='ef', e.g. on 'autograd') or GGN square roots (curvature 'ggn' or "
                "'fisher' on 'backpack'); use exact=None for probes"
            )
        if factors is not None:
            n = factors.shape[0]
            self._factors, self._factor_samples = factors.reshape(-1, factors.shape[-1]), n
            return factor_stats(factors)
        if not is_sample_operator(op):
            raise InvalidInputError(
                f"{type(self).__name__} needs per-sample products: pass a curvature estimator "
                "with group_matvecs (e.g. the 'autograd' backend) or explicit samples"
            )
        return probe_stats(op, self.n_probes, self.seed)

    def _finish(self, stats: TraceStats | None, p: int, n: int | None, S=None) -> None:
        rho, tau, noise = self._rule(stats)
        self.shrinkage_ = float(rho)
        self.target_scale_ = float(tau)
        self.damping_ = implied_damping(self.shrinkage_, self.target_scale_)
        self.noise_variance_ = None if noise is None else float(noise)
        self.shrinkage_stderr_ = self._jackknife(stats)
        self.n_features_in_ = p
        self.n_samples_ = n
        self.n_matvecs_ = 0 if stats is None else stats.n_matvecs
        if S is not None:
            cov = (1.0 - rho) * S
            cov.diagonal().add_(rho * tau)
            self._cov = cov
            self.covariance_ = self._out(cov)
            if self.store_precision:
                self.precision_ = self._out(torch.linalg.pinv(cov, hermitian=True))

    def _jackknife(self, stats: TraceStats | None) -> float:
        if stats is None or stats.exact or stats.n_probes < 2:
            return 0.0
        m = stats.n_probes
        loo = torch.tensor([self._rule(stats.drop(j))[0] for j in range(m)], dtype=torch.float64)
        return float(((m - 1) / m * ((loo - loo.mean()) ** 2).sum()).sqrt())

    def _out(self, t: torch.Tensor):
        return t.cpu().numpy() if self._numpy else t

    # ------------------------------------------------------------------ the shrunk matrix
    def _S_matvec(self, V: torch.Tensor) -> torch.Tensor:
        if self._factors is not None:
            G = self._factors
            return G.T @ (G @ V) / self._factor_samples
        return self._op.matvec(V)

    def matvec(self, v):
        """((1 - rho) S + rho tau I) v for v [p] or [p, k]."""
        self._check_fitted()
        V, numpy = as_tensor(v)
        if self._op is None:
            out = self._cov.to(V.dtype) @ V
        else:
            rho = self.shrinkage_
            out = rho * self.target_scale_ * V
            if rho < 1.0:
                out = out + (1.0 - rho) * self._S_matvec(V)
        return out.cpu().numpy() if numpy else out

    def solve(self, v, *, tol: float = 1e-10, max_iter: int | None = None):
        """((1 - rho) S + rho tau I)^-1 v (pseudo-inverse for explicit inputs; see module doc)."""
        self._check_fitted()
        V, numpy = as_tensor(v)
        rho, tau = self.shrinkage_, self.target_scale_
        if self._op is None:
            out = torch.linalg.pinv(self._cov, hermitian=True).to(V.dtype) @ V
        elif rho >= 1.0:
            out = V / tau
        elif self._factors is not None:
            out = self._woodbury(V) / (1.0 - rho)
        else:
            out = conjugate_gradient(self.matvec, V, tol=tol, max_iter=max_iter)
        return out.cpu().numpy() if numpy else out

    def _woodbury(self, V: torch.Tensor) -> torch.Tensor:
        """(G^T G / n + delta I)^-1 V = (V - G^T (n delta I + G G^T)^-1 G V) / delta, with G
        the [n m, p] stack of the n samples' factors."""
        G, delta = self._factors, self.damping_
        if not delta > 0:
            raise NumericalError(
                f"the shrunk matrix is singular or indefinite (damping {delta}); "
                "use a FixedShrinkage with a positive damping"
            )
        K = G @ G.T
        K.diagonal().add_(self._factor_samples * delta)
        return (V - G.T @ torch.linalg.solve(K, G @ V)) / delta


def exact_factors(op: Any) -> torch.Tensor | None:
    """[n, m, p] per-sample factors with M_k = F_k^T F_k where the estimator has them on one
    process: per-sample gradients for "ef", GGN square roots for "ggn"/"fisher"."""
    if getattr(op, "distributed", False):  # factors are per rank
        return None
    curvature = getattr(op, "curvature", None)
    if curvature == "ef" and hasattr(op, "per_sample_gradients"):
        return op.per_sample_gradients().detach()[:, None, :]
    if curvature in ("ggn", "fisher") and hasattr(op, "per_sample_sqrt_ggn"):
        return op.per_sample_sqrt_ggn().detach()
    return None


def conjugate_gradient(matvec, B: torch.Tensor, *, tol: float = 1e-10,
                       max_iter: int | None = None) -> torch.Tensor:
    """Solve A X = B column by column (vectorised) for a symmetric positive definite A."""
    import warnings

    block = B if B.ndim == 2 else B[:, None]
    max_iter = max_iter or 10 * block.shape[0]
    X = torch.zeros_like(block)
    R = block.clone()
    D = R.clone()
    rs = (R * R).sum(dim=0)
    target = tol**2 * rs
    active = rs > target
    for _ in range(max_iter):
        if not active.any():
            break
        AD = matvec(D)
        curv = (D * AD).sum(dim=0)
        if (curv[active] <= 0).any():
            raise NumericalError(
                "the shrunk matrix is not positive definite (conjugate gradients met "
                "non-positive curvature); shrink more or use a positive semi-definite curvature"
            )
        alpha = torch.where(active, rs / torch.where(active, curv, 1.0), 0.0)
        X = X + alpha * D
        R = R - alpha * AD
        rs_new = (R * R).sum(dim=0)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        D = R + beta * D
        rs = rs_new
        active = rs > target
    if active.any():
        warnings.warn(
            f"conjugate gradients stopped after {max_iter} iterations above tol={tol}",
            NotConvergedWarning,
            stacklevel=3,
        )
    return X if B.ndim == 2 else X[:, 0]
