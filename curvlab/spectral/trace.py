"""Stochastic trace estimates with standard errors (DESIGN.md section 4).

- Hutchinson (1989): Tr A = E[z^T A z] for Rademacher z; mean of m samples, stderr the sample
  standard deviation / sqrt(m). Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2) <= 2 ||A||_F^2.
- Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with m = 2s + r matvecs, Q = orth(A S)
  for a Gaussian sketch S [P, s], then Tr A = Tr(Q^T A Q) + Tr((I - QQ^T) A (I - QQ^T)):
  the first term exactly (s matvecs), the second by Hutchinson with r Rademacher probes
  deflated by Q. The stderr is that of the deflated Hutchinson part given Q (the sketched
  part has no error given Q). Here s = floor(m / 3), r = m - 2s.
- Tr A^2 = ||A||_F^2 = E||A z||^2 for Rademacher z (each matvec gives one sample), or with
  ``method="hutch++"`` ||A Q||_F^2 + Hutchinson on ||A (I - QQ^T) z||^2.

With n_matvecs >= P the trace is computed exactly from P identity columns (stderr 0).
Products go to the operator in blocks of at most ``PRODUCT_BLOCK`` (16) probes, so memory is
O(P x (2s + 16)) for Hutch++ and O(P x 16) for Hutchinson; the probes are drawn block by
block from the seed.
"""

from __future__ import annotations

import torch

from curvlab._random import Seed, gaussian, make_generator, rademacher
from curvlab.progress import Callback
from curvlab.results import Estimate
from curvlab.spectral._budget import element_size, warn_if_over_memory
from curvlab.spectral._krylov import (
    PRODUCT_BLOCK,
    Products,
    block_widths,
    check_operator,
    column_blocks,
)
from curvlab.validation import check_choice, check_int

METHODS = ("hutch++", "hutchinson")
_FIX = "lower n_matvecs (the standard error grows as 1/sqrt(n_matvecs))"


