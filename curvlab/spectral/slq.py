"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIMAX 38, 2017).

For a unit probe u, m Lanczos steps from u give a tridiagonal T_m = U diag(theta) U^T and the
m-node Gauss quadrature u^T f(A) u ~ sum_i tau_i^2 f(theta_i), tau_i = U[0, i] (exact for
polynomials of degree < 2m). With u = z / sqrt(P), z Rademacher, E[u^T f(A) u] = Tr f(A) / P,
so averaging the probes' measures sum_i tau_i^2 delta(x - theta_i) estimates the spectral
density. The first two moments are exact per probe: sum tau^2 theta = u^T A u and
sum tau^2 theta^2 = ||A u||^2 (the Hutchinson estimates of Tr A / P and Tr A^2 / P).

The Lanczos runs use full reorthogonalization (classical Gram–Schmidt twice); on breakdown
(an invariant Krylov space, e.g. a low-rank A) the run continues from a random vector
orthogonal to the basis with a zero coupling, whose nodes then get zero weight, so every
probe has exactly ``n_steps`` nodes. Each run's basis is kept as n_steps contiguous rows of
size P; probes run together share one [P, batch] product per step.
"""

from __future__ import annotations

import math

import torch

from curvlab._random import Seed, gaussian, make_generator, rademacher
from curvlab.errors import InvalidInputError
from curvlab.progress import Callback, Progress
from curvlab.results import SpectralDensity
from curvlab.spectral._budget import (
    TimedProducts,
    element_size,
    fits_budget,
    warn_if_over_memory,
)
from curvlab.spectral._krylov import apply, breakdown_threshold, check_operator
from curvlab.validation import check_int, check_optional, check_positive

#: The log-scale density covers eigenvalues within this many decades below the largest node.
LOG_DECADES = 6.0

_F64 = torch.float64


def lanczos_tridiagonal(
    op, v0: torch.Tensor, n_steps: int, *, return_basis: bool = False, seed: Seed = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lanczos tridiagonalization from ``v0`` ([P], or [P, b] for b independent runs).

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (symmetric).
    v0 : torch.Tensor
        Start vector [P] or b start vectors [P, b] (each normalized first; nonzero).
    n_steps : int
        Lanczos steps (capped at P).
    return_basis : bool, default False
        Also return the orthonormal basis.
    seed : int or torch.Generator, default 0
        Random restarts after a breakdown.

    Returns
    -------
    alpha, beta, Q
        The diagonal [n] and off-diagonal [n - 1] of T (float64 on the CPU; [b, n] and
        [b, n - 1] for a block of starts), and the orthonormal basis [P, n] (or [P, n, b])
        in ``op.dtype`` on ``op.device`` when ``return_basis`` else None. ``n = min(n_steps,
        P)``. Products of a block go to the operator together. Full reorthogonalization;
        breakdowns continue from a random vector (seeded by ``seed``) with beta = 0.

    References
    ----------
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
    S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import lanczos_tridiagonal
    >>> A = curvlab.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    >>> alpha, beta, _ = lanczos_tridiagonal(A, torch.ones(3, dtype=torch.float64), 3)
    >>> round(float(alpha.sum()), 12)  # Tr T = Tr A when the Krylov space is everything
    6.0
    """
    P = check_operator(op)
    n_steps = check_int("n_steps", n_steps, minimum=1)
    if not isinstance(v0, torch.Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != P:
        raise InvalidInputError(
            f"v0 must have shape [{P}] or [{P}, b], got {getattr(v0, 'shape', v0)}"
        )
    single = v0.ndim == 1
    q = (v0[:, None] if single else v0).to(dtype=op.dtype, device=op.device)
    if not bool((q.norm(dim=0) > 0).all()):
        raise InvalidInputError("every start vector must be nonzero")
    gen = make_generator(seed, op.device)
    alpha, beta, Q = _tridiagonalize(op, q, min(n_steps, P), gen, lambda v: apply(op, v))
    basis = Q.permute(2, 1, 0) if return_basis else None  # [P, n, b]
    if single:
        return alpha[0], beta[0], None if basis is None else basis[:, :, 0]
    return alpha, beta, basis


def _tridiagonalize(op, q: torch.Tensor, n: int, gen: torch.Generator, product):
    """Lanczos on the b columns of ``q`` ([P, b], nonzero) for n steps, ``product`` for
    the products; returns alpha [b, n], beta [b, n - 1] and the bases [b, n, P]."""
    P, b = q.shape
    q = q / q.norm(dim=0)
    Q = torch.empty(b, n, P, dtype=op.dtype, device=op.device)  # per run, rows = basis
    alpha = torch.zeros(b, n, dtype=_F64)
    beta = torch.zeros(b, max(n - 1, 0), dtype=_F64)
    scale = torch.zeros(b, dtype=op.dtype, device=op.device)
    for j in range(n):
        Q[:, j] = q.T
        w = product(q).T.contiguous()  # [b, P]
        scale = torch.maximum(scale, w.norm(dim=1))
        w, coeff = _cgs2_block(w, Q[:, : j + 1])
        alpha[:, j] = coeff[:, j].to(device="cpu", dtype=_F64)
        if j == n - 1:
            break
        bnorm = w.norm(dim=1)
        broken = bnorm <= breakdown_threshold(op.dtype, 1.0) * scale
        if bool(broken.any()):
            nb = int(broken.sum())
            fresh = gaussian((nb, P), generator=gen, dtype=op.dtype, device=op.device)
            w[broken], _ = _cgs2_block(fresh, Q[broken, : j + 1])
            bnorm = torch.where(broken, torch.zeros_like(bnorm), bnorm)
        beta[:, j] = bnorm.to(device="cpu", dtype=_F64)
        q = (w / w.norm(dim=1, keepdim=True)).T.contiguous()
    return alpha, beta, Q


def _cgs2_block(w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram–Schmidt twice of each row w[c] ([b, P]) against its basis Q[c] ([b, j, P])."""
    total = torch.zeros(Q.shape[0], Q.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = torch.bmm(Q, w[:, :, None])[:, :, 0]
        w = w - torch.bmm(c[:, None, :], Q)[:, 0, :]
        total += c
    return w, total


def quadrature(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes (eigenvalues of T) and weights (squared first components).

    Parameters
    ----------
    alpha : torch.Tensor
        [..., n] diagonal of the Lanczos tridiagonal T.
    beta : torch.Tensor
        [..., n - 1] its off-diagonal.

    Returns
    -------
    tuple of torch.Tensor
        nodes [..., n] (ascending) and weights [..., n] (each row summing to one).

    References
    ----------
    G. H. Golub and J. H. Welsch, "Calculation of Gauss quadrature rules", Math. Comp. 23
    (1969).

    Examples
    --------
    >>> import torch
    >>> from curvlab.spectral.slq import quadrature
    >>> nodes, weights = quadrature(torch.tensor([0.0, 0.0]), torch.tensor([1.0]))
    >>> nodes, weights
    (tensor([-1.,  1.]), tensor([0.5000, 0.5000]))
    """
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    nodes, U = torch.linalg.eigh(T)
    return nodes, U[..., 0, :] ** 2


def gaussian_density(
    points: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """mean over rows of sum_i w_i N(x; points_i, sigma^2) on ``grid`` (rows = probes).

    Parameters
    ----------
    points : torch.Tensor
        [n_probes, n] quadrature nodes.
    weights : torch.Tensor
        [n_probes, n] their weights.
    grid : torch.Tensor
        [m] evaluation points.
    sigma : float
        Gaussian broadening, > 0.

    Returns
    -------
    torch.Tensor
        [m] the broadened density on ``grid``.

    Examples
    --------
    >>> import torch
    >>> from curvlab.spectral.slq import gaussian_density
    >>> d = gaussian_density(torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0.0]), 1.0)
    >>> round(float(d), 4)  # 1 / sqrt(2 pi)
    0.3989
    """
    pts, wts = points.reshape(-1), weights.reshape(-1) / points.shape[0]
    out = torch.zeros_like(grid)
    for chunk in range(0, pts.numel(), 4096):
        z = (grid[:, None] - pts[None, chunk : chunk + 4096]) / sigma
        out += (torch.exp(-0.5 * z**2) * wts[None, chunk : chunk + 4096]).sum(1)
    return out / (sigma * math.sqrt(2 * math.pi))


def spectral_density(
    op,
    *,
    n_probes: int = 4,
    n_steps: int = 40,
    seed: Seed = 0,
    grid_size: int = 1000,
    sigma: float | None = None,
    log_grid: bool = True,
    probe_batch: int | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density of ``op`` (module docstring).

    Parameters
    ----------
    op : Operator
        Any :class:`~curvlab.Operator` (symmetric).
    n_probes : int, default 4
        Rademacher probes (normalized to unit length). Each probe's quadrature estimates
        P^-1 Tr f(A) with variance at most 2 ||f(A)||_F^2 / P^2, so the mass the density
        puts on a part of the spectrum holding a fraction p of the eigenvalues has standard
        error about sqrt(2 p / (P n_probes)): 0.002 for p = 0.1 at P = 10^4 and the default.
    n_steps : int, default 40
        Lanczos steps per probe (capped at P); ``n_matvecs = n_probes * n_steps``. The
        quadrature is exact for polynomials of degree < 2 n_steps, and outliers separated
        from the bulk appear as single nodes; the default resolves features down to the
        broadening sigma = pi / 80, about 4% of the spectral range.
    seed : int or torch.Generator, default 0
        Probes and breakdown restarts.
    grid_size : int, default 1000
        Points of the linear grid, spanning [min node - 3 sigma, max node + 3 sigma].
    sigma : float, optional
        Gaussian broadening of each node; default pi / (2 n_steps) x (max - min node),
        the centre node spacing of an n_steps-point Gauss–Chebyshev rule on that range, so
        the density does not ripple between nodes (max |node|, or 1, replaces the range when
        all nodes coincide).
    log_grid : bool, default True
        Also return the density of t = log10(lambda) over the positive part of the
        spectrum: nodes theta > max node x 10^-LOG_DECADES, each broadened in t by
        pi / (2 n_steps) x (their t-range) (0.01 decade if that range is 0), keeping the
        quadrature weights, so it integrates (over t) to the fraction of the spectrum above
        that floor. ``log_grid``/``log_density`` are None when no node is positive.
    probe_batch : int, optional
        Probes run together (one [P, batch] product per step); their bases take
        P x n_steps x batch numbers. Default: all probes when that fits in a quarter of
        the device's total memory, else as many as fit (at least one).
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every Lanczos step;
        ``info["n_matvecs"]`` counts the products.

    Returns
    -------
    SpectralDensity
        nodes/weights [n_probes, n_steps], the grids and densities, float64 on the CPU.

    Warns
    -----
    CurvlabWarning
        When the bases exceed the available memory, or the first product predicts a run
        above a minute.

    References
    ----------
    S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.spectral import spectral_density
    >>> A = curvlab.DenseOperator(torch.diag(torch.linspace(0, 1, 500, dtype=torch.float64)))
    >>> sd = spectral_density(A, progress=False)
    >>> sd.nodes.shape, sd.n_matvecs, round(sd.integrate(lambda x: x), 2)  # mean eigenvalue
    (torch.Size([4, 40]), 160, 0.5)
    """
    P = check_operator(op)
    n_probes = check_int("n_probes", n_probes, minimum=1)
    n_steps = check_int("n_steps", n_steps, minimum=1)
    grid_size = check_int("grid_size", grid_size, minimum=2)
    sigma = check_optional(check_positive, "sigma", sigma, fix="or None for the default")
    n = min(n_steps, P)
    per_probe = n * P * element_size(op.dtype)
    if probe_batch is None:
        batch = n_probes
        while batch > 1 and not fits_budget(batch * per_probe, op.device):
            batch -= 1
    else:
        batch = check_int("probe_batch", probe_batch, minimum=1)
    batch = min(batch, n_probes)
    warn_if_over_memory(
        f"spectral_density(n_steps={n_steps}, probe_batch={batch}): Lanczos bases of "
        f"{batch} x {n} x {P}",
        batch * per_probe,
        op.device,
        "lower n_steps or probe_batch",
    )
    gen = make_generator(seed, op.device)
    probes = rademacher((P, n_probes), generator=gen, dtype=op.dtype, device=op.device)
    nodes, weights = [], []
    total = n_probes * n
    with Progress("spectral_density", total, progress=progress, callback=callback) as bar:
        done = [0]

        def step(v: torch.Tensor) -> torch.Tensor:
            out = apply(op, v)
            done[0] += v.shape[1]
            bar.update(v.shape[1], n_matvecs=done[0])
            return out

        product = TimedProducts(step, "spectral_density", total, "lower n_probes or n_steps")
        for start in range(0, n_probes, batch):
            alpha, beta, _ = _tridiagonalize(op, probes[:, start : start + batch], n, gen, product)
            th, w = quadrature(alpha, beta)
            nodes.append(th)
            weights.append(w)
    nodes, weights = torch.cat(nodes), torch.cat(weights)
    n_matvecs = n_probes * nodes.shape[1]

    fraction = math.pi / (2 * nodes.shape[1])
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        span = hi - lo if hi > lo else max(abs(lo), abs(hi)) or 1.0
        sigma = fraction * span
    grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, grid_size, dtype=_F64)
    density = gaussian_density(nodes, weights, grid, sigma)

    log_x = log_density = None
    if log_grid and hi > 0:
        keep = nodes > hi * 10.0 ** (-LOG_DECADES)
        t = torch.where(keep, nodes, torch.ones_like(nodes)).log10()
        t_lo, t_hi = float(t[keep].min()), float(t[keep].max())
        log_sigma = fraction * (t_hi - t_lo) if t_hi > t_lo else 0.01
        log_x = torch.linspace(t_lo - 3 * log_sigma, t_hi + 3 * log_sigma, grid_size, dtype=_F64)
        log_density = gaussian_density(t, torch.where(keep, weights, 0.0), log_x, log_sigma)
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
        log_grid=log_x,
        log_density=log_density,
        sigma=float(sigma),
        n_matvecs=n_matvecs,
    )
