"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos (DESIGN.md section 4).

The method is the thick-restart Lanczos of Wu & Simon (SIAM J. Matrix Anal. Appl. 22, 2000)
in its Krylov–Schur form: a basis V of at most ``ncv`` vectors with full
reorthogonalization (classical Gram–Schmidt applied twice) satisfies

    A V_j = V_j T_j + beta_j v_{j+1} e_j^T,        T_j = V_j^T A V_j  (dense, j x j),

so a Ritz pair (theta, y = V_j s) of T_j has the residual A y - theta y = beta_j s_j v_{j+1},
of norm |beta_j s_j| (the last component of s). When the basis is full, the wanted Ritz
vectors and some extra ones from the same end of the spectrum are kept and the residual
vector v_{j+1} becomes the next basis vector (the kept block of T is diagonal plus the
coupling row beta_j s_j, which the next Gram–Schmidt step recovers). Memory: the basis
[P, ncv + 1] plus the locked vectors (about k more).

Convergence: a wanted pair is converged when its residual norm is at most ``tol * scale``,
scale = the largest ||A v|| over the unit basis vectors seen and the largest |theta| (so
scale >= |theta| and the test is tol * max(|theta|, scale) = tol * scale), a lower bound on
||A||_2 that is tight after a few steps. This is a backward-error test: the
pair is exact for a matrix within ``tol * ||A||`` of A. Eigenvalue errors are at most the
residual, and about residual^2 / gap for an isolated eigenvalue.

Repeated eigenvalues: a Krylov space from one start vector holds one direction of each
eigenspace, so a single run cannot see the second copy of a repeated eigenvalue. With
``verify=True`` (the default) the converged wanted pairs are locked and the iteration restarts
from a fresh uniformly random unit vector u orthogonal to them (the deflated operator C). It
stops when either
- its extreme Ritz values are certified outside the wanted range: by Kuczyński & Woźniakowski
  (SIAM J. Matrix Anal. Appl. 13, 1992, Thm 4.2) applied to the PSD operators C - lambda_min
  and lambda_max - C, after j steps without restart (Krylov dimension j, counted as j - 1
  products), with probability >= 1 - delta both
      lambda_max(C) <= theta_max + eps d / (1 - 2 eps),
      lambda_min(C) >= theta_min - eps d / (1 - 2 eps),
  d = theta_max - theta_min, sqrt(eps) = ln(2 * 1.648 sqrt(P) / delta) / (2j - 3),
  delta = VERIFY_FAILURE_PROB; typically 10-30 matvecs when the k-th eigenvalue is separated
  from the rest; or
- its extreme Ritz pairs pass the residual test outside the wanted set (the fallback when
  the k-th eigenvalue sits in a dense part of the spectrum).
Pairs of the deflated run that enter the wanted set are converged and locked in turn, and the
check repeats.

