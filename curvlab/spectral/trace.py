"""Stochastic trace estimates with standard errors (DESIGN.md section 4).

- Hutchinson (1989): Tr A = E[z^T A z] for Rademacher z; mean of m samples, stderr the sample
  standard deviation / sqrt(m).
- Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with m = 2s + r matvecs, Q = orth(A S)
  for a Gaussian sketch S [P, s], then Tr A = Tr(Q^T A Q) + Tr((I - QQ^T) A (I - QQ^T)):
  the first term exactly (s matvecs), the second by Hutchinson with r Rademacher probes
  deflated by Q. The stderr is that of the deflated Hutchinson part given Q (the sketched
  part has no error given Q). Here s = floor(m / 3), r = m - 2s.
- Tr A^2 = ||A||_F^2 = E||A z||^2 for Rademacher z (each matvec gives one sample), or with
  ``method="hutch++"`` ||A Q||_F^2 + Hutchinson on ||A (I - QQ^T) z||^2.

With n_matvecs >= P the trace is computed exactly from P identity columns (stderr 0).
"""

from __future__ import annotations

import torch

from curvlab._random import Seed, gaussian, make_generator, rademacher
from curvlab.errors import InvalidInputError
from curvlab.results import Estimate
from curvlab.spectral._krylov import apply, check_operator, check_positive_int, column_blocks

METHODS = ("hutch++", "hutchinson")


def trace(op, *, n_matvecs: int = 60, method: str = "hutch++", seed: Seed = 0) -> Estimate:
    """Estimate Tr A with a standard error; ``samples`` holds the Hutchinson samples used."""
    return _estimate(op, n_matvecs, method, seed, square=False)


def trace_of_square(
    op, *, n_matvecs: int = 60, method: str = "hutchinson", seed: Seed = 0
) -> Estimate:
    """Estimate Tr A^2 = E||A z||^2 (Rademacher z) with a standard error."""
    return _estimate(op, n_matvecs, method, seed, square=True)


def _estimate(op, n_matvecs: int, method: str, seed: Seed, square: bool) -> Estimate:
    P = check_operator(op)
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {METHODS}, got {method!r}")
    minimum = 6 if method == "hutch++" else 2
    check_positive_int("n_matvecs", n_matvecs, minimum)
    if n_matvecs >= P:
        return _exact(op, square)
    gen = make_generator(seed, op.device)
    if method == "hutchinson":
        Z = rademacher((P, n_matvecs), generator=gen, dtype=op.dtype, device=op.device)
        return _hutchinson(op, Z, exact_part=0.0, matvecs_before=0, square=square)
    s = n_matvecs // 3
    sketch = gaussian((P, s), generator=gen, dtype=op.dtype, device=op.device)
    Q, _ = torch.linalg.qr(apply(op, sketch))
    AQ = apply(op, Q)
    exact_part = float((AQ**2).sum() if square else (Q * AQ).sum())
    Z = rademacher((P, n_matvecs - 2 * s), generator=gen, dtype=op.dtype, device=op.device)
    Z = Z - Q @ (Q.T @ Z)
    return _hutchinson(op, Z, exact_part, matvecs_before=2 * s, square=square)


def _hutchinson(op, Z, exact_part: float, matvecs_before: int, square: bool) -> Estimate:
    AZ = apply(op, Z)
    samples = (AZ**2).sum(0) if square else (Z * AZ).sum(0)
    samples = samples.to(torch.float64)
    m = samples.numel()
    return Estimate(
        value=exact_part + float(samples.mean()),
        stderr=float(samples.std(correction=1) / m**0.5),
        n_matvecs=matvecs_before + m,
        samples=samples,
    )


def _exact(op, square: bool) -> Estimate:
    total = 0.0
    for i, cols in column_blocks(op):
        block = cols[i : i + cols.shape[1]]
        total += float((cols**2).sum() if square else torch.diagonal(block).sum())
    return Estimate(value=total, stderr=0.0, n_matvecs=op.num_params)
