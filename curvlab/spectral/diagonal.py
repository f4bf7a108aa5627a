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

With n_matvecs >= P the diagonal is computed exactly from P identity columns.
"""

from __future__ import annotations

import torch

from curvlab._random import Seed, make_generator, rademacher
from curvlab.errors import InvalidInputError
from curvlab.spectral._krylov import apply, check_operator, check_positive_int, column_blocks

METHODS = ("xdiag", "hutchinson")


def diagonal(op, *, method: str = "xdiag", n_matvecs: int = 100, seed: Seed = 0) -> torch.Tensor:
    """Estimate diag(A) ([P], ``op.dtype`` on ``op.device``) with ``n_matvecs`` products."""
    P = check_operator(op)
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {METHODS}, got {method!r}")
    check_positive_int("n_matvecs", n_matvecs, 2 if method == "xdiag" else 1)
    if n_matvecs >= P:
        return _exact_diagonal(op)
    gen = make_generator(seed, op.device)
    if method == "hutchinson":
        Z = rademacher((P, n_matvecs), generator=gen, dtype=op.dtype, device=op.device)
        return (Z * apply(op, Z)).mean(1)
    return _xdiag(op, n_matvecs // 2, gen)


def _xdiag(op, s: int, gen: torch.Generator) -> torch.Tensor:
    P = op.num_params
    Om = rademacher((P, s), generator=gen, dtype=op.dtype, device=op.device)
    Y = apply(op, Om)
    Q, R = torch.linalg.qr(Y)
    r_diag = R.diagonal().abs()
    shift = 0.0
    if bool(r_diag.min() <= torch.finfo(op.dtype).eps * s * r_diag.max()):
        shift = float(torch.finfo(op.dtype).eps ** 0.5 * r_diag.max())
        Y = Y + shift * Om
        Q, R = torch.linalg.qr(Y)
    Z = apply(op, Q) + shift * Q
    eye = torch.eye(s, dtype=op.dtype, device=op.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T  # R^-T
    S = S / S.norm(dim=0, keepdim=True)
    QS, ZS = Q @ S, Z @ S
    coupling = (S * R).sum(0)  # s_i^T R[:, i]
    hutch = Om * (Y - Q @ R + QS * coupling)
    d = (Q * Z).sum(1) + (hutch.sum(1) - (QS * ZS).sum(1)) / s
    return d - shift


def _exact_diagonal(op) -> torch.Tensor:
    return torch.cat(
        [torch.diagonal(cols[i : i + cols.shape[1]]) for i, cols in column_blocks(op)]
    )