Reported residuals are the Ritz estimates |beta s_j|, corrected for the couplings dropped when
locking (kept as r_e^T V products), so they equal the true ||A x - lambda x|| up to roundoff
of order eps ||A||. The small projected problems are solved in float64 on the CPU; all
P-sized work stays in ``op.dtype`` on ``op.device``.
"""

from __future__ import annotations

import math
import warnings

import torch

from curvlab._random import Seed, gaussian, make_generator
from curvlab.errors import InvalidInputError, NotConvergedWarning
from curvlab.results import Eigenpairs
from curvlab.spectral._krylov import (
    apply,
    breakdown_threshold,
    cgs2,
    check_operator,
    check_positive_int,
    column_blocks,
)

WHICH = ("largest", "smallest", "both")
#: Operators with P <= DENSE_FACTOR * ncv are solved directly (P matvecs and a dense eigh).
DENSE_FACTOR = 2
#: Default matvec budget, in units of ncv.
MAX_ITER_FACTOR = 50
#: Probability that the verification misses an eigenvalue beyond the k-th (worst case).
VERIFY_FAILURE_PROB = 1e-3

_KW_CONSTANT = 1.648  # Kuczyński & Woźniakowski (1992), Theorem 4.2
_F64 = torch.float64


def eigenpairs(
    op,
    *,
    k: int = 10,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    ncv: int | None = None,
    seed: Seed = 0,
    verify: bool = True,
) -> Eigenpairs:
    """The k extreme eigenpairs of the symmetric operator ``op``.

    Parameters
    ----------
    op : any :class:`~curvlab.Operator` (an estimator, a :class:`~curvlab.DenseOperator`).
    k : number of eigenpairs.
    which : "largest" (algebraically largest), "smallest" (most negative first, for
        indefinite Hessians) or "both" (ceil(k/2) largest and floor(k/2) smallest).
    tol : residual tolerance relative to ||A||_2 (see the module docstring).
    max_iter : matvec budget (default 50 * ncv, at least ncv).
    ncv : basis size (default max(2k + 1, 30), capped at P; at least k + 2).
    seed : start and restart vectors (int or torch.Generator).
    verify : run the deflation check that finds repeated eigenvalues (module docstring).

    Returns :class:`~curvlab.Eigenpairs` with values in descending order, vectors [P, k] as
    matching columns, residual norms, the matvec count and ``converged`` (every pair meets
    ``tol`` and the verification finished); a :class:`NotConvergedWarning` otherwise.
    Operators with P <= 2 * ncv are solved directly: P matvecs with identity columns and a
    dense ``eigh`` (residuals then measured exactly on the assembled matrix).
    """
    P = check_operator(op)
    check_positive_int("k", k)
    if k > P:
        raise InvalidInputError(f"k={k} exceeds the operator size P={P}")
    if which not in WHICH:
        raise InvalidInputError(f"which must be one of {WHICH}, got {which!r}")
    if not isinstance(tol, (int, float)) or not tol > 0 or tol != tol or tol == float("inf"):
        raise InvalidInputError(f"tol must be a positive finite number, got {tol!r}")
    n_top, n_bot = {"largest": (k, 0), "smallest": (0, k), "both": ((k + 1) // 2, k // 2)}[which]
    if ncv is None:
        ncv = max(2 * k + 1, 30)
    else:
        check_positive_int("ncv", ncv, k + 2)
    ncv = min(ncv, P)
    if max_iter is None:
        max_iter = MAX_ITER_FACTOR * ncv
    else:
        check_positive_int("max_iter", max_iter, ncv)
    if P <= DENSE_FACTOR * ncv:
        return _dense_eigenpairs(op, n_top, n_bot, chunk=ncv)
    gen = make_generator(seed, op.device)
    solver = _ThickRestartLanczos(op, n_top, n_bot, float(tol), max_iter, ncv, gen, verify)
    return solver.run()


def _dense_eigenpairs(op, n_top: int, n_bot: int, chunk: int) -> Eigenpairs:
    """Assemble A from P identity columns, solve with ``eigh``; exact residuals."""
    P = op.num_params
    A = torch.cat([cols for _, cols in column_blocks(op, chunk)], dim=1)
    evals, evecs = torch.linalg.eigh((A + A.T) / 2)
    idx = torch.cat([torch.arange(P - 1, P - 1 - n_top, -1), torch.arange(n_bot - 1, -1, -1)])
    idx = idx.to(evals.device)
    values, vectors = evals[idx], evecs[:, idx]
    residuals = (A @ vectors - vectors * values).norm(dim=0)
    return Eigenpairs(values, vectors, residuals, n_matvecs=P, converged=True)


class _ThickRestartLanczos:
    """State of one run: active basis V, projected T, locked pairs and their couplings."""

    def __init__(self, op, n_top, n_bot, tol, max_iter, ncv, gen, verify):
        self.op, self.n_top, self.n_bot, self.tol = op, n_top, n_bot, tol
        self.max_iter, self.m, self.gen, self.verify = max_iter, ncv, gen, verify
        P, dt, dev = op.num_params, op.dtype, op.device
        self.V = _new_basis(P, ncv + 1, dt, dev)
        self.T = torch.zeros(ncv, ncv, dtype=_F64)
        # Locked pairs (X, theta_lock) and, per locking event e, the dropped residual direction
        # r_e (columns of R), ||b_e||^2, and G[e, i] = r_e^T V[:, i] for the active basis.
        self.X = torch.zeros(P, 0, dtype=dt, device=dev)
        self.theta_lock = torch.zeros(0, dtype=_F64)
        self.res_lock = torch.zeros(0, dtype=_F64)
        self.R = torch.zeros(P, 0, dtype=dt, device=dev)
        self.bnorm2 = torch.zeros(0, dtype=_F64)
        self.G = torch.zeros(0, ncv + 1, dtype=_F64)
        self.scale = 0.0
        self.beta = 0.0
        self.j = 0
        self.n_matvecs = 0
        self.clean = True  # the active basis is one unrestarted Krylov space of a random start

    # ------------------------------------------------------------------ basis building
    def _random_orthogonal(self, ncols: int) -> torch.Tensor:
        g = gaussian(
            (self.op.num_params,), generator=self.gen, dtype=self.op.dtype, device=self.op.device
        )
        g, _ = cgs2(g, self.X, self.V[:, :ncols])
        return g / g.norm()

    def _set_column(self, i: int, v: torch.Tensor) -> None:
        self.V[:, i] = v
        if self.R.shape[1]:
            self.G[:, i] = (self.R.T @ v).to(device="cpu", dtype=_F64)

    def _start_fresh(self) -> None:
        self.T.zero_()
        self.j, self.beta, self.clean = 0, 0.0, True
        self._set_column(0, self._random_orthogonal(0))

    def _step(self) -> None:
        """One Lanczos step: A v_j, full reorthogonalization, next basis vector."""
        j = self.j
        w = apply(self.op, self.V[:, j])
        self.n_matvecs += 1
        self.scale = max(self.scale, float(w.norm()))
        w, (_, h) = cgs2(w, self.X, self.V[:, : j + 1])
        h = h.to(device="cpu", dtype=_F64)
        self.T[: j + 1, j] = h
        self.T[j, : j + 1] = h
        beta = float(w.norm())
        if beta <= breakdown_threshold(self.op.dtype, self.scale):
            # Invariant subspace: continue from a random vector orthogonal to everything.
            w, beta = self._random_orthogonal(j + 1), 0.0
            self.clean = False
        else:
            w = w / beta
        self._set_column(j + 1, w)
        self.beta = beta
        self.j = j + 1

    # ------------------------------------------------------------------ Ritz analysis
    def _ritz(self):
        j = self.j
        theta, S = torch.linalg.eigh(self.T[:j, :j])
        S = S.contiguous()  # eigh returns column-major; matmuls with its slices are slow
        res2 = (self.beta * S[j - 1]) ** 2
        if self.R.shape[1]:
            res2 = res2 + (self.bnorm2[:, None] * (self.G[:, :j] @ S) ** 2).sum(0)
        self.scale = max(self.scale, float(theta.abs().max()))
        return theta, S, res2.sqrt()

    def _wanted(self, theta: torch.Tensor):
        """Indices into cat(theta_lock, theta) of the wanted values: top and bottom parts."""
        values = torch.cat([self.theta_lock, theta])
        order = torch.argsort(values, descending=True)
        top = order[: self.n_top]
        bot = order[len(order) - self.n_bot :] if self.n_bot else order[:0]
        return top, bot

    # ------------------------------------------------------------------ restarts
    def _restart(self, theta, S, top_active: int, bot_active: int, phase: int) -> None:
        """Keep the wanted Ritz vectors plus half the spare room from the same ends."""
        m = self.m
        need_top = max(top_active, 1 if (phase and self.n_top) else 0)
        need_bot = max(bot_active, 1 if (phase and self.n_bot) else 0)
        extra = (m - need_top - need_bot) // 2
        if self.n_top and self.n_bot:
            e_top, e_bot = extra - extra // 2, extra // 2
        elif self.n_top:
            e_top, e_bot = extra, 0
        else:
            e_top, e_bot = 0, extra
        n_up, n_down = need_top + e_top, need_bot + e_bot
        keep = torch.cat([torch.arange(n_down), torch.arange(m - n_up, m)])
        Sk = S[:, keep].contiguous()
        l = len(keep)
        self.V[:, :l] = self.V[:, :m] @ Sk.to(dtype=self.op.dtype, device=self.op.device)
        self.V[:, l] = self.V[:, m]
        if self.R.shape[1]:
            self.G[:, :l] = self.G[:, :m] @ Sk
            self.G[:, l] = self.G[:, m]
        self.T.zero_()
        self.T[:l, :l] = torch.diag(theta[keep])
        self.j = l
        self.clean = False

    def _certified(self, theta, top_bound: float, bot_bound: float) -> bool:
        """Whether the deflated spectrum lies strictly inside (bot_bound, top_bound) w.h.p."""
        j = self.j
        if not self.clean or j < 3:
            return False
        log_term = math.log(2 * _KW_CONSTANT * math.sqrt(self.op.num_params) / VERIFY_FAILURE_PROB)
        eps = (log_term / (2 * j - 3)) ** 2
        if eps >= 0.5:
            return False
        margin = eps * float(theta[-1] - theta[0]) / (1 - 2 * eps)
        return (not self.n_top or float(theta[-1]) + margin < top_bound) and (
            not self.n_bot or float(theta[0]) - margin > bot_bound
        )

    def _lock(self, idx, theta, S, res) -> None:
        """Move active Ritz pairs idx to the locked set; remember their dropped coupling."""
        j = self.j
        Sk = S[:, idx].contiguous()
        Y = self.V[:, :j] @ Sk.to(dtype=self.op.dtype, device=self.op.device)
        self.X = torch.cat([self.X, Y], dim=1)
        self.theta_lock = torch.cat([self.theta_lock, theta[idx]])
        self.res_lock = torch.cat([self.res_lock, res[idx]])
        if self.beta > 0:
            b = self.beta * S[j - 1, idx]
            self.R = torch.cat([self.R, self.V[:, j : j + 1].clone()], dim=1)
            self.bnorm2 = torch.cat([self.bnorm2, (b**2).sum().reshape(1)])
            self.G = torch.cat([self.G, torch.zeros(1, self.m + 1, dtype=_F64)])

    def _result(self, wanted, theta, S, res, converged: bool) -> Eigenpairs:
        nl = self.X.shape[1]
        locked = wanted[wanted < nl]
        active = wanted[wanted >= nl] - nl
        dt, dev = self.op.dtype, self.op.device
        ritz = self.V[:, : self.j] @ S[:, active].contiguous().to(dtype=dt, device=dev)
        vectors = torch.cat([self.X[:, locked], ritz], dim=1)
        values = torch.cat([self.theta_lock[locked], theta[active]])
        residuals = torch.cat([self.res_lock[locked], res[active]])
        order = torch.argsort(values, descending=True)
        if not converged:
            worst = float(residuals.max() / max(self.scale, torch.finfo(dt).tiny))
            warnings.warn(
                NotConvergedWarning(
                    f"Lanczos reached max_iter={self.max_iter} matvecs before converging or "
                    f"finishing its verification (worst relative residual {worst:.2e}, "
                    f"tol={self.tol:g}); raise max_iter or ncv"
                ),
                stacklevel=3,
            )
        return Eigenpairs(
            values=values[order].to(dtype=dt, device=dev),
            vectors=vectors[:, order],
            residuals=residuals[order].to(dtype=dt, device=dev),
            n_matvecs=self.n_matvecs,
            converged=converged,
        )

    # ------------------------------------------------------------------ driver
    def run(self) -> Eigenpairs:
        k = self.n_top + self.n_bot
        stride = max(1, self.m // 20)
        phase = 0
        self._start_fresh()
        while True:
            self._step()
            full = self.j == self.m
            exhausted = self.n_matvecs >= self.max_iter
            nl = self.X.shape[1]
            if nl + self.j < k or not (full or exhausted or self.j % stride == 0):
                continue
            theta, S, res = self._ritz()
            top, bot = self._wanted(theta)
            wanted = torch.cat([top, bot])
            active = wanted[wanted >= nl] - nl
            conv = res <= self.tol * self.scale
            done = bool(conv[active].all())
            if phase:  # the deflated run's extreme Ritz values must be resolved too
                values = torch.cat([self.theta_lock, theta])
                top_bound = float(values[top].min()) if self.n_top else 0.0
                bot_bound = float(values[bot].max()) if self.n_bot else 0.0
                if not len(active) and self._certified(theta, top_bound, bot_bound):
                    return self._result(wanted, theta, S, res, converged=True)
                done &= (not self.n_top or bool(conv[-1])) and (not self.n_bot or bool(conv[0]))
            if done and self.verify and (phase == 0 or len(active)):
                if exhausted:
                    return self._result(wanted, theta, S, res, converged=False)
                self._lock(active, theta, S, res)
                phase += 1
                self._start_fresh()
                continue
            if done or exhausted:
                return self._result(wanted, theta, S, res, converged=done)
            if full:
                self._restart(theta, S, int((top >= nl).sum()), int((bot >= nl).sum()), phase)


def _new_basis(P: int, ncols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The Lanczos basis storage, [P, ncv + 1] (one allocation per run)."""
    return torch.zeros(P, ncols, dtype=dtype, device=device)