def trace(
    op,
    *,
    n_matvecs: int = 60,
    method: str = "hutch++",
    seed: Seed = 0,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> Estimate:
    """Estimate Tr A with a standard error.

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (symmetric).
    n_matvecs : int, default 60
        Products to spend (at least 6 for Hutch++, 2 for Hutchinson); exact from P identity
        columns when n_matvecs >= P. The default's accuracy: Hutch++ sketches s = 20
        directions and runs r = 20 deflated probes, so its standard error is at most
        sqrt(2 / 20) ||(I - QQ^T) A (I - QQ^T)||_F, about 0.32 times the Frobenius norm of
        A beyond its top 20 directions (for a Hessian with a few outliers, a small fraction
        of Hutchinson's); Hutchinson's is at most sqrt(2 / 60) ||A||_F = 0.18 ||A||_F.
    method : {"hutch++", "hutchinson"}, default "hutch++"
    seed : int or torch.Generator, default 0
        The sketch and probes.
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
        products; ``info["n_matvecs"]`` counts them.

    Returns
    -------
    Estimate
        ``value``, ``stderr`` (0 when exact), ``n_matvecs`` and ``samples``: the Hutchinson
        samples used (the deflated ones for Hutch++), float64 on the CPU.

    Warns
    -----
    CurvlabWarning
        When the probe blocks exceed the available memory, or the first block of products
        predicts a run above a minute.

    References
    ----------
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18 (1989).
    R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: optimal stochastic trace
    estimation", SOSA (2021).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import trace
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
    >>> est = trace(A, n_matvecs=60, seed=0, progress=False)
    >>> abs(est.value - 5050.0) < 4 * est.stderr, est.n_matvecs
    (True, 60)
    """
    return _estimate(op, n_matvecs, method, seed, False, progress, callback)


def trace_of_square(
    op,
    *,
    n_matvecs: int = 60,
    method: str = "hutchinson",
    seed: Seed = 0,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> Estimate:
    """Estimate Tr A^2 = ||A||_F^2 = E||A z||^2 (Rademacher z) with a standard error.

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (symmetric).
    n_matvecs : int, default 60
        Products to spend (exact from P identity columns when n_matvecs >= P). The default's
        accuracy (Hutchinson): Var ||A z||^2 = 2 (||A^2||_F^2 - sum_i (A^2)_ii^2), so the
        relative standard error is at most sqrt(2 / 60) ||A^2||_F / ||A||_F^2 <= 0.18 (much
        less for a spread-out spectrum: about sqrt(2 / (60 r_eff)) for effective rank r_eff).
    method : {"hutchinson", "hutch++"}, default "hutchinson"
        ``"hutch++"``: ||A Q||_F^2 exactly plus Hutchinson on the deflated probes (better
        when a few directions dominate).
    seed : int or torch.Generator, default 0
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
        products; ``info["n_matvecs"]`` counts them.

    Returns
    -------
    Estimate
        ``value``, ``stderr``, ``n_matvecs`` and the Hutchinson ``samples``.

    Warns
    -----
    CurvlabWarning
        As :func:`trace`.

    References
    ----------
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18 (1989).
    R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: optimal stochastic trace
    estimation", SOSA (2021).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import trace_of_square
    >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64)))
    >>> trace_of_square(A, progress=False).value  # n_matvecs >= P: exact
    25.0
    """
    return _estimate(op, n_matvecs, method, seed, True, progress, callback)


def _estimate(op, n_matvecs, method, seed, square, progress, callback) -> Estimate:
    P = check_operator(op)
    check_choice("method", method, METHODS)
    minimum = 6 if method == "hutch++" else 2
    n_matvecs = check_int("n_matvecs", n_matvecs, minimum=minimum)
    what = "trace_of_square" if square else "trace"
    planned = min(n_matvecs, P)
    with Products(op, what, planned, _FIX, progress, callback) as product:
        if n_matvecs >= P:
            return _exact(op, square, product)
        s = n_matvecs // 3 if method == "hutch++" else 0
        width = 2 * s + min(PRODUCT_BLOCK, n_matvecs)
        warn_if_over_memory(
            f"{what}(n_matvecs={n_matvecs}): {width} probe vectors of size {P}",
            width * P * element_size(op.dtype),
            op.device,
            "lower n_matvecs or use method='hutchinson'",
        )
        gen = make_generator(seed, op.device)
        Q, exact_part = None, 0.0
        if s:
            sketched = [product(_draw(gaussian, P, c, gen, op)) for c in block_widths(s)]
            Q, _ = torch.linalg.qr(torch.cat(sketched, dim=1))
            del sketched
            for start in range(0, s, PRODUCT_BLOCK):
                Qc = Q[:, start : start + PRODUCT_BLOCK]
                AQc = product(Qc)
                exact_part += float((AQc**2).sum() if square else (Qc * AQc).sum())
        samples = []
        for width in block_widths(n_matvecs - 2 * s):
            Z = _draw(rademacher, P, width, gen, op)
            if Q is not None:
                Z = Z - Q @ (Q.T @ Z)
            AZ = product(Z)
            samples.append((AZ**2).sum(0) if square else (Z * AZ).sum(0))
        samples = torch.cat(samples).to(device="cpu", dtype=torch.float64)
    m = samples.numel()
    return Estimate(
        value=exact_part + float(samples.mean()),
        stderr=float(samples.std(correction=1) / m**0.5),
        n_matvecs=2 * s + m,
        samples=samples,
    )


def _draw(draw, P: int, width: int, gen: torch.Generator, op) -> torch.Tensor:
    return draw((P, width), generator=gen, dtype=op.dtype, device=op.device)


def _exact(op, square: bool, product) -> Estimate:
    total = 0.0
    for i, cols in column_blocks(op, product=product):
        block = cols[i : i + cols.shape[1]]
        total += float((cols**2).sum() if square else torch.diagonal(block).sum())
    return Estimate(value=total, stderr=0.0, n_matvecs=op.num_params)
