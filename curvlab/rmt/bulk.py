"""Fitting the noise bulk of a spectrum and flagging the outliers beyond its Tracy-Widom
edge (paper section 4, Fig. 2a; DESIGN section 4), from a full spectrum or matrix-free from a
few extreme eigenvalues and a stochastic Lanczos quadrature.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.results import Eigenpairs, SpectralDensity
from curvlab.rmt.laws import TW1_QUANTILE_99
from curvlab.validation import check_choice, check_nonnegative, check_optional, check_positive

__all__ = ["EDGE_STDERR_Z", "BulkFit", "detect_outliers", "fit_bulk_edge"]

# One-sided 99% normal quantile: edges from quadrature are widened by this many standard errors.
EDGE_STDERR_Z = 2.326


# --------------------------------------------------------------------------- bulk and outliers


@dataclass(frozen=True)
class BulkFit:
    """A fitted noise bulk and the outliers beyond it (paper section 4, Fig. 2a).

    ``center`` and ``sigma`` are the bulk's mean and standard deviation (semicircle: its
    centre and sigma; Marchenko-Pastur: sigma2 = center and ratio = (sigma / center)^2).
    ``edge_stderr`` is the standard error of the edges from the quadrature's probe-to-probe
    spread (0 for an exact spectrum). ``outliers`` (descending, float64) are the given
    eigenvalues above ``upper`` or below ``lower``, the edges widened by the Tracy-Widom
    margin plus ``EDGE_STDERR_Z`` standard errors. Returned by :func:`fit_bulk_edge`.

    Attributes
    ----------
    edge_left, edge_right : float
        The fitted bulk's edges (semicircle: center -+ 2 sigma).
    center : float
        The bulk's centre (mean).
    sigma : float
        The bulk's noise scale (semicircle: sigma^2 = P^-1 Tr X^2).
    tracy_widom_margin : float
        ``tw_quantile`` x the edge fluctuation scale (sigma P^-2/3 for the semicircle).
    edge_stderr : float
        Standard error of the edges from the quadrature's probes (0 for a full spectrum).
    outliers : torch.Tensor
        The flagged eigenvalues, descending, float64.
    n_outliers : int
        Their number.
    size : int
        P, the size of the spectrum.
    method : str
        ``"semicircle"`` or ``"marchenko-pastur"``.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), section 4 and Fig. 2a. C. A. Tracy and H. Widom,
    "On orthogonal and symplectic matrix ensembles", Commun. Math. Phys. 177 (1996).

    Examples
    --------
    >>> import torch
    >>> from curvlab.rmt import fit_bulk_edge, spiked_wigner
    >>> M, _ = spiked_wigner(400, spikes=[5.0], sigma=1.0, seed=0)
    >>> fit = fit_bulk_edge(torch.linalg.eigvalsh(M))
    >>> fit.n_outliers, round(fit.edge_right, 1), round(fit.sigma, 2), fit.bulk_fraction
    (1, 2.0, 1.0, 0.9975)
    """

    edge_left: float
    edge_right: float
    center: float
    sigma: float
    tracy_widom_margin: float
    edge_stderr: float
    outliers: torch.Tensor = field(repr=False)
    n_outliers: int
    size: int
    method: str

    @property
    def upper(self) -> float:
        """Threshold above which an eigenvalue is an outlier."""
        return self.edge_right + self.tracy_widom_margin + EDGE_STDERR_Z * self.edge_stderr

    @property
    def lower(self) -> float:
        """Threshold below which an eigenvalue is an outlier."""
        return self.edge_left - self.tracy_widom_margin - EDGE_STDERR_Z * self.edge_stderr

    @property
    def bulk_fraction(self) -> float:
        """Share of the P eigenvalues inside the bulk, (P - n_outliers) / P."""
        return (self.size - self.n_outliers) / self.size


_MODELS = ("semicircle", "marchenko-pastur")


def _float64(values, name: str) -> torch.Tensor:
    """A finite float64 CPU tensor of the same shape (Eigenpairs give their values)."""
    if isinstance(values, Eigenpairs):
        values = values.values
    if isinstance(values, torch.Tensor):
        array = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        array = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if not bool(torch.isfinite(array).all()):
        raise InvalidInputError(f"{name} must be finite")
    return array


def _edges(model: str, center: float, sigma: float, size: int, tw: float):
    """Bulk edges and the Tracy-Widom margin tw * (edge fluctuation scale).

    Semicircle: edges center -+ 2 sigma, scale sigma P^-2/3 (GOE, Tracy & Widom 1996).
    Marchenko-Pastur with sigma2 = center, ratio q = (sigma / center)^2: edges
    sigma2 (1 -+ sqrt q)^2 (left edge 0 when q >= 1: the atom), right-edge scale
    sigma2 sqrt(q) (1 + sqrt q)^(4/3) P^-2/3 (Johnstone 2001, Theorem 1.1, written with P = p
    and q = p/n); the same margin is used on the left, which is conservative there.
    """
    if model == "semicircle":
        return center - 2 * sigma, center + 2 * sigma, tw * sigma * size ** (-2 / 3)
    if center <= 0:
        raise InvalidInputError(
            "a Marchenko-Pastur bulk needs a positive mean; use model='semicircle'"
        )
    q = (sigma / center) ** 2
    root = math.sqrt(q)
    left = center * (1 - root) ** 2 if q < 1 else 0.0
    right = center * (1 + root) ** 2
    return left, right, tw * center * root * (1 + root) ** (4 / 3) * size ** (-2 / 3)


def _bulk_moments(nodes: torch.Tensor, weights: torch.Tensor, lo: float, hi: float):
    """Mean and second moment of the quadrature restricted to [lo, hi], pooled over probes.

    Dropping each probe's own nodes beyond the edges removes that probe's realized weight on
    the outliers, which a trace identity alone would leave as noise.
    """
    kept = weights * ((nodes >= lo) & (nodes <= hi))
    total = float(kept.sum())
    if total <= 0:
        raise InvalidInputError("no quadrature weight inside the fitted bulk")
    return float((kept * nodes).sum()) / total, float((kept * nodes**2).sum()) / total


def _edge_stderr(nodes, weights, lo, hi, model, size, sigma: float | None) -> float:
    """Standard error of the fitted edges from the spread of per-probe fits (0 for one probe).

    Each probe gives its own bulk mean and deviation, hence edges; the pooled edges' error is
    the larger of the two edges' sample standard deviations over sqrt(n_probes). A known
    sigma leaves only the centre's error.
    """
    n_probes = nodes.shape[0]
    if n_probes < 2:
        return 0.0
    kept = weights * ((nodes >= lo) & (nodes <= hi))
    total = kept.sum(dim=1)
    if bool((total <= 0).any()):
        return 0.0
    m1 = (kept * nodes).sum(dim=1) / total
    sd = ((kept * nodes**2).sum(dim=1) / total - m1**2).clamp_min(0).sqrt()
    if sigma is not None:
        sd = torch.full_like(sd, sigma)
    edges = torch.tensor(
        [_edges(model, float(c), float(s), size, 0.0)[:2] for c, s in zip(m1, sd)],
        dtype=torch.float64,
    )
    return float(edges.std(dim=0).max()) / math.sqrt(n_probes)


def _deflate_spikes(
    m1: float, m2: float, outliers: torch.Tensor, size: int, sigma: float | None = None
):
    """Centre c and noise sigma of M = c I + X + sum_i nu_i theta_i theta_i^T from the bulk
    moments m1, m2 (over P - r eigenvalues) and the r outliers (a known sigma is kept).

    BBP pushes each outlier to c + nu_i + s_i, s_i = sigma^2 / nu_i, and the bulk gives the
    push back, so with Tr M ~ P c + sum nu_i and Tr (M - c)^2 ~ P sigma^2 + sum nu_i^2:
    c = m1 + sum s_i / (P - r) and
    sigma^2 = ((P - r)(m2 - 2 c m1 + c^2) + sum sigma^4 / nu_i^2) / (P - 2r), with nu_i from
    inverting lambda_i - c = nu_i + sigma^2 / nu_i; iterated to a fixed point. Removing the
    outliers without this biases sigma down by about r / (2P).
    """
    r = outliers.numel()
    n_bulk = size - r
    center = m1
    variance = max(m2 - m1**2, 0.0) if sigma is None else sigma**2
    if r == 0 or size <= 2 * r:
        return center, math.sqrt(variance)
    for _ in range(20):
        dist = outliers - center
        gap = (dist.abs() ** 2 - 4 * variance).clamp_min(0)
        nu = (dist.abs() + torch.sqrt(gap)) / 2
        push = torch.sign(dist) * variance / nu
        center = m1 + float(push.sum()) / n_bulk
        if sigma is not None:
            continue
        spread = n_bulk * (m2 - 2 * center * m1 + center**2)
        new = max((spread + float((variance**2 / nu**2).sum())) / (size - 2 * r), 0.0)
        if abs(new - variance) <= 1e-14 * max(variance, 1e-300):
            variance = new
            break
        variance = new
    return center, math.sqrt(variance)


def fit_bulk_edge(
    eigenvalues=None,
    *,
    density: SpectralDensity | None = None,
    nodes=None,
    weights=None,
    size: int | None = None,
    model: str = "semicircle",
    tw_quantile: float = TW1_QUANTILE_99,
    sigma: float | None = None,
) -> BulkFit:
    """Fit a semicircle (or Marchenko-Pastur) bulk by moments and flag the outliers.

    Starting from no outliers, repeat until no new one appears (flags are kept, so it ends
    within len(eigenvalues) + 1 rounds): take the mean and second moment of
    the spectrum inside the current edges (plus margin); turn them into a centre and noise
    scale (semicircle: corrected for the spikes' BBP push, see ``_deflate_spikes``; MP: the
    bulk's mean and standard deviation); set the edges (semicircle: centre -+ 2 sigma; MP:
    see ``_edges``) and flag the given eigenvalues beyond an edge by more than the
    Tracy-Widom margin ``tw_quantile * scale``, scale = sigma P^-2/3 for the semicircle
    (default quantile: TW1's 99%, 2.0234), plus ``EDGE_STDERR_Z`` standard errors of the
    edges when they come from a quadrature. Paper section 4: whatever lies beyond the
    Tracy-Widom region is an outlier.

    Inputs:
      * the full spectrum: ``eigenvalues`` of length P (``size`` optional, must equal P);
      * matrix-free: a few extreme ``eigenvalues`` (a tensor, array or
        :class:`~curvlab.results.Eigenpairs` from Lanczos; top and/or bottom), the quadrature
        ``density`` (or ``nodes``/``weights`` [n_probes, n_steps]) for the bulk moments, and
        ``size`` = P. Only the given eigenvalues can be reported as outliers;
      * a density alone (with ``size``): the first probe's nodes (its Ritz values, accurate
        for well-separated outliers when n_steps is well above their number; paper section
        5) serve as the candidate eigenvalues.

    ``sigma``, when known, fixes the noise scale instead of fitting it: the paper's model
    H_batch = H_true + X (section 4) puts the noise edge at 2 sigma with
    sigma^2 = P^-1 Tr X^2, the Hessian noise variance (``est.noise_variance(...).value``,
    DESIGN section 4), and only the centre is fitted. Trained networks' spectra are heavy
    tailed, so a moment fit alone calls much of the tail outliers; pass sigma there.

    The quadrature's moments carry a stochastic error of relative size about
    sqrt(2 / (n_probes P)), which can exceed the Tracy-Widom margin's P^-2/3; it is measured
    from the probes' spread (``edge_stderr``, needs n_probes >= 2) and added to the margin,
    so eigenvalues that close to the edge are not counted. A semicircle fit centres the bulk
    at its mean.

    Parameters
    ----------
    eigenvalues : array, tensor, Eigenpairs or SpectralDensity, optional
        The full spectrum, or a few extreme eigenvalues (with a density); a
        SpectralDensity given here is taken as ``density``.
    density : SpectralDensity, optional
        The quadrature of ``spectral_density`` (matrix-free fits).
    nodes : array or tensor, optional
        Quadrature nodes [n_probes, n_steps] instead of ``density``.
    weights : array or tensor, optional
        Their weights.
    size : int, optional
        P; required with a quadrature, optional (must equal P) with a full spectrum.
    model : {"semicircle", "marchenko-pastur"}, default "semicircle"
        The bulk's law.
    tw_quantile : float, default TW1_QUANTILE_99 (2.0234)
        Tracy–Widom quantile of the edge margin (0: no margin).
    sigma : float, optional
        A known noise scale (e.g. sqrt of ``est.noise_variance(...).value``); only the
        centre is fitted then.

    Returns
    -------
    BulkFit
        Edges, centre, scale, margins and the outliers.

    Raises
    ------
    InvalidInputError
        For inconsistent inputs, a spectrum below size 3, or when over half of it is
        flagged (no semicircle-like bulk).

    Warns
    -----
    CurvlabWarning
        When every given eigenvalue of a partial spectrum is an outlier (there may be more).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), section 4. J. Baik, G. Ben Arous and S. Péché,
    "Phase transition of the largest eigenvalue for nonnull complex sample covariance
    matrices", Ann. Probab. 33(5) (2005). C. A. Tracy and H. Widom, "On orthogonal and
    symplectic matrix ensembles", Commun. Math. Phys. 177 (1996). I. M. Johnstone, "On the
    distribution of the largest eigenvalue in principal components analysis", Ann. Statist.
    29(2) (2001).

    Examples
    --------
    A spike of 5 in unit Wigner noise sits at 5 + 1/5 (BBP), far beyond the edge 2:

    >>> import torch
    >>> from curvlab.rmt import fit_bulk_edge, spiked_wigner
    >>> M, _ = spiked_wigner(400, spikes=[5.0], sigma=1.0, seed=0)
    >>> fit = fit_bulk_edge(torch.linalg.eigvalsh(M))
    >>> fit.n_outliers, round(float(fit.outliers[0]), 1), round(fit.edge_right, 1)
    (1, 5.1, 2.0)
    """
    eigenvalues, nodes, weights = _unpack_density(eigenvalues, density, nodes, weights)
    _check_options(model, tw_quantile, sigma)
    spectrum = _spectrum(eigenvalues, nodes, weights, size)
    edges, flagged = _flag_outliers(spectrum, model, tw_quantile, sigma)
    candidates = spectrum.candidates
    outliers = candidates[flagged].sort(descending=True).values
    if candidates.numel() < spectrum.size and outliers.numel() == candidates.numel() > 0:
        warnings.warn(
            f"all {candidates.numel()} given eigenvalues are outliers; there may be more: "
            "compute more extreme eigenpairs",
            CurvlabWarning,
            stacklevel=2,
        )
    return BulkFit(
        edge_left=edges.left,
        edge_right=edges.right,
        center=edges.center,
        sigma=edges.scale,
        tracy_widom_margin=edges.margin,
        edge_stderr=edges.stderr,
        outliers=outliers,
        n_outliers=int(outliers.numel()),
        size=spectrum.size,
        method=model,
    )


# --------------------------------------------------------------------------- the fit's steps


@dataclass(frozen=True)
class _Spectrum:
    """What the fit reads: the candidate eigenvalues (float64, [k]) that may be flagged, and
    the quadrature nodes and weights ([n_probes, n_steps]) that give the bulk moments of the
    P = ``size`` eigenvalues."""

    candidates: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    size: int


@dataclass(frozen=True)
class _Edges:
    """One round's fitted bulk: edges, centre, noise scale, Tracy-Widom margin and the edges'
    standard error."""

    left: float
    right: float
    center: float
    scale: float
    margin: float
    stderr: float

    @property
    def lower(self) -> float:
        return self.left - self.margin - EDGE_STDERR_Z * self.stderr

    @property
    def upper(self) -> float:
        return self.right + self.margin + EDGE_STDERR_Z * self.stderr


def _unpack_density(eigenvalues, density, nodes, weights) -> tuple:
    """(eigenvalues, nodes, weights) with a SpectralDensity, given first or as ``density=``,
    turned into its nodes and weights."""
    if isinstance(eigenvalues, SpectralDensity):
        if density is not None:
            raise InvalidInputError("pass one SpectralDensity, not two")
        density, eigenvalues = eigenvalues, None
    if density is not None:
        if nodes is not None or weights is not None:
            raise InvalidInputError("pass either density= or nodes=/weights=, not both")
        nodes, weights = density.nodes, density.weights
    if (nodes is None) != (weights is None):
        raise InvalidInputError("pass nodes= and weights= together (or density=)")
    if eigenvalues is None and nodes is None:
        raise InvalidInputError(
            "pass eigenvalues=, or a SpectralDensity (with size=) from spectral_density()"
        )
    return eigenvalues, nodes, weights


def _check_options(model: str, tw_quantile: float, sigma: float | None) -> None:
    check_choice("model", model, _MODELS)
    check_nonnegative("tw_quantile", tw_quantile)
    check_optional(check_positive, "sigma", sigma, fix="or None to fit it")


def _spectrum(eigenvalues, nodes, weights, size: int | None) -> _Spectrum:
    """The candidates and the quadrature: a full spectrum is its own quadrature (one probe of
    weights 1/P); a density alone offers its first probe's nodes as the candidates."""
    if nodes is not None:
        nodes, weights = _float64(nodes, "nodes"), _float64(weights, "weights")
        if nodes.shape != weights.shape or nodes.dim() not in (1, 2) or nodes.numel() == 0:
            raise InvalidInputError("nodes and weights must share a shape [n_probes, n_steps]")
        nodes, weights = nodes.reshape(-1, nodes.shape[-1]), weights.reshape(-1, nodes.shape[-1])
        if size is None:
            raise InvalidInputError("with a density, pass size= the matrix size P (num_params)")
    candidates = nodes[0] if eigenvalues is None else _float64(eigenvalues, "eigenvalues")
    candidates = candidates.reshape(-1)
    if nodes is None:
        if size is not None and size != candidates.numel():
            raise InvalidInputError(
                f"got {candidates.numel()} eigenvalues for size={size}; for a partial "
                "spectrum also pass density= (or nodes=/weights=) from spectral_density()"
            )
        size = candidates.numel()
        nodes = candidates[None]
        weights = torch.full_like(nodes, 1.0 / size)
    size = int(size)
    if size < 3:
        raise InvalidInputError(f"need a spectrum of size >= 3; got {size}")
    if candidates.numel() > size:
        raise InvalidInputError(f"got {candidates.numel()} eigenvalues for size={size}")
    return _Spectrum(candidates, nodes, weights, size)


