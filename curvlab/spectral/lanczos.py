"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos (DESIGN.md section 4).

The method is the thick-restart Lanczos of Wu & Simon (SIAM J. Matrix Anal. Appl. 22, 2000)
in its Krylov–Schur form: a basis V of at most ``ncv`` vectors with full
reorthogonalization (classical Gram–Schmidt applied twice) satisfies

    A V_j = V_j T_j + beta_j v_{j+1} e_j^T,        T_j = V_j^T A V_j  (dense, j x j),

so a Ritz pair (theta, y = V_j s) of T_j has the residual A y - theta y = beta_j s_j v_{j+1},
of norm |beta_j s_j| (the last component of s). The Ritz pairs are checked after every step
(every ``ncv // 32`` steps for large ``ncv``), so a run stops as soon as its wanted pairs
converge instead of at the end of a restart cycle. When the basis is full, the wanted Ritz
vectors and some extra ones from the same end of the spectrum are kept and the residual
vector v_{j+1} becomes the next basis vector (the kept block of T is diagonal plus the
coupling row beta_j s_j, which the next Gram–Schmidt step recovers).

Layout and precision: the basis is stored as rows, one contiguous [ncv + 1, P] tensor
allocated once, so every Gram–Schmidt pass reads memory in order and restarts are
blocked matrix products. For products in a dtype below float64 (float32, half) the basis
is kept in float64 when its float64 copy fits in :data:`~curvlab.spectral._budget.
BASIS_MEMORY_FRACTION` (a quarter) of the device's total memory; products are then taken in
the operator's dtype and orthogonalized in float64, which lets a float32 operator reach
eigenvalue errors of about 1e-8 relative (like ARPACK on the same products through a
float64 interface) instead of stalling near 1e-5. Memory: (ncv + 1) x P numbers of the
basis dtype plus the k locked vectors when ``verify`` runs.

Convergence: a wanted pair is converged when its residual norm is at most ``tol * scale``,
scale = the largest ||A v|| over the unit basis vectors seen and the largest |theta| (so
scale >= |theta| and the test is tol * max(|theta|, scale) = tol * scale), a lower bound on
||A||_2 that is tight after a few steps. This is a backward-error test: the pair is exact
for a matrix within ``tol * ||A||`` of A. Eigenvalue errors are at most the residual, and
about residual^2 / gap for an isolated eigenvalue.

Repeated eigenvalues: a Krylov space from one start vector holds one direction of each
eigenspace, so a single run cannot see the second copy of a repeated eigenvalue. With
``verify`` (the default) the converged wanted pairs are locked and the iteration restarts
from a fresh random unit vector u orthogonal to them, i.e. it runs Lanczos on the deflated
operator C = (I - X X^T) A (I - X X^T), for ``VERIFY_STEPS`` (5) products. Every Ritz value
theta of that run is a Rayleigh quotient y^T A y of a unit y orthogonal to the locked X, so
by Courant–Fischer a theta above the k-th locked value theta_k by more than the tolerance
``tol * scale`` proves that A has k eigenvalues above theta_k: a missed eigenvalue (the check
has no false alarms). Then the deflated run continues until its wanted pairs converge, they
are locked in turn, and the check repeats. A miss with eigenvalue lambda > theta_k is caught
when the 5-step Ritz value passes theta_k; by Kuczyński & Woźniakowski (SIAM J. Matrix Anal.
Appl. 13, 1992, Thm 4.2) for the PSD operator C - lambda_min(C), j steps reach
theta >= lambda_min + (1 - eps)(lambda - lambda_min) with probability at least
1 - 1.648 sqrt(P) exp(-sqrt(eps) (2j - 1)); in practice a copy well above theta_k (the
common case: a repeated top eigenvalue of a network with symmetric units) shows in 3-5
steps. A miss that the check does not catch sits close to theta_k, where a longer
verification (``verify=20``) or a smaller ``tol`` finds it.

Reported residuals are the Ritz estimates |beta s_j|, corrected for the couplings dropped when
locking (kept as r_e^T V products), so they equal the true ||A x - lambda x|| up to roundoff
of order eps ||A||, eps that of ``op.dtype``: for a float32 operator the products' own
rounding (about 1e-7 ||A||) and the rounding of the returned vectors to float32 are not in
them. A ``tol`` below the dtype's machine epsilon (1.2e-7 for float32) is refused: no
residual measured through such products can certify it (the Ritz estimates of float32
products stall between 1e-10 and 1e-8 ||A||, and eigenvalues stop improving at about 1e-8
relative long before). The small
projected problems are solved in float64 on the CPU; all P-sized work stays on
``op.device``.

ARPACK (``scipy.sparse.linalg.eigsh``) was measured behind this interface (``python -m
benchmarks eigen``, BENCHMARKS.md) and no path delegates to it: on digits MLP/CNN Hessians
it needs as many or more products for the same pairs and tolerance (it checks convergence
once per restart cycle of ncv = max(2k + 1, 20) steps; this solver after every step and
needs 0.48-0.91x ARPACK's products, 0.71-1.14x with the verification), its bookkeeping per
product is 1.7-2.8x this solver's at P = 1e6-1e7, and it runs on the CPU only.
"""

from __future__ import annotations

import warnings

import torch

from curvlab._random import Seed, gaussian, make_generator
from curvlab.errors import InvalidInputError, NotConvergedWarning
from curvlab.progress import Callback, Progress
from curvlab.results import Eigenpairs
from curvlab.spectral._budget import (
    TimedProducts,
    element_size,
    fits_budget,
    warn_if_over_memory,
)
from curvlab.spectral._krylov import (
    apply,
    breakdown_threshold,
    cgs2_,
    check_operator,
    column_blocks,
)
from curvlab.validation import check_choice, check_int, check_positive

WHICH = ("largest", "smallest", "both")
#: Operators with P <= DENSE_FACTOR * ncv are solved directly (P matvecs and a dense eigh).
DENSE_FACTOR = 2
#: Default matvec budget, in units of ncv.
MAX_ITER_FACTOR = 50
#: Products of the deflated run that checks for missed eigenvalues (``verify=True``).
VERIFY_STEPS = 5
#: Columns per block when the basis is combined into Ritz vectors (bounds the temporary).
_COMBINE_CHUNK = 1 << 16

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
    verify: bool | int = True,
    basis_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> Eigenpairs:
    """The k extreme eigenpairs of the symmetric operator ``op`` by thick-restart Lanczos.

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (an estimator, a :class:`~curvlab.DenseOperator`) or
        object with ``num_params``, ``dtype``, ``device`` and ``matvec``.
    k : int, default 10
        Number of eigenpairs.
    which : {"largest", "smallest", "both"}, default "largest"
        Algebraically largest, smallest (most negative first, for indefinite Hessians), or
        ceil(k/2) largest and floor(k/2) smallest.
    tol : float, default 1e-6
        Residual tolerance relative to ||A||_2: every returned pair has
        ||A x - lambda x|| <= tol ||A||_2, so each eigenvalue is within tol ||A||_2 of one of
        A's, and within about (tol ||A||_2)^2 / gap for an eigenvalue separated by ``gap``
        (about 1e-12 relative for the default and a well separated top eigenvalue in
        float64; about 1e-8 in float32, the products' own accuracy). At least the machine
        epsilon of ``op.dtype`` (1.2e-7 for float32; module docstring).
    max_iter : int, optional
        Matvec budget (default 50 * ncv, at least ncv).
    ncv : int, optional
        Basis size (default max(2k + 1, 20), capped at P; at least k + 2).
    seed : int or torch.Generator, default 0
        Start and restart vectors.
    verify : bool or int, default True
        The check for missed copies of repeated eigenvalues (module docstring): True runs
        ``VERIFY_STEPS`` (5) products of Lanczos on the operator deflated by the converged
        pairs, an int that many (at most ncv), False none.
    basis_dtype : torch.dtype, optional
        dtype of the Lanczos basis. Default: float64 when ``op.dtype`` is a lower precision
        and the float64 basis, (ncv + 1 + k) x P x 8 bytes, fits in a quarter of the
        device's total memory; ``op.dtype`` otherwise.
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every product; its
        ``info`` holds ``n_matvecs`` and ``n_converged``.

    Returns
    -------
    Eigenpairs
        Values in descending order, vectors [P, k] as matching columns (Lanczos: a view of
        contiguous [k, P] rows), residual norms (the Ritz estimates; all in ``op.dtype`` on
        ``op.device``), the matvec count and ``converged`` (every pair meets ``tol`` and
        the verification finished); a :class:`NotConvergedWarning` otherwise. Operators
        with P <= 2 * ncv are solved directly: P matvecs with identity columns and a dense
        ``eigh`` (residuals then measured exactly).

    Warns
    -----
    CurvlabWarning
        Before allocating a basis larger than the device's available memory, and when the
        first product predicts a run above a minute (``curvlab.spectral._budget``).

    References
    ----------
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
    problems", SIAM J. Matrix Anal. Appl. 22 (2000). J. Kuczyński and H. Woźniakowski,
    "Estimating the largest eigenvalue by the power and Lanczos algorithms with a random
    start", SIAM J. Matrix Anal. Appl. 13 (1992).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import eigenpairs
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(100.0, dtype=torch.float64)))
    >>> pairs = eigenpairs(A, k=2, progress=False)
    >>> [round(v, 6) for v in pairs.values.tolist()], pairs.converged
    ([99.0, 98.0], True)
    """
    P = check_operator(op)
    k = check_int("k", k, minimum=1)
    if k > P:
        raise InvalidInputError(f"k={k} exceeds the operator size P={P}")
    check_choice("which", which, WHICH)
    tol = check_positive("tol", tol)
    if tol < torch.finfo(op.dtype).eps:
        raise InvalidInputError(
            f"tol={tol:g} is below the precision of the operator's {op.dtype} products "
            f"({torch.finfo(op.dtype).eps:.2g}), which the residuals are measured through; "
            "use a larger tol or a float64 operator"
        )
    verify_steps = VERIFY_STEPS if verify is True else verify
    if verify_steps is False:
        verify_steps = 0
    else:
        verify_steps = check_int("verify", verify_steps, minimum=0)
    n_top, n_bot = {"largest": (k, 0), "smallest": (0, k), "both": ((k + 1) // 2, k // 2)}[which]
    if ncv is None:
        ncv = max(2 * k + 1, 20)
    else:
        ncv = check_int("ncv", ncv, minimum=k + 2)
    ncv = min(ncv, P)
    if max_iter is None:
        max_iter = MAX_ITER_FACTOR * ncv
    else:
        max_iter = check_int("max_iter", max_iter, minimum=ncv)
    rows = ncv + 1 + (k if verify_steps else 0)
    dtype = _basis_dtype(op, rows, basis_dtype)
    with Progress("eigenpairs", None, progress=progress, callback=callback) as bar:
        if P <= DENSE_FACTOR * ncv:
            warn_if_over_memory(
                f"eigenpairs(k={k}, ncv={ncv}): the dense {P} x {P} matrix (P <= 2 ncv)",
                2 * P * P * element_size(dtype),
                op.device,
                "lower k or ncv",
            )
            return _dense_eigenpairs(op, n_top, n_bot, ncv, dtype, bar)
        warn_if_over_memory(
            f"eigenpairs(k={k}, ncv={ncv}): the Lanczos basis ({rows} x {P} {dtype})",
            rows * P * element_size(dtype),
            op.device,
            "lower ncv or k, or pass basis_dtype=op.dtype",
        )
        gen = make_generator(seed, op.device)
        solver = _ThickRestartLanczos(
            op, n_top, n_bot, float(tol), max_iter, ncv, gen, verify_steps, dtype, bar
        )
        return solver.run()


def _basis_dtype(op, rows: int, requested: torch.dtype | None) -> torch.dtype:
    """The memory rule of the module docstring (float64 when it fits, else ``op.dtype``)."""
    if requested is not None:
        if not isinstance(requested, torch.dtype) or not requested.is_floating_point:
            raise InvalidInputError(f"basis_dtype must be a float dtype, got {requested!r}")
        return requested
    if op.dtype == _F64 or not op.dtype.is_floating_point:
        return op.dtype
    return _F64 if fits_budget(rows * op.num_params * 8, op.device) else op.dtype


def _dense_eigenpairs(op, n_top: int, n_bot: int, chunk: int, dtype, bar) -> Eigenpairs:
    """Assemble A from P identity columns, solve with ``eigh``; exact residuals."""
    P = op.num_params
    blocks = []
    for _, cols in column_blocks(op, chunk):
        blocks.append(cols.to(dtype))
        bar.update(cols.shape[1], n_matvecs=sum(b.shape[1] for b in blocks), n_converged=0)
    A = torch.cat(blocks, dim=1)
    evals, evecs = torch.linalg.eigh((A + A.T) / 2)
    idx = torch.cat([torch.arange(P - 1, P - 1 - n_top, -1), torch.arange(n_bot - 1, -1, -1)])
    idx = idx.to(evals.device)
    values, vectors = evals[idx], evecs[:, idx]
    residuals = (A @ vectors - vectors * values).norm(dim=0)
    return Eigenpairs(
        values.to(op.dtype), vectors.to(op.dtype), residuals.to(op.dtype), P, converged=True
    )


class _ThickRestartLanczos:
    """State of one run: active basis rows V, projected T, locked pairs and their couplings."""

    def __init__(self, op, n_top, n_bot, tol, max_iter, ncv, gen, verify_steps, dtype, bar):
        self.op, self.n_top, self.n_bot, self.tol = op, n_top, n_bot, tol
        self.max_iter, self.m, self.gen = max_iter, ncv, gen
        self.verify_steps = min(verify_steps, ncv)
        self.dtype, self.bar = dtype, bar
        P, dev = op.num_params, op.device
        self.V = _new_basis(ncv + 1, P, dtype, dev)
        # Locked rows live in their own [k, P] allocation (grown only after a missed
        # eigenvalue), so the result can hand them out without a copy.
        self.X_buf = torch.empty(n_top + n_bot if verify_steps else 0, P, dtype=dtype, device=dev)
        self.T = torch.zeros(ncv, ncv, dtype=_F64)
        # Locked pairs (rows X, theta_lock) and, per locking event e, the dropped residual
        # direction r_e (rows of R), ||b_e||^2, and G[e, i] = r_e . V[i] for the active basis.
        self.X = self.X_buf[:0]
        self.theta_lock = torch.zeros(0, dtype=_F64)
        self.res_lock = torch.zeros(0, dtype=_F64)
        self.R = torch.zeros(0, P, dtype=dtype, device=dev)
        self.bnorm2 = torch.zeros(0, dtype=_F64)
        self.G = torch.zeros(0, ncv + 1, dtype=_F64)
        self.scale = 0.0
        self.beta = 0.0
        self.j = 0
        self.n_matvecs = 0
        self.n_converged = 0
        self.product = TimedProducts(
            self._product,
            "eigenpairs",
            min(ncv, max_iter),
            "lower k, loosen tol or use a cheaper curvature",
        )

    # ------------------------------------------------------------------ basis building
    def _product(self, v: torch.Tensor) -> torch.Tensor:
        w = apply(self.op, v.to(self.op.dtype))
        self.n_matvecs += 1
        self.bar.update(1, n_matvecs=self.n_matvecs, n_converged=self.n_converged)
        return w

    def _random_orthogonal(self, row: int) -> None:
        """V[row] = a random unit vector orthogonal to the locked X and to V[:row]."""
        g = self.V[row]
        # float32 normals: several times faster to draw than float64 ones, equally random
        g.copy_(gaussian(g.shape, generator=self.gen, dtype=torch.float32, device=g.device))
        cgs2_(g, self.X, self.V[:row])
        g /= g.norm()

    def _update_couplings(self, row: int) -> None:
        if self.R.shape[0]:
            self.G[:, row] = torch.mv(self.R, self.V[row]).to(device="cpu", dtype=_F64)

    def _start_fresh(self) -> None:
        self.T.zero_()
        self.j, self.beta = 0, 0.0
        self._random_orthogonal(0)
        self._update_couplings(0)

    def _step(self) -> None:
        """One Lanczos step: A v_j, full reorthogonalization, next basis row."""
        j = self.j
        w = self.V[j + 1]
        w.copy_(self.product(self.V[j]))
        hx, h = cgs2_(w, self.X, self.V[: j + 1])
        h = h.to(device="cpu", dtype=_F64)
        self.T[: j + 1, j] = h
        self.T[j, : j + 1] = h
        beta = float(w.norm())
        # ||A v_j||^2 = ||X^T A v_j||^2 + ||h||^2 + beta^2 (orthonormal rows): no extra pass
        norm2 = float(hx.double().square().sum()) + float(h.square().sum()) + beta**2
        self.scale = max(self.scale, norm2**0.5)
        if beta <= breakdown_threshold(self.op.dtype, self.scale):
            # Invariant subspace: continue from a random vector orthogonal to everything.
            self._random_orthogonal(j + 1)
            beta = 0.0
        else:
            w /= beta
        self._update_couplings(j + 1)
        self.beta = beta
        self.j = j + 1

    # ------------------------------------------------------------------ Ritz analysis
    def _ritz(self):
        j = self.j
        theta, S = torch.linalg.eigh(self.T[:j, :j])
        S = S.contiguous()  # eigh returns column-major; matmuls with its slices are slow
        res2 = (self.beta * S[j - 1]) ** 2
        if self.R.shape[0]:
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

    def _missed(self, theta: torch.Tensor) -> bool:
        """Whether the deflated run shows a Ritz value beyond the locked wanted range by more
        than the tolerance: proof (Courant–Fischer) of an eigenvalue the locked set lacks."""
        margin = self.tol * self.scale
        locked = torch.sort(self.theta_lock, descending=True).values
        top = self.n_top and float(theta[-1]) > float(locked[self.n_top - 1]) + margin
        bot = self.n_bot and float(theta[0]) < float(locked[len(locked) - self.n_bot]) - margin
        return bool(top or bot)

    # ------------------------------------------------------------------ restarts
    def _restart(self, theta, S, top_active: int, bot_active: int) -> None:
        """Keep the wanted Ritz vectors plus half the spare room from the same ends."""
        m = self.m
        extra = (m - top_active - bot_active) // 2
        if self.n_top and self.n_bot:
            e_top, e_bot = extra - extra // 2, extra // 2
        elif self.n_top:
            e_top, e_bot = extra, 0
        else:
            e_top, e_bot = 0, extra
        n_up, n_down = top_active + e_top, bot_active + e_bot
        keep = torch.cat([torch.arange(n_down), torch.arange(m - n_up, m)])
        Sk = S[:, keep]
        l = len(keep)
        _combine(Sk, self.V[:m], out=self.V[:l])
        self.V[l] = self.V[m]
        if self.R.shape[0]:
            self.G[:, :l] = self.G[:, :m] @ Sk
            self.G[:, l] = self.G[:, m]
        self.T.zero_()
        self.T[:l, :l] = torch.diag(theta[keep])
        self.j = l

    def _lock(self, idx, theta, S, res) -> None:
        """Move active Ritz pairs idx to the locked set; remember their dropped coupling."""
        j, nl, n = self.j, self.X.shape[0], len(idx)
        if nl + n > self.X_buf.shape[0]:  # a missed eigenvalue: grow the locked rows
            grown = torch.empty(nl + n, self.op.num_params, dtype=self.dtype, device=self.V.device)
            grown[:nl] = self.X
            self.X_buf = grown
        _combine(S[:, idx], self.V[:j], out=self.X_buf[nl : nl + n])
        self.X = self.X_buf[: nl + n]
        self.theta_lock = torch.cat([self.theta_lock, theta[idx]])
        self.res_lock = torch.cat([self.res_lock, res[idx]])
        self.n_converged = self.X.shape[0]
        if self.beta > 0:
            b = self.beta * S[j - 1, idx]
            self.R = torch.cat([self.R, self.V[j : j + 1].clone()])
            self.bnorm2 = torch.cat([self.bnorm2, (b**2).sum().reshape(1)])
            self.G = torch.cat([self.G, torch.zeros(1, self.m + 1, dtype=_F64)])

    def _result(self, wanted, theta, S, res, converged: bool) -> Eigenpairs:
        nl = self.X.shape[0]
        locked = wanted[wanted < nl]
        active = wanted[wanted >= nl] - nl
        dt, dev = self.op.dtype, self.op.device
        values = torch.cat([self.theta_lock[locked], theta[active]])
        residuals = torch.cat([self.res_lock[locked], res[active]])
        order = torch.argsort(values, descending=True, stable=True)
        if not len(active) and torch.equal(locked[order], torch.arange(nl)):
            rows = self.X.to(dt)  # every locked row, in order: no copy when dtypes agree
        elif not len(locked):
            rows = _combine(S[:, active[order]], self.V[: self.j], dtype=dt)
        else:
            rows = torch.cat([self.X[locked.to(dev)], _combine(S[:, active], self.V[: self.j])])
            rows = rows[order.to(dev)].to(dt)
        if not converged:
            worst = float(residuals.max() / max(self.scale, torch.finfo(dt).tiny))
            warnings.warn(
                NotConvergedWarning(
                    f"Lanczos reached max_iter={self.max_iter} matvecs before converging or "
                    f"finishing its verification (worst relative residual {worst:.2e}, "
                    f"tol={self.tol:g}); raise max_iter or ncv"
                ),
                stacklevel=4,
            )
        return Eigenpairs(
            values=values[order].to(dtype=dt, device=dev),
            vectors=rows.T,
            residuals=residuals[order].to(dtype=dt, device=dev),
            n_matvecs=self.n_matvecs,
            converged=converged,
        )

    # ------------------------------------------------------------------ driver
    def run(self) -> Eigenpairs:
        k = self.n_top + self.n_bot
        stride = max(1, self.m // 32)
        phase = 0  # 0: the first run; then one deflated run per locking
        self._start_fresh()
        while True:
            self._step()
            full = self.j == self.m
            exhausted = self.n_matvecs >= self.max_iter
            nl = self.X.shape[0]
            if phase and self.j < self.verify_steps and not (full or exhausted):
                continue
            if nl + self.j < k or not (full or exhausted or self.j % stride == 0 or phase):
                continue
            theta, S, res = self._ritz()
            if phase and not self._missed(theta):
                # No Ritz value of the deflated run beyond the locked range: accept those.
                wanted = torch.cat(self._wanted(theta[:0]))
                finished = self.j >= self.verify_steps
                return self._result(wanted, theta, S, res, converged=finished)
            top, bot = self._wanted(theta)
            wanted = torch.cat([top, bot])
            active = wanted[wanted >= nl] - nl
            conv = res <= self.tol * self.scale
            done = bool(conv[active].all())
            if done and self.verify_steps:
                if exhausted:
                    return self._result(wanted, theta, S, res, converged=False)
                self._lock(active, theta, S, res)
                phase += 1
                self._start_fresh()
                continue
            self.n_converged = nl + int(conv[active].sum())
            if done or exhausted:
                return self._result(wanted, theta, S, res, converged=done)
            if full:
                self._restart(theta, S, int((top >= nl).sum()), int((bot >= nl).sum()))


def _combine(
    S: torch.Tensor, V: torch.Tensor, out: torch.Tensor | None = None, dtype=None
) -> torch.Tensor:
    """S^T V for small float64 S [j, l] on the CPU and basis rows V [j, P], computed in column
    blocks (bounded temporary; ``out`` may overlap V: each block is read before written).
    A new result is in ``dtype`` (default V's)."""
    S = S.T.contiguous().to(dtype=V.dtype, device=V.device)
    if out is None:
        out = torch.empty(S.shape[0], V.shape[1], dtype=dtype or V.dtype, device=V.device)
    for start in range(0, V.shape[1], _COMBINE_CHUNK):
        block = slice(start, start + _COMBINE_CHUNK)
        out[:, block] = S @ V[:, block]
    return out


def _new_basis(nrows: int, P: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The Lanczos basis storage, [ncv + 1, P] rows (one allocation per run; every row is
    written before it is read)."""
    return torch.empty(nrows, P, dtype=dtype, device=device)
