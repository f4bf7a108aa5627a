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
from curvlab.errors import InvalidInputError
from curvlab.progress import Callback
from curvlab.spectral._budget import element_size, warn_if_over_memory
from curvlab.spectral._krylov import (
    PRODUCT_BLOCK,
    Products,
    check_operator,
    check_positive_int,
    column_blocks,
)

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
    torch.Tensor
        The estimate [P] (no standard error: see the accuracy above).

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
    >>> d = diagonal(A, method="hutchinson", n_matvecs=4, progress=False)
    >>> bool(torch.allclose(d, torch.arange(1.0, 201.0, dtype=torch.float64)))  # z * z = 1
    True
    """
    P = check_operator(op)
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {METHODS}, got {method!r}")
    check_positive_int("n_matvecs", n_matvecs, 2 if method == "xdiag" else 1)
    planned = P if n_matvecs >= P else n_matvecs - (n_matvecs % 2 if method == "xdiag" else 0)
    fix = "lower n_matvecs"
    with Products(op, "diagonal", planned, fix, progress, callback) as product:
        if n_matvecs >= P:
            return _exact_diagonal(op, product)
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
            total = torch.zeros(P, dtype=op.dtype, device=op.device)
            for start in range(0, n_matvecs, PRODUCT_BLOCK):
                width = min(PRODUCT_BLOCK, n_matvecs - start)
                Z = rademacher((P, width), generator=gen, dtype=op.dtype, device=op.device)
                total += (Z * product(Z)).sum(1)
            return total / n_matvecs
        return _xdiag(op, n_matvecs // 2, gen, product)


def _xdiag(op, s: int, gen: torch.Generator, product) -> torch.Tensor:
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
    d = (Q * Z).sum(1) + (hutch.sum(1) - (QS * ZS).sum(1)) / s
    return d - shift


def _exact_diagonal(op, product) -> torch.Tensor:
    blocks = column_blocks(op, product=product)
    return torch.cat([torch.diagonal(cols[i : i + cols.shape[1]]) for i, cols in blocks])
