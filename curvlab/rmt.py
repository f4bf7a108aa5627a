"""Random-matrix formulas for curvature spectra (DESIGN section 4, paper sections 4-6).

Pure math on torch/numpy, no backend. Vectorized functions accept floats, numpy arrays or
torch tensors and broadcast; they return a torch tensor when any array argument is a tensor
(its dtype and device when floating), else a numpy array (a Python number when 0-d).

Conventions (DESIGN section 4): the Wigner noise X = sigma (G + G^T) / sqrt(2P) has the
semicircle law on [-2 sigma, 2 sigma], so ``sigma^2 = P^-1 E Tr X^2``; the Stieltjes transform
is g(z) = P^-1 Tr (z - M)^-1 (Bun, Bouchaud & Potters 2017, "Cleaning large correlation
matrices", Phys. Rep. 666, section 2), so g(z) ~ 1/z at infinity and the rotation-invariant
estimator reads xi = lambda - 2 sigma^2 Re g(lambda - i eta).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from curvlab._random import Seed, make_generator
from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.results import Eigenpairs, SpectralDensity

__all__ = [
    "EDGE_STDERR_Z",
    "TW1_QUANTILE_95",
    "TW1_QUANTILE_99",
    "BulkFit",
    "bbp_outlier",
    "bbp_overlap",
    "detect_outliers",
    "fit_bulk_edge",
    "goe",
    "marchenko_pastur_cdf",
    "marchenko_pastur_pdf",
    "r_est_curv",
    "semicircle_cdf",
    "semicircle_pdf",
    "semicircle_stieltjes",
    "spiked_wigner",
    "stieltjes",
    "theorem1_overlap",
]

# Quantiles of the GOE Tracy-Widom law TW1 (Tracy & Widom 1996; Johnstone 2001, Ann. Stat.
# 29(2), Table 1), re-derived here from Bornemann's Fredholm-determinant form
# F1(s) = det(I - K), K(x, y) = Ai((x + y) / 2) / 2 on L^2(s, inf): 0.97932, 2.02345.
TW1_QUANTILE_95 = 0.9793
TW1_QUANTILE_99 = 2.0234

# One-sided 99% normal quantile: edges from quadrature are widened by this many standard errors.
EDGE_STDERR_Z = 2.326

_CHUNK = 1 << 22  # complex entries per block in the Stieltjes sum


# --------------------------------------------------------------------------- conversions


class _Out:
    """Remembers the kind of the inputs so results come back as tensor, array or number."""

    def __init__(self, values: tuple):
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        self.torch = bool(tensors)
        floating = [t for t in tensors if t.is_floating_point() or t.is_complex()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        real = torch.float64
        if floating and all(t.dtype in (torch.float32, torch.complex64) for t in floating):
            real = torch.float32
        self.dtype = real
        self.cdtype = torch.complex64 if real == torch.float32 else torch.complex128

    def tensor(self, value, *, complex_: bool = False) -> torch.Tensor:
        dtype = self.cdtype if complex_ else self.dtype
        if isinstance(value, torch.Tensor):
            return value.to(device=self.device, dtype=dtype)
        return torch.as_tensor(np.asarray(value), device=self.device).to(dtype)

    def out(self, result: torch.Tensor):
        if self.torch:
            return result
        array = result.cpu().numpy()
        if array.ndim == 0:
            return complex(array) if np.iscomplexobj(array) else float(array)
        return array


def _positive(name: str, value: torch.Tensor, *, allow_zero: bool = False) -> None:
    bad = (value < 0) if allow_zero else (value <= 0)
    if bool(torch.any(bad | ~torch.isfinite(value))):
        rel = ">= 0" if allow_zero else "> 0"
        raise InvalidInputError(f"{name} must be finite and {rel}; got {value.tolist()}")


# --------------------------------------------------------------------------- semicircle


def semicircle_pdf(x, sigma=1.0):
    """Wigner semicircle density sqrt(4 sigma^2 - x^2) / (2 pi sigma^2) on [-2 sigma, 2 sigma].

    The limit spectrum of X = sigma (G + G^T) / sqrt(2P) (Wigner 1958; DESIGN section 4);
    its second moment is sigma^2.
    """
    conv = _Out((x, sigma))
    x, sigma = conv.tensor(x), conv.tensor(sigma)
    _positive("sigma", sigma)
    inside = (4 * sigma**2 - x**2).clamp_min(0)
    return conv.out(torch.sqrt(inside) / (2 * math.pi * sigma**2))


def semicircle_cdf(x, sigma=1.0):
    """Distribution function of the semicircle: with u = clip(x / (2 sigma), -1, 1),
    F(x) = 1/2 + (u sqrt(1 - u^2) + arcsin u) / pi (the integral of :func:`semicircle_pdf`).
    """
    conv = _Out((x, sigma))
    x, sigma = conv.tensor(x), conv.tensor(sigma)
    _positive("sigma", sigma)
    u = (x / (2 * sigma)).clamp(-1, 1)
    return conv.out(0.5 + (u * torch.sqrt(1 - u**2) + torch.arcsin(u)) / math.pi)


def semicircle_stieltjes(z, sigma=1.0):
    """Stieltjes transform of the semicircle, g(z) = (z - sqrt(z^2 - 4 sigma^2)) / (2 sigma^2).

    The branch is sqrt(z - 2 sigma) sqrt(z + 2 sigma) with principal roots, cut on
    [-2 sigma, 2 sigma], so that g(z) ~ 1/z at infinity (Potters & Bouchaud 2020, "A First
    Course in Random Matrix Theory", chapter 2). Same sign convention as :func:`stieltjes`.
    """
    conv = _Out((z, sigma))
    z, sigma = conv.tensor(z, complex_=True), conv.tensor(sigma)
    _positive("sigma", sigma)
    root = torch.sqrt(z - 2 * sigma) * torch.sqrt(z + 2 * sigma)
    return conv.out((z - root) / (2 * sigma**2))


# --------------------------------------------------------------------------- Marchenko-Pastur


def _mp_edges(ratio: torch.Tensor, sigma2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = torch.sqrt(ratio)
    return sigma2 * (1 - root) ** 2, sigma2 * (1 + root) ** 2


def marchenko_pastur_pdf(x, ratio, sigma2=1.0):
    """Continuous part of the Marchenko-Pastur law for S = X X^T / n, X of size p x n with
    entries of variance sigma2 and ratio = p / n (Marchenko & Pastur 1967; Bai & Silverstein
    2010, "Spectral Analysis of Large Dimensional Random Matrices", section 3.1):

        f(x) = sqrt((l_+ - x)(x - l_-)) / (2 pi sigma2 ratio x)  on [l_-, l_+],
        l_+- = sigma2 (1 +- sqrt(ratio))^2.

    For ratio > 1 this part has mass 1 / ratio; the atom of mass 1 - 1/ratio at 0 is not a
    density and appears only in :func:`marchenko_pastur_cdf`. The law's mean is sigma2.
    """
    conv = _Out((x, ratio, sigma2))
    x, ratio, sigma2 = conv.tensor(x), conv.tensor(ratio), conv.tensor(sigma2)
    _positive("ratio", ratio)
    _positive("sigma2", sigma2)
    lo, hi = _mp_edges(ratio, sigma2)
    inside = (x > lo) & (x < hi)
    safe_x = torch.where(inside, x, (lo + hi) / 2)
    root = torch.sqrt(((hi - safe_x) * (safe_x - lo)).clamp_min(0))
    pdf = root / (2 * math.pi * sigma2 * ratio * safe_x)
    return conv.out(torch.where(inside, pdf, torch.zeros_like(pdf)))


def marchenko_pastur_cdf(x, ratio, sigma2=1.0):
    """Distribution function of the Marchenko-Pastur law, atom included.

    F(x) = max(0, 1 - 1/ratio) [x >= 0] + I(t) / (2 pi ratio) with t = x / sigma2 clipped to
    [a, b] = [(1 - sqrt(ratio))^2, (1 + sqrt(ratio))^2] and the antiderivative of
    sqrt((b - t)(t - a)) / t,

        I(t) = r + (a + b)/2 (arcsin((2t - a - b)/(b - a)) + pi/2)
                 - sqrt(ab) (arcsin(((a + b) t - 2ab) / (t (b - a))) + pi/2),
        r = sqrt((b - t)(t - a)),

    which reaches 2 pi min(1, ratio) at t = b (Bai & Silverstein 2010, section 3.1).
    """
    conv = _Out((x, ratio, sigma2))
    x, ratio, sigma2 = conv.tensor(x), conv.tensor(ratio), conv.tensor(sigma2)
    _positive("ratio", ratio)
    _positive("sigma2", sigma2)
    a, b = _mp_edges(ratio, torch.ones_like(sigma2))
    t = torch.maximum(torch.minimum(x / sigma2, b), a)
    t = torch.where(t > 0, t, b)  # t = 0 only when a = 0 and x <= 0; masked below
    r = torch.sqrt(((b - t) * (t - a)).clamp_min(0))
    width = b - a
    first = torch.arcsin(((2 * t - a - b) / width).clamp(-1, 1)) + math.pi / 2
    second = torch.arcsin((((a + b) * t - 2 * a * b) / (t * width)).clamp(-1, 1)) + math.pi / 2
    integral = r + (a + b) / 2 * first - torch.sqrt(a * b) * second
    continuous = torch.where(x / sigma2 > a, integral / (2 * math.pi * ratio), 0.0)
    continuous = torch.where(x / sigma2 >= b, torch.clamp(1 / ratio, max=1.0), continuous)
    atom = torch.where(x >= 0, (1 - 1 / ratio).clamp_min(0), 0.0)
    return conv.out(atom + continuous)


# --------------------------------------------------------------------------- Stieltjes


def stieltjes(z, eigenvalues=None, *, nodes=None, weights=None, density=None):
    """Stieltjes transform g(z) = P^-1 sum_j 1 / (z - lambda_j) of an empirical spectrum.

    Sign convention g(z) = P^-1 Tr (z - M)^-1 (module docstring), so g(z) ~ 1/z for large |z|
    and Im g > 0 below the real axis; the RIE shrinkage xi = lambda - 2 sigma^2 Re
    g(lambda - i eta) uses it as is (DESIGN section 4). Give either ``eigenvalues`` (the full
    spectrum, [P]) or stochastic Lanczos quadrature nodes and weights ([n_probes, n_steps], or
    a :class:`~curvlab.results.SpectralDensity` as ``density``); quadrature gives
    g(z) ~ mean over probes of sum_j w_pj / (z - node_pj). Vectorized over z (any shape);
    returns complex values of z's shape.
    """
    if density is not None:
        if nodes is not None or weights is not None:
            raise InvalidInputError("pass either density= or nodes=/weights=, not both")
        nodes, weights = density.nodes, density.weights
    given = sum(v is not None for v in (eigenvalues, nodes))
    if given != 1 or (nodes is None) != (weights is None):
        raise InvalidInputError(
            "pass eigenvalues=, or nodes= and weights= (or density=) from spectral_density()"
        )
    conv = _Out((z, eigenvalues if nodes is None else nodes))
    z = conv.tensor(z, complex_=True)
    if nodes is None:
        points = conv.tensor(eigenvalues).reshape(-1)
        mass = torch.full_like(points, 1.0 / max(points.numel(), 1))
    else:
        points, mass = conv.tensor(nodes), conv.tensor(weights)
        if points.shape != mass.shape or points.dim() not in (1, 2):
            raise InvalidInputError(
                f"nodes and weights must share a shape [n_probes, n_steps]; got "
                f"{tuple(points.shape)} and {tuple(mass.shape)}"
            )
        n_probes = points.shape[0] if points.dim() == 2 else 1
        points, mass = points.reshape(-1), mass.reshape(-1) / n_probes
    if points.numel() == 0 or not bool(torch.isfinite(points).all() & torch.isfinite(mass).all()):
        raise InvalidInputError("the spectrum must be non-empty and finite")
    flat = z.reshape(-1)
    step = max(1, _CHUNK // points.numel())
    parts = [(mass / (block[:, None] - points)).sum(dim=1) for block in flat.split(step)]
    g = torch.cat(parts) if parts else flat.clone()
    return conv.out(g.reshape(z.shape))


# --------------------------------------------------------------------------- bulk and outliers


@dataclass(frozen=True)
class BulkFit:
    """A fitted noise bulk and the outliers beyond it (paper section 4, Fig. 2a).

    ``center`` and ``sigma`` are the bulk's mean and standard deviation (semicircle: its
    centre and sigma; Marchenko-Pastur: sigma2 = center and ratio = (sigma / center)^2).
    ``edge_stderr`` is the standard error of the edges from the quadrature's probe-to-probe
    spread (0 for an exact spectrum). ``outliers`` (descending, float64) are the given
    eigenvalues above ``upper`` or below ``lower``, the edges widened by the Tracy-Widom
    margin plus ``EDGE_STDERR_Z`` standard errors.
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
    """
    if isinstance(eigenvalues, SpectralDensity):
        if density is not None:
            raise InvalidInputError("pass one SpectralDensity, not two")
        density, eigenvalues = eigenvalues, None
    if density is not None:
        if nodes is not None or weights is not None:
            raise InvalidInputError("pass either density= or nodes=/weights=, not both")
        nodes, weights = density.nodes, density.weights
    if model not in _MODELS:
        raise InvalidInputError(f"model must be one of {_MODELS}; got {model!r}")
    if not (tw_quantile >= 0 and math.isfinite(tw_quantile)):
        raise InvalidInputError(f"tw_quantile must be finite and >= 0; got {tw_quantile}")
    if (nodes is None) != (weights is None):
        raise InvalidInputError("pass nodes= and weights= together (or density=)")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise InvalidInputError(f"sigma must be finite and > 0; got {sigma}")
    if eigenvalues is None and nodes is None:
        raise InvalidInputError(
            "pass eigenvalues=, or a SpectralDensity (with size=) from spectral_density()"
        )

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

    lo, hi = -math.inf, math.inf
    flagged = torch.zeros_like(candidates, dtype=torch.bool)
    while True:
        if 2 * int(flagged.sum()) >= size:
            raise InvalidInputError(
                "over half the spectrum was flagged: it has no semicircle-like bulk; "
                "try model='marchenko-pastur' or inspect the spectrum with plot_spectral_density"
            )
        m1, m2 = _bulk_moments(nodes, weights, lo, hi)
        if model == "semicircle":
            center, scale = _deflate_spikes(m1, m2, candidates[flagged], size, sigma)
        else:
            center = m1
            scale = math.sqrt(max(m2 - m1**2, 0.0)) if sigma is None else sigma
        left, right, margin = _edges(model, center, scale, size, tw_quantile)
        stderr = _edge_stderr(nodes, weights, lo, hi, model, size, sigma)
        lo = left - margin - EDGE_STDERR_Z * stderr
        hi = right + margin + EDGE_STDERR_Z * stderr
        new = flagged | (candidates > hi) | (candidates < lo)
        if torch.equal(new, flagged):
            break
        flagged = new
    outliers = candidates[flagged].sort(descending=True).values
    if candidates.numel() < size and outliers.numel() == candidates.numel() > 0:
        warnings.warn(
            f"all {candidates.numel()} given eigenvalues are outliers; there may be more: "
            "compute more extreme eigenpairs",
            CurvlabWarning,
            stacklevel=2,
        )
    return BulkFit(
        edge_left=left,
        edge_right=right,
        center=center,
        sigma=scale,
        tracy_widom_margin=margin,
        edge_stderr=stderr,
        outliers=outliers,
        n_outliers=int(outliers.numel()),
        size=size,
        method=model,
    )


def detect_outliers(eigenvalues=None, **kwargs) -> torch.Tensor:
    """The outliers of :func:`fit_bulk_edge` (same arguments), descending."""
    return fit_bulk_edge(eigenvalues, **kwargs).outliers


# --------------------------------------------------------------------------- BBP / Theorem 1


def bbp_outlier(nu, sigma):
    """Limit of the eigenvalue created by a spike nu theta theta^T in Wigner noise of scale
    sigma (BBP transition; Benaych-Georges & Nadakuditi 2011, section 3.1; DESIGN section 4):
    nu + sigma^2 / nu when |nu| > sigma, else the bulk edge on the spike's side,
    sign(nu) 2 sigma (+2 sigma for nu = 0).
    """
    conv = _Out((nu, sigma))
    nu, sigma = conv.tensor(nu), conv.tensor(sigma)
    _positive("sigma", sigma, allow_zero=True)
    above = nu.abs() > sigma
    safe_nu = torch.where(above, nu, torch.ones_like(nu))
    side = torch.where(nu < 0, -1.0, 1.0).to(nu.dtype)
    return conv.out(torch.where(above, nu + sigma**2 / safe_nu, side * 2 * sigma))


def bbp_overlap(nu, sigma):
    """Limit of |<theta, phi>|^2 between a spike's direction and its eigenvector:
    1 - sigma^2 / nu^2 when |nu| > sigma, else 0 (Benaych-Georges & Nadakuditi 2011,
    section 3.1; DESIGN section 4).
    """
    conv = _Out((nu, sigma))
    nu, sigma = conv.tensor(nu), conv.tensor(sigma)
    _positive("sigma", sigma, allow_zero=True)
    above = nu.abs() > sigma
    safe_nu = torch.where(above, nu, torch.ones_like(nu))
    return conv.out(torch.where(above, 1 - sigma**2 / safe_nu**2, torch.zeros_like(nu)))


def theorem1_overlap(nu, sigma_elem, size, batch_size):
    """The paper's Theorem 1 (eq. 8): |theta_i^T phi_i|^2 -> 1 - P sigma^2 / (B nu_i^2) if
    |nu_i| > sqrt(P / B) sigma, else 0, with sigma the per-element sampling noise of one
    sample's Hessian, P = ``size`` and B = ``batch_size``. It is :func:`bbp_overlap` with
    sigma^2 -> P sigma_elem^2 / B; ``bbp_outlier(nu, sqrt(P / B) * sigma_elem)`` gives the
    matching outlier location.
    """
    conv = _Out((nu, sigma_elem, size, batch_size))
    nu, sigma_elem, size, batch_size = (conv.tensor(v) for v in (nu, sigma_elem, size, batch_size))
    _positive("size", size)
    _positive("batch_size", batch_size)
    return conv.out(bbp_overlap(nu, torch.sqrt(size / batch_size) * sigma_elem))


def r_est_curv(lambda_max, lambda_min, damping):
    """Estimated curvature learning-rate ratio R = 1 + (lambda_1 - lambda_P) / delta, the ratio
    of the flattest to the sharpest direction's step size with damping delta (paper section
    6.1, with eq. 5; DESIGN section 4).
    """
    conv = _Out((lambda_max, lambda_min, damping))
    lam_max, lam_min, damping = (conv.tensor(v) for v in (lambda_max, lambda_min, damping))
    _positive("damping", damping)
    return conv.out(1 + (lam_max - lam_min) / damping)


# --------------------------------------------------------------------------- test matrices


def goe(
    size: int,
    sigma: float = 1.0,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """X = sigma (G + G^T) / sqrt(2P), G with iid N(0, 1) entries: off-diagonal variance
    sigma^2 / P, semicircle on [-2 sigma, 2 sigma] (DESIGN section 4)."""
    if size < 1 or sigma < 0:
        raise InvalidInputError(f"need size >= 1 and sigma >= 0; got {size}, {sigma}")
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