def _flag_outliers(
    spectrum: _Spectrum, model: str, tw_quantile: float, sigma: float | None
) -> tuple[_Edges, torch.Tensor]:
    """Refit the bulk inside the last round's thresholds and flag the candidates beyond the
    new ones until no new one appears (flags are kept, so at most k + 1 rounds). Returns the
    last fit and the flags ([k] bool)."""
    candidates = spectrum.candidates
    lo, hi = -math.inf, math.inf
    flagged = torch.zeros_like(candidates, dtype=torch.bool)
    while True:
        if 2 * int(flagged.sum()) >= spectrum.size:
            raise InvalidInputError(
                "over half the spectrum was flagged: it has no semicircle-like bulk; "
                "try model='marchenko-pastur' or inspect the spectrum with plot_spectral_density"
            )
        edges = _fit_edges(spectrum, candidates[flagged], lo, hi, model, tw_quantile, sigma)
        lo, hi = edges.lower, edges.upper
        new = flagged | (candidates > hi) | (candidates < lo)
        if torch.equal(new, flagged):
            return edges, flagged
        flagged = new


def _fit_edges(
    spectrum: _Spectrum,
    outliers: torch.Tensor,
    lo: float,
    hi: float,
    model: str,
    tw_quantile: float,
    sigma: float | None,
) -> _Edges:
    """One round: the moments inside [lo, hi], the centre and scale (semicircle: deflated for
    the ``outliers``' BBP push; MP: mean and standard deviation), the edges, the margin and
    the edges' standard error."""
    nodes, weights, size = spectrum.nodes, spectrum.weights, spectrum.size
    m1, m2 = _bulk_moments(nodes, weights, lo, hi)
    if model == "semicircle":
        center, scale = _deflate_spikes(m1, m2, outliers, size, sigma)
    else:
        center = m1
        scale = math.sqrt(max(m2 - m1**2, 0.0)) if sigma is None else sigma
    left, right, margin = _edges(model, center, scale, size, tw_quantile)
    stderr = _edge_stderr(nodes, weights, lo, hi, model, size, sigma)
    return _Edges(left, right, center, scale, margin, stderr)


def detect_outliers(eigenvalues=None, **kwargs) -> torch.Tensor:
    """The outliers of :func:`fit_bulk_edge` (same arguments), descending.

    Parameters
    ----------
    eigenvalues : array, tensor, Eigenpairs or SpectralDensity, optional
        As for :func:`fit_bulk_edge`.
    **kwargs : Any
        The other options of :func:`fit_bulk_edge` (``density``, ``size``, ``model``,
        ``tw_quantile``, ``sigma``, ...).

    Returns
    -------
    torch.Tensor
        ``fit_bulk_edge(eigenvalues, **kwargs).outliers`` (float64, descending).

    Examples
    --------
    >>> import torch
    >>> from curvlab.rmt import detect_outliers, spiked_wigner
    >>> M, _ = spiked_wigner(400, spikes=[5.0], sigma=1.0, seed=0)
    >>> detect_outliers(torch.linalg.eigvalsh(M)).shape
    torch.Size([1])
    """
    return fit_bulk_edge(eigenvalues, **kwargs).outliers
