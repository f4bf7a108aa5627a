"""How a fitted covariance is stored and applied: one factorisation, cached at fit.

- :class:`LowRankPlusIdentity`: Sigma = c F^T F + d I for a factor F [r, p] (the centred
  samples when n < p, per-sample gradients or GGN square roots of an estimator). With the
  float64 Gram matrix K = F F^T = U diag(lam) U^T (one r x r eigendecomposition), the
  Woodbury identity gives

      Sigma^-1 v = v / d + F^T U diag(h) U^T F v,   h = -c / (d (c lam + d)),
      log det Sigma = p log d + sum_i log(1 + c lam_i / d),

  so products, solves, log-determinants and quadratic forms cost O(r p) per vector and
  the fit O(r^2 p + r^3): never O(p^3) when r << p. With d = 0 the solve is the
  pseudo-inverse, F^T U diag(1 / (c lam^2)) U^T F, as ``scipy.linalg.pinvh`` gives it.
- :class:`Dense`: an explicit p x p covariance (n >= p), with one ``eigh`` formed when a
  solve, score or precision first needs it.
- :class:`Eigen`: Sigma = Q diag(w) Q^T (+ ``bulk`` on the complement of Q's columns), from
  a nonlinear cleaning or a partial basis.
- :class:`ShiftedOperator`: Sigma = (1 - rho) A + rho tau I for an operator A with only
  products; solves by conjugate gradients (A positive semi-definite), no log-determinant.

Eigenvalues at or below ``p * eps * max|eigenvalue|`` count as zero (``pinvh``'s cutoff):
they get 1/0 -> 0 in solves and make the log-determinant -inf.
"""

from __future__ import annotations

import math
import warnings

import torch

from curvlab.errors import NotConvergedWarning, NumericalError, UnsupportedCapabilityError

F64 = torch.float64


def _cutoff(values: torch.Tensor, p: int) -> float:
    top = float(values.abs().max()) if values.numel() else 0.0
    return p * torch.finfo(F64).eps * top


class LowRankPlusIdentity:
    """c F^T F + d I with F [r, p] (any float dtype) and its float64 Gram matrix K [r, r]."""

    def __init__(self, F: torch.Tensor, K: torch.Tensor, c: float, d: float):
        self.F, self.c, self.d = F, float(c), float(d)
        self.p = F.shape[1]
        lam, U = torch.linalg.eigh(K.to(F64))
        self.lam, self.U = lam.clamp(min=0.0), U
        values = torch.cat([self.c * self.lam + self.d, lam.new_full((1,), self.d)])
        self.cutoff = _cutoff(values, self.p)
        self.singular = not self.d > self.cutoff

    # products -----------------------------------------------------------------
    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        F = self.F
        out = self.c * (F.T @ (F @ V.to(F.dtype))).to(V.dtype)
        return out + self.d * V if self.d else out

    def _coefficients(self) -> torch.Tensor:
        """h_i of the module docstring (or the pseudo-inverse's 1/(c lam^2) when d = 0)."""
        if self.d < 0:
            raise NumericalError(
                f"the shrunk matrix is indefinite (diagonal shift {self.d:.3g} < 0); shrink "
                "toward a positive target"
            )
        c, d, lam = self.c, self.d, self.lam
        if not self.singular:
            return -c / (d * (c * lam + d))
        keep = c * lam > self.cutoff
        return torch.where(keep, 1.0 / (c * lam**2).clamp(min=torch.finfo(F64).tiny), 0.0)

    def _projected(self, V: torch.Tensor) -> torch.Tensor:
        """U^T F V in float64: [r, k]."""
        return self.U.T @ (self.F @ V.to(self.F.dtype)).to(F64)

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        h = self._coefficients()
        correction = self.F.T @ (self.U @ (h[:, None] * self._projected(V))).to(self.F.dtype)
        if self.singular:
            return correction.to(V.dtype)
        return (V.to(F64) / self.d + correction.to(F64)).to(V.dtype)

    def quad(self, Y: torch.Tensor) -> torch.Tensor:
        """y_i^T Sigma^+ y_i for the rows of Y [m, p] (float64 [m])."""
        h = self._coefficients()
        Z = self._projected(Y.T)  # [r, m]
        out = (h[:, None] * Z * Z).sum(dim=0)
        if not self.singular:
            out = out + (Y.to(F64) ** 2).sum(dim=1) / self.d
        return out

    def logdet(self) -> float:
        if self.singular or self.d <= 0:
            return -math.inf
        return self.p * math.log(self.d) + float(torch.log1p(self.c * self.lam / self.d).sum())

    # dense forms --------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        F = self.F.to(F64)
        out = self.c * (F.T @ F)
        out.diagonal().add_(self.d)
        return out

    def dense_inverse(self) -> torch.Tensor:
        h = self._coefficients()
        W = self.U.T @ self.F.to(F64)  # [r, p]
        out = W.T @ (h[:, None] * W)
        if not self.singular:
            out.diagonal().add_(1.0 / self.d)
        return out


