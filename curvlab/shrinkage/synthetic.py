"""Explicit per-sample matrices as an estimator-like operator, and an additive spiked model.

``PerSampleMatrices`` lets tests and synthetic studies feed explicit matrices M [n, p, p]
to the matrix-free code paths (``group_matvecs`` like a curvature estimator).
``SpikedModel`` is the additive model of DESIGN.md section 4: truth C = Q diag(spikes, bulk) Q^T
(the bulk one value, or evenly spread over (low, high)), observations M_k = C + X_k with
X_k = s (G_k + G_k^T) / sqrt(2p), so a batch of B has noise of variance sigma^2 = s^2 / B:
a semicircle on [-2 sigma, 2 sigma] around the bulk, spikes nu > sigma separate to
nu + sigma^2 / nu.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from curvlab._random import Seed, make_generator
from curvlab.errors import InvalidInputError


class PerSampleMatrices:
    """Explicit symmetric matrices M [n, p, p] with the estimator's product interface.

    ``matvec`` applies their mean, ``group_matvecs`` each group's mean, so matrix-free code
    (shrinkage fits, :func:`curvlab.noise.probe_statistics`) runs on known matrices.

    Parameters
    ----------
    matrices : torch.Tensor
        [n, p, p] symmetric per-sample matrices.

    Examples
    --------
    >>> import torch
    >>> from curvlab.shrinkage import PerSampleMatrices
    >>> M = torch.stack([torch.eye(2, dtype=torch.float64) * c for c in (1.0, 3.0)])
    >>> op, v = PerSampleMatrices(M), torch.ones(2, dtype=torch.float64)
    >>> op.matvec(v), op.group_matvecs(v)
    (tensor([2., 2.], dtype=torch.float64), tensor([[1., 1.],
            [3., 3.]], dtype=torch.float64))
    """

    curvature = "explicit"
    distributed = False

    def __init__(self, matrices: torch.Tensor):
        if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2]:
            raise InvalidInputError(f"expected [n, p, p] matrices, got {tuple(matrices.shape)}")
        self.matrices = matrices
        self.mean = matrices.mean(dim=0)
        self.num_samples = int(matrices.shape[0])
        self.num_params = int(matrices.shape[1])
        self.dtype = matrices.dtype
        self.device = matrices.device
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The mean matrix times ``v`` ([p] or [p, k]).

        Parameters
        ----------
        v : torch.Tensor
            [p] or [p, k].

        Returns
        -------
        torch.Tensor
            mean(M) @ v.
        """
        self.n_matvecs += 1 if v.ndim == 1 else v.shape[1]
        return self.mean @ v

    def group_matvecs(self, v: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        """[G, p]: each group's mean matrix times v (remainder dropped).

        Parameters
        ----------
        v : torch.Tensor
            [p] probe.
        group_size : int, default 1
            Consecutive matrices per group (G = n // group_size).

        Returns
        -------
        torch.Tensor
            [G, p].
        """
        g = self.num_samples // group_size
        self.n_matvecs += g
        if group_size == 1:
            return self.matrices @ v
        M = self.matrices[: g * group_size].reshape(g, group_size, self.num_params, -1)
        return M.mean(dim=1) @ v

    def to_dense(self) -> torch.Tensor:
        """The [p, p] mean matrix."""
        return self.mean


@dataclass
class SpikedModel:
    """Additive spiked model: ``matrix`` is the truth C; ``sample(B, seed)`` gives [B, p, p].

    Parameters
    ----------
    p : int
        Dimension.
    spikes : sequence of float, default (20.0, 10.0, 5.0, 3.0, 2.0)
        The truth's leading eigenvalues.
    noise : float, default 4.0
        s: each observation's noise X_k has P^-1 E Tr X_k^2 = s^2 (semicircle on
        [-2 s, 2 s]); the mean of B observations has noise s^2 / B.
    bulk : float or (float, float), default 0.0
        The truth's other eigenvalues: one value, or evenly spread over (low, high).
    seed : int or torch.Generator, default 0
        The truth's eigenvectors.
    dtype : torch.dtype, default torch.float64
        The matrices' dtype.

    Attributes
    ----------
    matrix : torch.Tensor
        The truth C [p, p].
    eigenvectors : torch.Tensor
        Its eigenvectors Q [p, p] (the spikes' directions first).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), section 4 (H_batch = H_true + X). J. Baik,
    G. Ben Arous and S. Péché, "Phase transition of the largest eigenvalue for nonnull
    complex sample covariance matrices", Ann. Probab. 33(5) (2005).

    Examples
    --------
    >>> import torch
    >>> from curvlab.shrinkage import SpikedModel
    >>> model = SpikedModel(100, spikes=(10.0,), noise=2.0)
    >>> batch = model.sample(8, seed=1)
    >>> batch.shape, round(float(torch.linalg.eigvalsh(model.matrix)[-1]), 6)
    (torch.Size([8, 100, 100]), 10.0)
    >>> round(float(((batch.mean(0) - model.matrix) ** 2).sum() / 100), 1)  # ~ s^2 / B
    0.5
    """

    p: int
    spikes: Sequence[float] = (20.0, 10.0, 5.0, 3.0, 2.0)
    noise: float = 4.0
    bulk: float | tuple[float, float] = 0.0
    seed: Seed = 0
    dtype: torch.dtype = torch.float64
    matrix: torch.Tensor = field(init=False, repr=False)
    eigenvectors: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.spikes) > self.p:
            raise InvalidInputError(f"{len(self.spikes)} spikes do not fit in dimension {self.p}")
        gen = make_generator(self.seed)
        Q, _ = torch.linalg.qr(torch.randn(self.p, self.p, generator=gen, dtype=self.dtype))
        if isinstance(self.bulk, (tuple, list)):
            low, high = self.bulk
            values = torch.linspace(float(high), float(low), self.p, dtype=self.dtype)
        else:
            values = torch.full((self.p,), float(self.bulk), dtype=self.dtype)
        values[: len(self.spikes)] = torch.as_tensor(list(self.spikes), dtype=self.dtype)
        self.eigenvectors = Q
        self.matrix = (Q * values) @ Q.T

    def sample(self, batch_size: int, seed: Seed = 0) -> torch.Tensor:
        """[B, p, p] per-sample observations C + X_k (noise variance ``noise**2`` each).

        Parameters
        ----------
        batch_size : int
            B, the number of observations.
        seed : int or torch.Generator, default 0
            The noise draw.

        Returns
        -------
        torch.Tensor
            [B, p, p] symmetric matrices in ``dtype``.
        """
        gen = make_generator(seed)
        G = torch.randn(batch_size, self.p, self.p, generator=gen, dtype=self.dtype)
        X = self.noise * (G + G.transpose(1, 2)) / (2 * self.p) ** 0.5
        return self.matrix + X
