"""Small frozen result records. Numbers a user reads, never bare tuples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error and cost."""

    value: float
    stderr: float
    n_matvecs: int
    samples: torch.Tensor | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class DiagonalEstimate:
    """A diagonal [P] with its entrywise standard error (zero when ``method == "exact"``)."""

    value: torch.Tensor
    stderr: torch.Tensor
    n_matvecs: int
    method: str

    @property
    def exact(self) -> bool:
        return self.method == "exact"


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues sorted in descending order, vectors as columns [P, k]."""

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    converged: bool


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per-probe nodes/weights and a broadened density.

    ``nodes`` and ``weights`` are [n_probes, n_steps]; each probe's weights sum to one, so
    ``(weights * f(nodes)).sum(1).mean() ~ Tr f(H) / P``.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    log_grid: torch.Tensor | None
    log_density: torch.Tensor | None
    sigma: float
    n_matvecs: int

    def integrate(self, fn) -> float:
        """Quadrature estimate of P^-1 Tr fn(H)."""
        return float((self.weights * fn(self.nodes)).sum(dim=1).mean())


@dataclass(frozen=True)
class NoiseEstimate:
    """Hessian noise variance delta = P^-1 E||H_B - H||_F^2 for a batch of ``batch_size``."""

    value: float
    stderr: float
    per_probe: torch.Tensor
    batch_size: int
    n_samples: int
    n_groups: int
    n_matvecs: int
    method: str
    source: str = "matvec"
    #: P^-1 tr H from the same probes (v^T u_bar), None for the diagonal source
    trace_per_param: float | None = None
    #: the two parts of ``stderr``: the probes' spread, the groups' jackknife (see noise_variance)
    stderr_probes: float = math.nan
    stderr_groups: float = math.nan

    @property
    def damping(self) -> float:
        return float(self.value)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`curvlab.backends` reports about one backend."""

    name: str
    available: bool
    extra: str | None
    install_hint: str | None
    curvatures: frozenset[str]
    capabilities: frozenset[str]
    description: str