class Dense:
    """An explicit symmetric matrix C; its eigendecomposition is formed once, when first
    needed (solves, quadratic forms, log-determinant, inverse)."""

    def __init__(self, C: torch.Tensor):
        self.C = C
        self._eigen: Eigen | None = None

    @property
    def eigen(self) -> Eigen:
        if self._eigen is None:
            self._eigen = Eigen.of(self.C)
        return self._eigen

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        return (self.C @ V.to(self.C.dtype)).to(V.dtype)

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        return self.eigen.solve(V)

    def quad(self, Y: torch.Tensor) -> torch.Tensor:
        return self.eigen.quad(Y)

    def logdet(self) -> float:
        return self.eigen.logdet()

    def dense(self) -> torch.Tensor:
        return self.C

    def dense_inverse(self) -> torch.Tensor:
        return self.eigen.dense_inverse()


class Eigen:
    """Q diag(w) Q^T, plus ``bulk`` times the projector on the complement of Q's columns."""

    def __init__(self, Q: torch.Tensor, w: torch.Tensor, bulk: float | None = None):
        self.Q, self.w, self.bulk = Q, w, bulk
        self.p = Q.shape[0]
        values = w.to(F64) if bulk is None else torch.cat([w.to(F64), w.new_tensor([bulk])])
        self.cutoff = _cutoff(values, self.p)

    @classmethod
    def of(cls, C: torch.Tensor) -> Eigen:
        """The eigendecomposition of a dense symmetric matrix (float64)."""
        w, Q = torch.linalg.eigh(C.to(F64))
        return cls(Q, w)

    def _apply(self, V: torch.Tensor, fn) -> torch.Tensor:
        Q = self.Q
        X = V.to(Q.dtype)
        coeff = Q.T @ X
        out = Q @ (fn(self.w.to(Q.dtype))[:, None] * coeff)
        if self.bulk is not None:
            b = torch.as_tensor(self.bulk, dtype=Q.dtype)
            out = out + fn(b[None])[0] * (X - Q @ coeff)
        return out.to(V.dtype)

    def _inverse(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(w.abs() > self.cutoff, 1.0 / torch.where(w == 0, 1.0, w), 0.0)

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self._apply(V, lambda w: w)

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        return self._apply(V, self._inverse)

    def quad(self, Y: torch.Tensor) -> torch.Tensor:
        X = Y.T.to(F64)
        return (X * self._apply(X, self._inverse)).sum(dim=0)

    def logdet(self) -> float:
        w = self.w.to(F64)
        if bool((w <= self.cutoff).any()) or (self.bulk is not None and self.bulk <= self.cutoff):
            return -math.inf
        extra = 0.0 if self.bulk is None else (self.p - w.numel()) * math.log(self.bulk)
        return float(torch.log(w).sum()) + extra

    def dense(self) -> torch.Tensor:
        return self._apply(torch.eye(self.p, dtype=F64, device=self.Q.device), lambda w: w)

    def dense_inverse(self) -> torch.Tensor:
        return self._apply(torch.eye(self.p, dtype=F64, device=self.Q.device), self._inverse)


class ShiftedOperator:
    """(1 - rho) A + rho tau I for an operator A known only through its products."""

    def __init__(self, op, rho: float, tau: float):
        self.op, self.rho, self.tau = op, float(rho), float(tau)

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        out = self.rho * self.tau * V
        if self.rho < 1.0:
            out = out + (1.0 - self.rho) * self.op.matvec(V.to(self.op.dtype)).to(V.dtype)
        return out

    def solve(self, V: torch.Tensor, *, tol: float = 1e-10, max_iter: int | None = None):
        if self.rho >= 1.0:
            return V / self.tau
        return conjugate_gradient(self.matvec, V, tol=tol, max_iter=max_iter)

    def quad(self, Y: torch.Tensor | None = None) -> torch.Tensor:
        raise UnsupportedCapabilityError(
            "a matrix-free fit without per-sample factors has products and solves only (no "
            "dense form, log-determinant or Gaussian score); fit explicit samples, or an "
            "estimator with per-sample factors (exact=True)"
        )

    logdet = dense = dense_inverse = quad


def conjugate_gradient(matvec, B: torch.Tensor, *, tol: float = 1e-10,
                       max_iter: int | None = None) -> torch.Tensor:
    """Solve A X = B column by column (vectorised) for a symmetric positive definite A."""
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
