"""Stochastic estimates of diag(A) from matvecs, for backends without an exact diagonal.

- Hutchinson (Bekas, Kokiopoulou & Saad, Appl. Numer. Math. 57, 2007):
  diag(A) ~ (1/m) sum_i z_i * (A z_i) for Rademacher z_i (z_i * z_i = 1).
- XDiag (Epperly, Tropp & Webber, SIMAX 45, 2024, section 2.4): with s = floor(m/2)
  Rademacher columns Omega, Y = A Omega = Q R, Z = A Q, and for each i the basis Q_(i) of
  A Omega without column i,
      d = (1/s) sum_i [ diag(Q_(i) Q_(i)^T A) + omega_i * ((I - Q_(i) Q_(i)^T) A omega_i) ],
  evaluated through Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T, s_i the normalized i-th column of
  R^-T. Vectorized:
      d = rowsum(Q * Z) - rowsum((Q S) * (Z S)) / s
          + rowsum(Omega * (Y - Q R + Q S diag(S^T R))) / s.
  It uses 2s matvecs (one more is wasted when m is odd). A numerically rank-deficient Y
  (R with a tiny diagonal, e.g. rank A < s) is handled by running on A + c I,
  c = sqrt(eps) max|R_ii|, and subtracting c (no extra matvecs: (A + cI) Omega = Y + c Omega).

With n_matvecs >= P the diagonal is computed exactly from P identity columns. Products go to
the operator in blocks of at most ``PRODUCT_BLOCK`` (16) columns; XDiag keeps about eight
[P, s] blocks (Omega, Y, Q, Z and products with S) in memory, Hutchinson one [P, 16] block.
"""

from __future__ import annotations

import torch

from curvlab._random import Seed, make_generator, rademacher
from curvlab.progress import Callback
from curvlab.results import DiagonalEstimate
from curvlab.spectral._budget import element_size, warn_if_over_memory
from curvlab.spectral._krylov import (
    PRODUCT_BLOCK,
    Products,
    block_widths,
    check_operator,
    column_blocks,
)
from curvlab.validation import check_choice, check_int

METHODS = ("xdiag", "hutchinson")


