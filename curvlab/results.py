"""Small frozen result records. Numbers a user reads, never bare tuples.

Every estimate carries its standard error and its cost in products (``n_matvecs``);
``float(result)`` gives the value where there is one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error and cost.

    Returned by ``Operator.trace`` and ``Operator.trace_of_square``
    (:mod:`curvlab.spectral.trace`).

    Attributes
    ----------
    value : float
        The estimate.
    stderr : float
        Its standard error (0 when computed exactly, e.g. with ``n_matvecs >= P``).
    n_matvecs : int
        Operator products spent.
    samples : torch.Tensor or None, default None
        The Hutchinson samples behind ``stderr`` (float64, CPU), where there are any.

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)))
    >>> result = A.trace(n_matvecs=6, progress=False)  # n_matvecs >= P: exact
    >>> result
    Estimate(value=10.0, stderr=0.0, n_matvecs=4)
    >>> float(result)
    10.0
    """

    value: float
    stderr: float
    n_matvecs: int
    samples: torch.Tensor | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class DiagonalEstimate:
    """A diagonal [P] with its entrywise standard error (zero when ``method == "exact"``).

    Returned by ``Operator.diagonal(method="xdiag" | "hutchinson")`` (an exact diagonal
    comes back as a plain tensor; see :func:`curvlab.spectral.diagonal`).

    Attributes
    ----------
    value : torch.Tensor
        The [P] diagonal (estimate).
    stderr : torch.Tensor
        [P] standard error of each entry (Hutchinson's probe spread, or XDiag's
        exchangeable terms); zeros when exact.
    n_matvecs : int
        Operator products spent.
    method : str
        ``"exact"``, ``"xdiag"`` or ``"hutchinson"``.

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)))
    >>> d = A.diagonal(method="hutchinson", n_matvecs=3)
    >>> d.value, d.exact, d.n_matvecs
    (tensor([1., 2., 3., 4.], dtype=torch.float64), False, 3)
    """

    value: torch.Tensor
    stderr: torch.Tensor
    n_matvecs: int
    method: str

    @property
    def exact(self) -> bool:
        """Whether the diagonal was computed exactly (``method == "exact"``)."""
        return self.method == "exact"


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues sorted in descending order, vectors as columns [P, k].

    Returned by ``Operator.eigenpairs`` (:func:`curvlab.spectral.eigenpairs`).

    Attributes
    ----------
    values : torch.Tensor
        [k] eigenvalues, descending (also for ``which="smallest"`` and ``"both"``).
    vectors : torch.Tensor
        [P, k] unit eigenvectors, column i belonging to ``values[i]``.
    residuals : torch.Tensor
        [k] residual norms ||A x_i - lambda_i x_i|| (Ritz estimates, or measured exactly
        when the operator was solved densely).
    n_matvecs : int
        Operator products spent.
    converged : bool
        Whether every pair met the tolerance and the check for missed copies of repeated
        eigenvalues finished (a :class:`~curvlab.NotConvergedWarning` is issued otherwise).

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.arange(-5.0, 95.0, dtype=torch.float64)))
    >>> pairs = A.eigenpairs(k=3, which="smallest", progress=False)
    >>> [round(v, 6) for v in pairs.values.tolist()], pairs.vectors.shape, pairs.converged
    ([-3.0, -4.0, -5.0], torch.Size([100, 3]), True)
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    converged: bool


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per-probe nodes/weights and a broadened density.

    ``nodes`` and ``weights`` are [n_probes, n_steps]; each probe's weights sum to one, so
    ``(weights * f(nodes)).sum(1).mean() ~ Tr f(H) / P``. Returned by
    ``Operator.spectral_density`` (:func:`curvlab.spectral.spectral_density`); all tensors
    are float64 on the CPU.

    Attributes
    ----------
    nodes : torch.Tensor
        [n_probes, n_steps] Gauss quadrature nodes (Ritz values of each probe's Lanczos).
    weights : torch.Tensor
        [n_probes, n_steps] quadrature weights (squared first components of the Ritz
        vectors); each row sums to one.
    grid : torch.Tensor
        Points of the linear grid over the nodes' range.
    density : torch.Tensor
        The Gaussian-broadened density on ``grid``; it integrates to about one.
    log_grid : torch.Tensor or None
        Grid of log10(lambda) over the positive spectrum (None with ``log_grid=False`` or
        no positive nodes).
    log_density : torch.Tensor or None
        The density of log10(lambda) on ``log_grid``.
    sigma : float
        The Gaussian broadening used.
    n_matvecs : int
        Operator products spent (n_probes x n_steps).

    References
    ----------
    S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 38 (2017).

    Examples
    --------
    >>> import torch, curvlab
    >>> A = curvlab.DenseOperator(torch.diag(torch.linspace(0, 1, 500, dtype=torch.float64)))
    >>> density = A.spectral_density(n_probes=4, n_steps=20, progress=False)
    >>> density.nodes.shape, density.n_matvecs
    (torch.Size([4, 20]), 80)
    >>> round(density.integrate(lambda t: t), 1)  # P^-1 Tr A = 0.5
    0.5
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
        """Quadrature estimate of P^-1 Tr fn(H).

        Parameters
        ----------
        fn : callable
            Elementwise function of a tensor of eigenvalues (e.g. ``torch.log1p`` or
            ``lambda t: t**2``).

        Returns
        -------
        float
            mean over probes of sum_j weights_j fn(nodes_j); exact for polynomials of degree
            below 2 n_steps up to the probes' sampling error.
        """
        return float((self.weights * fn(self.nodes)).sum(dim=1).mean())


@dataclass(frozen=True)
class NoiseEstimate:
    """Hessian noise variance delta = P^-1 E||H_B - H||_F^2 for a batch of ``batch_size``.

    The paper's optimal damping (eq. 15), returned by :func:`curvlab.noise.noise_variance`
    and ``CurvatureEstimator.noise_variance``; ``float(result)`` and ``result.damping``
    give the value.

    Attributes
    ----------
    value : float
        delta, the mean over probes (or, for ``source="diagonal"``, the all-sample value).
    stderr : float
        sqrt(stderr_probes^2 + stderr_groups^2).
    per_probe : torch.Tensor
        The value of each probe (the leave-one-fold-out values for ``source="diagonal"``).
    batch_size : int
        B, the batch whose noise this is.
    n_samples : int
        Samples the estimate used (after ``subsample``).
    n_groups : int
        Groups of samples whose products were compared.
    n_matvecs : int
        Group products spent (n_groups x n_probes; 0 for the diagonal source).
    method : str
        ``"unbiased"`` or ``"paper"`` (Algorithm 1 as printed, biased).
    source : str, default "matvec"
        ``"matvec"`` (shared probes) or ``"diagonal"`` (per-sample diagonals).
    trace_per_param : float or None, default None
        P^-1 Tr H from the same probes (v^T u_bar); None for the diagonal source.
    stderr_probes : float, default nan
        The spread over probes / sqrt(n_probes).
    stderr_groups : float, default nan
        The groups' delete-one jackknife times the finite-population correction.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 15 and Algorithm 1.

    Examples
    --------
    >>> import torch, curvlab
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> est = curvlab.estimator("autograd", torch.nn.Linear(3, 1), torch.nn.MSELoss(), (x, y))
    >>> noise = est.noise_variance(batch_size=8, n_probes=4, seed=0)
    >>> noise.n_groups, noise.n_matvecs, noise.value > 0, noise.damping == float(noise)
    (64, 256, True, True)
    """

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
        """The value as a damping delta (the paper's eq. 15 reads delta = this variance)."""
        return float(self.value)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`curvlab.backends` reports about one backend.

    Attributes
    ----------
    name : str
        The name to pass to :func:`curvlab.estimator`.
    available : bool
        Whether its package imports here.
    extra : str or None
        The curvlab extra that installs it (``pip install "curvlab[extra]"``).
    install_hint : str or None
        What to run when it is unavailable.
    curvatures : frozenset of str
        The curvatures it computes (``"hessian"``, ``"ggn"``, ``"fisher"``, ``"ef"``).
    capabilities : frozenset of str
        What it offers beyond ``matvec`` (e.g. ``"diagonal"``, ``"kronecker_factors"``).
    description : str
        One line about the backend.

    Examples
    --------
    >>> import curvlab
    >>> info = curvlab.backends()["autograd"]
    >>> info.available, sorted(info.curvatures)
    (True, ['ef', 'fisher', 'ggn', 'hessian'])
    """

    name: str
    available: bool
    extra: str | None
    install_hint: str | None
    curvatures: frozenset[str]
    capabilities: frozenset[str]
    description: str
