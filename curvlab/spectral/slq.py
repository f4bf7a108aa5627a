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
probe has exactly ``n_steps`` nodes.
"""

from __future__ import annotations

import math

import torch

from curvlab._random import Seed, gaussian, make_generator, rademacher
from curvlab.errors import InvalidInputError
from curvlab.results import SpectralDensity
from curvlab.spectral._krylov import apply, breakdown_threshold, check_operator, check_positive_int

#: The log-scale density covers eigenvalues within this many decades below the largest node.
LOG_DECADES = 6.0

_F64 = torch.float64


def lanczos_tridiagonal(
    op, v0: torch.Tensor, n_steps: int, *, return_basis: bool = False, seed: Seed = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lanczos tridiagonalization from ``v0`` ([P], or [P, b] for b independent runs).

    Returns ``(alpha, beta, Q)``: the diagonal [n] and off-diagonal [n - 1] of T (float64 on
    the CPU; [b, n] and [b, n - 1] for a block of starts), and the orthonormal basis
    [P, n] (or [P, n, b]) in ``op.dtype`` on ``op.device`` when ``return_basis`` else None.
    ``n = min(n_steps, P)``. Each run is normalized first; products of a block go to the
    operator together. Full reorthogonalization; breakdowns continue from a random vector
    (seeded by ``seed``) with beta = 0.
    """
    P = check_operator(op)
    check_positive_int("n_steps", n_steps)
    if not isinstance(v0, torch.Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != P:
        raise InvalidInputError(
            f"v0 must have shape [{P}] or [{P}, b], got {getattr(v0, 'shape', v0)}"
        )
    single = v0.ndim == 1
    q = (v0[:, None] if single else v0).to(dtype=op.dtype, device=op.device)
    norms = q.norm(dim=0)
    if not bool((norms > 0).all()):
        raise InvalidInputError("every start vector must be nonzero")
    q = q / norms
    n, b = min(n_steps, P), q.shape[1]
    gen = make_generator(seed, op.device)
    Q = torch.zeros(b, n, P, dtype=op.dtype, device=op.device)  # per run, rows = basis
    alpha = torch.zeros(b, n, dtype=_F64)
    beta = torch.zeros(b, max(n - 1, 0), dtype=_F64)
    scale = torch.zeros(b, dtype=op.dtype, device=op.device)
    for j in range(n):
        Q[:, j] = q.T
        w = apply(op, q).T.contiguous()  # [b, P]
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
    basis = Q.permute(2, 1, 0) if return_basis else None  # [P, n, b]
    if single:
        return alpha[0], beta[0], None if basis is None else basis[:, :, 0]
    return alpha, beta, basis


def _cgs2_block(w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram–Schmidt twice of each row w[c] ([b, P]) against its basis Q[c] ([b, j, P])."""
    total = torch.zeros(Q.shape[0], Q.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = torch.bmm(Q, w[:, :, None])[:, :, 0]
        w = w - torch.bmm(c[:, None, :], Q)[:, 0, :]
        total += c
    return w, total


def quadrature(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes (eigenvalues of T) and weights (squared first components)."""
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    nodes, U = torch.linalg.eigh(T)
    return nodes, U[..., 0, :] ** 2


def gaussian_density(
    points: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """mean over rows of sum_i w_i N(x; points_i, sigma^2) on ``grid`` (rows = probes)."""
    pts, wts = points.reshape(-1), weights.reshape(-1) / points.shape[0]
    out = torch.zeros_like(grid)
    for chunk in range(0, pts.numel(), 4096):
        z = (grid[:, None] - pts[None, chunk : chunk + 4096]) / sigma
        out += (torch.exp(-0.5 * z**2) * wts[None, chunk : chunk + 4096]).sum(1)
    return out / (sigma * math.sqrt(2 * math.pi))


def spectral_density(
    op,
    *,
    n_probes: int = 10,
    n_steps: int = 80,
    seed: Seed = 0,
    grid_size: int = 1000,
    sigma: float | None = None,
    log_grid: bool = True,
    probe_batch: int | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density of ``op`` (module docstring).

    Parameters
    ----------
    n_probes : Rademacher probes (normalized to unit length).
    n_steps : Lanczos steps per probe (capped at P); ``n_matvecs = n_probes * n_steps``.
    seed : probes and breakdown restarts.
    grid_size : points of the linear grid, spanning [min node - 3 sigma, max node + 3 sigma].
    sigma : Gaussian broadening of each node; default pi / (2 n_steps) x (max - min node),
        the centre node spacing of an n_steps-point Gauss–Chebyshev rule on that range, so
        the density does not ripple between nodes (max |node|, or 1, replaces the range when
        all nodes coincide).
    log_grid : also return the density of t = log10(lambda) over the positive part of the
        spectrum: nodes theta > max node x 10^-LOG_DECADES, each broadened in t by
        pi / (2 n_steps) x (their t-range) (0.01 decade if that range is 0), keeping the
        quadrature weights, so it integrates (over t) to the fraction of the spectrum above
        that floor. ``log_grid``/``log_density`` are None when no node is positive.
    probe_batch : probes run together (one [P, batch] matvec per step); default all.
        Memory is P x n_steps x probe_batch.

    Returns :class:`~curvlab.SpectralDensity`; nodes/weights [n_probes, n_steps] and the grids
    and densities are float64 on the CPU.
    """
    P = check_operator(op)
    check_positive_int("n_probes", n_probes)
    check_positive_int("n_steps", n_steps)
    check_positive_int("grid_size", grid_size, 2)
    if sigma is not None and not (
        isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0
    ):
        raise InvalidInputError(f"sigma must be a positive number or None, got {sigma!r}")
    batch = n_probes if probe_batch is None else check_positive_int("probe_batch", probe_batch)
    gen = make_generator(seed, op.device)
    probes = rademacher((P, n_probes), generator=gen, dtype=op.dtype, device=op.device)
    nodes, weights = [], []
    for start in range(0, n_probes, batch):
        alpha, beta, _ = lanczos_tridiagonal(
            op, probes[:, start : start + batch], n_steps, seed=gen
        )
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