def diagonal(
    op,
    *,
    method: str = "xdiag",
    n_matvecs: int = 100,
    seed: Seed = 0,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The estimate of :func:`diagonal_estimate` alone (its ``value``).

    An estimate from ``n_matvecs`` products, exact only when ``n_matvecs >= P``; for the
    exact diagonal of a curvature estimator (the backend's own, or P products) call
    ``op.diagonal()`` instead.

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (symmetric).
    method : {"xdiag", "hutchinson"}, default "xdiag"
        The estimator (see :func:`diagonal_estimate`).
    n_matvecs : int, default 100
        Products to spend.
    seed : int or torch.Generator, default 0
        The probes.
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
        products.

    Returns
    -------
    torch.Tensor
        [P] in ``op.dtype`` on ``op.device``; use :func:`diagonal_estimate` for the
        standard errors.

    References
    ----------
    C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a matrix",
    Appl. Numer. Math. 57 (2007). E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace:
    making the most of every sample in stochastic trace estimation", SIAM J. Matrix Anal.
    Appl. 45 (2024), section 2.4.

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import diagonal
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)))
    >>> diagonal(A, n_matvecs=4, progress=False)  # n_matvecs >= P: exact
    tensor([1., 2., 3., 4.], dtype=torch.float64)
    """
    return diagonal_estimate(
        op, method=method, n_matvecs=n_matvecs, seed=seed, progress=progress, callback=callback
    ).value


def diagonal_estimate(
    op,
    *,
    method: str = "xdiag",
    n_matvecs: int = 100,
    seed: Seed = 0,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> DiagonalEstimate:
    """Estimate diag(A) ([P], ``op.dtype`` on ``op.device``) from ``n_matvecs`` products.

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (symmetric).
    method : {"xdiag", "hutchinson"}, default "xdiag"
    n_matvecs : int, default 100
        Products to spend (at least 2 for XDiag); exact from P identity columns when
        n_matvecs >= P. The default's accuracy: Hutchinson's entry i has standard deviation
        sqrt(sum_{j != i} A_ij^2 / m), a tenth of the off-diagonal row norm at m = 100;
        XDiag is exact on the range of its s = 50 sketched directions and Hutchinson-like
        on the rest, so for a Hessian whose off-diagonal mass sits in a few outlier
        directions its error is several times smaller (tests/test_spectral.py measures 5x
        on a rank-10-plus-noise matrix at m = 60).
    seed : int or torch.Generator, default 0
        The probes.
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
        products; ``info["n_matvecs"]`` counts them.

    Returns
    -------
    DiagonalEstimate
        ``value`` [P] and its entrywise standard error ``stderr`` [P]: the spread of the
        per-probe terms z_i (A z_i) over sqrt(m) for Hutchinson, of XDiag's s exchangeable
        leave-one-out terms over sqrt(s) for XDiag; zero when exact (n_matvecs >= P).

    Warns
    -----
    CurvlabWarning
        When the probe blocks exceed the available memory, or the first block of products
        predicts a run above a minute.

    References
    ----------
    C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a matrix",
    Appl. Numer. Math. 57 (2007). E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace:
    making the most of every sample in stochastic trace estimation", SIAM J. Matrix Anal.
    Appl. 45 (2024), section 2.4.

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import diagonal
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64)))
    >>> d = diagonal_estimate(A, method="hutchinson", n_matvecs=4, progress=False)
    >>> bool(torch.allclose(d.value, torch.arange(1.0, 201.0, dtype=torch.float64)))  # z * z = 1
    True
    >>> float(d.stderr.max())  # every probe gives the same diagonal term
    0.0
    """
    P = check_operator(op)
    check_choice("method", method, METHODS)
    n_matvecs = check_int("n_matvecs", n_matvecs, minimum=2 if method == "xdiag" else 1)
    planned = P if n_matvecs >= P else n_matvecs - (n_matvecs % 2 if method == "xdiag" else 0)
    fix = "lower n_matvecs"
    with Products(op, "diagonal", planned, fix, progress, callback) as product:
        if n_matvecs >= P:
            value = _exact_diagonal(op, product)
            return DiagonalEstimate(value, torch.zeros_like(value), P, "exact")
        # XDiag's peak: Omega, Y, Q, Z, Q S, Z S and temporaries, about 8 [P, s] blocks
        width = 8 * (n_matvecs // 2) if method == "xdiag" else min(PRODUCT_BLOCK, n_matvecs)
        warn_if_over_memory(
            f"diagonal(method={method!r}, n_matvecs={n_matvecs}): {width} vectors of size {P}",
            width * P * element_size(op.dtype),
            op.device,
            "lower n_matvecs or use method='hutchinson'",
        )
        gen = make_generator(seed, op.device)
        if method == "hutchinson":
            terms = _SpreadAccumulator()
            for width in block_widths(n_matvecs):
                Z = rademacher((P, width), generator=gen, dtype=op.dtype, device=op.device)
                terms.add(Z * product(Z))
            return DiagonalEstimate(*terms.mean_and_stderr(), n_matvecs, method)
        T = _xdiag_terms(op, n_matvecs // 2, gen, product)
        s = T.shape[1]
        stderr = T.std(1) / s**0.5 if s > 1 else torch.full_like(T[:, 0], float("nan"))
        return DiagonalEstimate(T.mean(1), stderr, 2 * s, method)


class _SpreadAccumulator:
    """Mean and standard error of per-probe columns added block by block (shifted sums:
    accurate when the diagonal dominates the spread)."""

    def __init__(self):
        self.shift = self.total = self.squares = None
        self.count = 0

    def add(self, block: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = block.mean(1)
            self.total = torch.zeros_like(self.shift)
            self.squares = torch.zeros_like(self.shift)
        centred = block - self.shift[:, None]
        self.total += centred.sum(1)
        self.squares += (centred * centred).sum(1)
        self.count += block.shape[1]

    def mean_and_stderr(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.count
        mean = self.total / m
        if m < 2:
            return self.shift + mean, torch.full_like(mean, float("nan"))
        var = ((self.squares - m * mean * mean) / (m - 1)).clamp_min(0)
        return self.shift + mean, (var / m).sqrt()


def _xdiag_terms(op, s: int, gen: torch.Generator, product) -> torch.Tensor:
    """[P, s]: XDiag's s exchangeable terms, whose mean is the estimate."""
    P = op.num_params
    Om = rademacher((P, s), generator=gen, dtype=op.dtype, device=op.device)
    Y = product(Om)
    Q, R = torch.linalg.qr(Y)
    r_diag = R.diagonal().abs()
    shift = 0.0
    if bool(r_diag.min() <= torch.finfo(op.dtype).eps * s * r_diag.max()):
        shift = float(torch.finfo(op.dtype).eps ** 0.5 * r_diag.max())
        Y = Y + shift * Om
        Q, R = torch.linalg.qr(Y)
    Z = product(Q) + shift * Q
    eye = torch.eye(s, dtype=op.dtype, device=op.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T  # R^-T
    S = S / S.norm(dim=0, keepdim=True)
    QS, ZS = Q @ S, Z @ S
    coupling = (S * R).sum(0)  # s_i^T R[:, i]
    hutch = Om * (Y - Q @ R + QS * coupling)
    return (Q * Z).sum(1, keepdim=True) + hutch - QS * ZS - shift


def _exact_diagonal(op, product) -> torch.Tensor:
    blocks = column_blocks(op, product=product)
    return torch.cat([torch.diagonal(cols[i : i + cols.shape[1]]) for i, cols in blocks])
