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
    sigma^2 / P, semicircle on [-2 sigma, 2 sigma] (DESIGN section 4)."""
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
    theta_i (the paper's spiked model, section 4). Returns (M [P, P], theta [P, r])."""
    nus = torch.as_tensor(np.asarray(spikes, dtype=np.float64), dtype=dtype, device=device)
    nus = nus.reshape(-1)
    if nus.numel() > size:
        raise InvalidInputError(f"cannot plant {nus.numel()} spikes in size {size}")
    gen = make_generator(seed, device)
    noise = goe(size, sigma, gen, dtype, device)
    basis = torch.randn(size, max(nus.numel(), 1), generator=gen, dtype=dtype, device=device)
    theta = torch.linalg.qr(basis).Q[:, : nus.numel()]
    return noise + (theta * nus) @ theta.T, theta
