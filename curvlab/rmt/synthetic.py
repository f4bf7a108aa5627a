"""Synthetic random matrices with known spectra: GOE noise and the paper's spiked Wigner
model (section 4), for tests, experiments and calibration."""

from __future__ import annotations

import math

import numpy as np
import torch

from curvlab._random import Seed, make_generator
from curvlab.errors import InvalidInputError
from curvlab.validation import check_int, check_nonnegative

__all__ = ["goe", "spiked_wigner"]


def goe(
    size: int,
    sigma: float = 1.0,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """X = sigma (G + G^T) / sqrt(2P), G with iid N(0, 1) entries: off-diagonal variance
    sigma^2 / P, semicircle on [-2 sigma, 2 sigma] (DESIGN section 4).

    Parameters
    ----------
    size : int
        P >= 1.
    sigma : float, default 1.0
        Noise scale >= 0 (E P^-1 Tr X^2 = sigma^2 (1 + 1/P)).
    seed : int or torch.Generator, default 0
        The draw.
    dtype : torch.dtype, default torch.float64
        The matrix's dtype.
    device : torch.device or str, default "cpu"
        Its device.

    Returns
    -------
    torch.Tensor
        [P, P] symmetric.

    References
    ----------
    E. P. Wigner, "On the distribution of the roots of certain symmetric matrices", Ann.
    Math. 67 (1958).

    Examples
    --------
    >>> from curvlab.rmt import goe
    >>> X = goe(300, sigma=0.5, seed=0)
    >>> round(float((X**2).sum() / 300), 2)  # P^-1 Tr X^2 ~ sigma^2
    0.25
    """
    size = check_int("size", size, minimum=1)
    sigma = check_nonnegative("sigma", sigma)
    gen = make_generator(seed, device)
    g = torch.randn(size, size, generator=gen, dtype=dtype, device=device)
    return sigma * (g + g.T) / math.sqrt(2 * size)


def spiked_wigner(
    size: int,
    spikes,
    sigma: float = 1.0,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """M = sum_i nu_i theta_i theta_i^T + X with X = :func:`goe` and random orthonormal
    theta_i (the paper's spiked model, section 4). Returns (M [P, P], theta [P, r]).

    Parameters
    ----------
    size : int
        P.
    spikes : sequence of float
        nu_1, ..., nu_r (r <= P).
    sigma : float, default 1.0
        The noise scale of X.
    seed : int or torch.Generator, default 0
        The noise and the directions.
    dtype : torch.dtype, default torch.float64
        The matrix's dtype.
    device : torch.device or str, default "cpu"
        Its device.

    Returns
    -------
    tuple of torch.Tensor
        M [P, P] and the orthonormal spike directions theta [P, r].

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), section 4. J. Baik, G. Ben Arous and S. Péché,
    "Phase transition of the largest eigenvalue for nonnull complex sample covariance
    matrices", Ann. Probab. 33(5) (2005).

    Examples
    --------
    >>> import torch
    >>> from curvlab.rmt import bbp_outlier, spiked_wigner
    >>> M, theta = spiked_wigner(400, spikes=[5.0], sigma=1.0, seed=0)
    >>> round(float(torch.linalg.eigvalsh(M)[-1]), 1), bbp_outlier(5.0, 1.0)  # BBP: 5 + 1/5
    (5.1, 5.2)
    """
    nus = torch.as_tensor(np.asarray(spikes, dtype=np.float64), dtype=dtype, device=device)
    nus = nus.reshape(-1)
    if nus.numel() > size:
        raise InvalidInputError(f"cannot plant {nus.numel()} spikes in size {size}")
    gen = make_generator(seed, device)
    noise = goe(size, sigma, gen, dtype, device)
    basis = torch.randn(size, max(nus.numel(), 1), generator=gen, dtype=dtype, device=device)
    theta = torch.linalg.qr(basis).Q[:, : nus.numel()]
    return noise + (theta * nus) @ theta.T, theta
