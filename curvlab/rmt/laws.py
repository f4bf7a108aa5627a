"""The random-matrix laws: the Wigner semicircle, Marchenko-Pastur, Stieltjes transforms, the
BBP transition and the paper's Theorem 1 (DESIGN section 4, paper sections 4-6).

Conventions (DESIGN section 4): the Wigner noise X = sigma (G + G^T) / sqrt(2P) has the
semicircle law on [-2 sigma, 2 sigma], so ``sigma^2 = P^-1 E Tr X^2``; the Stieltjes transform
is g(z) = P^-1 Tr (z - M)^-1 (Bun, Bouchaud & Potters 2017, "Cleaning large correlation
matrices", Phys. Rep. 666, section 2), so g(z) ~ 1/z at infinity and the rotation-invariant
estimator reads xi = lambda - 2 sigma^2 Re g(lambda - i eta). Every function accepts floats,
numpy arrays or torch tensors and broadcasts (see ``curvlab.rmt``).
"""

from __future__ import annotations

import math

import torch

from curvlab.errors import InvalidInputError
from curvlab.rmt._convert import _Out, _positive

__all__ = [
    "TW1_QUANTILE_95",
    "TW1_QUANTILE_99",
    "bbp_outlier",
    "bbp_overlap",
    "marchenko_pastur_cdf",
    "marchenko_pastur_pdf",
    "r_est_curv",
    "semicircle_cdf",
    "semicircle_pdf",
    "semicircle_stieltjes",
    "stieltjes",
    "theorem1_overlap",
]

# Quantiles of the GOE Tracy-Widom law TW1 (Tracy & Widom 1996; Johnstone 2001, Ann. Stat.
# 29(2), Table 1), re-derived here from Bornemann's Fredholm-determinant form
# F1(s) = det(I - K), K(x, y) = Ai((x + y) / 2) / 2 on L^2(s, inf): 0.97932, 2.02345.
TW1_QUANTILE_95 = 0.9793
TW1_QUANTILE_99 = 2.0234

_CHUNK = 1 << 22  # complex entries per block in the Stieltjes sum


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
