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

    Parameters
    ----------
    x : float, array or tensor
        Points.
    sigma : float, array or tensor, default 1.0
        Scale sigma > 0 (sigma^2 = P^-1 Tr X^2, the paper's delta for the Hessian noise).

    Returns
    -------
    float, array or tensor
        The density at ``x`` (0 outside the support), broadcast over the arguments.

    References
    ----------
    E. P. Wigner, "On the distribution of the roots of certain symmetric matrices", Ann.
    Math. 67 (1958). D. Granziol and N. Baskerville, "A random matrix theory approach to
    damping in deep learning", J. Phys. Complex. 3 (2022), appendix A (the Hessian noise
    converges to the semicircle).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.rmt import semicircle_pdf
    >>> semicircle_pdf(np.array([0.0, 2.0, 3.0]))  # 1/pi at the centre, 0 from the edge on
    array([0.31830989, 0.        , 0.        ])
    """
    conv = _Out((x, sigma))
    x, sigma = conv.tensor(x), conv.tensor(sigma)
    _positive("sigma", sigma)
    inside = (4 * sigma**2 - x**2).clamp_min(0)
    return conv.out(torch.sqrt(inside) / (2 * math.pi * sigma**2))


def semicircle_cdf(x, sigma=1.0):
    """Distribution function of the semicircle: with u = clip(x / (2 sigma), -1, 1),
    F(x) = 1/2 + (u sqrt(1 - u^2) + arcsin u) / pi (the integral of :func:`semicircle_pdf`).

    Parameters
    ----------
    x : float, array or tensor
        Points.
    sigma : float, array or tensor, default 1.0
        Scale sigma > 0.

    Returns
    -------
    float, array or tensor
        F(x) in [0, 1], broadcast over the arguments.

    References
    ----------
    E. P. Wigner, "On the distribution of the roots of certain symmetric matrices", Ann.
    Math. 67 (1958).

    Examples
    --------
    >>> import torch
    >>> from curvlab.rmt import semicircle_cdf
    >>> semicircle_cdf(torch.tensor([-2.0, 0.0, 2.0]))
    tensor([0.0000, 0.5000, 1.0000])
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

    Parameters
    ----------
    z : complex, float, array or tensor
        Points off the cut (complex results for any input).
    sigma : float, array or tensor, default 1.0
        Scale sigma > 0.

    Returns
    -------
    complex, array or tensor
        g(z), broadcast over the arguments.

    References
    ----------
    M. Potters and J.-P. Bouchaud, "A First Course in Random Matrix Theory", Cambridge
    University Press (2020), chapter 2.

    Examples
    --------
    >>> from curvlab.rmt import semicircle_stieltjes
    >>> semicircle_stieltjes(3.0)  # (3 - sqrt(5)) / 2
    (0.3819660112501051+0j)
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

    Parameters
    ----------
    x : float, array or tensor
        Points.
    ratio : float, array or tensor
        p / n > 0.
    sigma2 : float, array or tensor, default 1.0
        The entries' variance, > 0.

    Returns
    -------
    float, array or tensor
        The density at ``x`` (0 outside [l_-, l_+]), broadcast over the arguments.

    References
    ----------
    V. A. Marchenko and L. A. Pastur, "Distribution of eigenvalues for some sets of random
    matrices", Mat. Sb. 72(114) (1967). Z. Bai and J. W. Silverstein, "Spectral Analysis of
    Large Dimensional Random Matrices", Springer (2010), section 3.1.

    Examples
    --------
    >>> from curvlab.rmt import marchenko_pastur_pdf
    >>> round(marchenko_pastur_pdf(1.0, ratio=0.25), 6)  # support [0.25, 2.25]
    0.616404
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

    Parameters
    ----------
    x : float, array or tensor
        Points.
    ratio : float, array or tensor
        p / n > 0.
    sigma2 : float, array or tensor, default 1.0
        The entries' variance, > 0.

    Returns
    -------
    float, array or tensor
        F(x) in [0, 1] (the atom at 0 included), broadcast over the arguments.

    References
    ----------
    V. A. Marchenko and L. A. Pastur, "Distribution of eigenvalues for some sets of random
    matrices", Mat. Sb. 72(114) (1967). Z. Bai and J. W. Silverstein, "Spectral Analysis of
    Large Dimensional Random Matrices", Springer (2010), section 3.1.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.rmt import marchenko_pastur_cdf
    >>> marchenko_pastur_cdf(np.array([0.0, 10.0]), ratio=2.0)  # atom 1 - 1/2 at zero
    array([0.5, 1. ])
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

    Parameters
    ----------
    z : complex, float, array or tensor
        Points (off the spectrum).
    eigenvalues : array or tensor, optional
        The full spectrum [P].
    nodes : array or tensor, optional
        Quadrature nodes [n_probes, n_steps] (with ``weights``).
    weights : array or tensor, optional
        Quadrature weights of ``nodes``, each probe's summing to one.
    density : SpectralDensity, optional
        A result of ``spectral_density`` (its nodes and weights).

    Returns
    -------
    complex, array or tensor
        g(z) with z's shape.

    Raises
    ------
    InvalidInputError
        Unless exactly one of ``eigenvalues``, ``nodes``/``weights`` and ``density`` is
        given, or when the spectrum is empty or not finite.

    References
    ----------
    J. Bun, J.-P. Bouchaud and M. Potters, "Cleaning large correlation matrices: tools from
    random matrix theory", Phys. Rep. 666 (2017), section 2. S. Ubaru, J. Chen and Y. Saad,
    "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIAM J. Matrix Anal.
    Appl. 38 (2017).

    Examples
    --------
    >>> import torch
    >>> from curvlab.rmt import stieltjes
    >>> stieltjes(2.0, eigenvalues=torch.tensor([0.0, 1.0]))  # (1/2 + 1/1) / 2
    tensor(0.7500+0.j)
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

    Parameters
    ----------
    nu : float, array or tensor
        The spike's strength.
    sigma : float, array or tensor
        The noise scale, >= 0.

    Returns
    -------
    float, array or tensor
        The outlier's limit location, broadcast over the arguments.

    References
    ----------
    J. Baik, G. Ben Arous and S. Péché, "Phase transition of the largest eigenvalue for
    nonnull complex sample covariance matrices", Ann. Probab. 33(5) (2005). F.
    Benaych-Georges and R. R. Nadakuditi, "The eigenvalues and eigenvectors of finite, low
    rank perturbations of large random matrices", Adv. Math. 227 (2011).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.rmt import bbp_outlier
    >>> bbp_outlier(np.array([0.5, 2.0]), sigma=1.0)  # below: the edge 2; above: 2 + 1/2
    array([2. , 2.5])
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

    Parameters
    ----------
    nu : float, array or tensor
        The spike's strength.
    sigma : float, array or tensor
        The noise scale, >= 0.

    Returns
    -------
    float, array or tensor
        The squared overlap in [0, 1), broadcast over the arguments.

    References
    ----------
    J. Baik, G. Ben Arous and S. Péché, "Phase transition of the largest eigenvalue for
    nonnull complex sample covariance matrices", Ann. Probab. 33(5) (2005). F.
    Benaych-Georges and R. R. Nadakuditi, "The eigenvalues and eigenvectors of finite, low
    rank perturbations of large random matrices", Adv. Math. 227 (2011).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.rmt import bbp_overlap
    >>> bbp_overlap(np.array([0.5, 2.0]), sigma=1.0)
    array([0.  , 0.75])
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

    Parameters
    ----------
    nu : float, array or tensor
        The true Hessian's eigenvalue nu_i.
    sigma_elem : float, array or tensor
        The per-element sampling noise of one sample's Hessian.
    size : float, array or tensor
        P, the number of parameters (> 0).
    batch_size : float, array or tensor
        B (> 0).

    Returns
    -------
    float, array or tensor
        The limit squared overlap, broadcast over the arguments.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), Theorem 1 (eq. 8).

    Examples
    --------
    >>> from curvlab.rmt import theorem1_overlap
    >>> round(theorem1_overlap(2.0, sigma_elem=0.1, size=400, batch_size=100), 6)
    0.99
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

    Parameters
    ----------
    lambda_max : float, array or tensor
        lambda_1, the largest eigenvalue of the curvature estimate.
    lambda_min : float, array or tensor
        lambda_P, the smallest.
    damping : float, array or tensor
        delta > 0.

    Returns
    -------
    float, array or tensor
        R, broadcast over the arguments.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), section 6.1 and eq. 5.

    Examples
    --------
    >>> from curvlab.rmt import r_est_curv
    >>> r_est_curv(10.0, 0.0, damping=0.1)
    101.0
    """
    conv = _Out((lambda_max, lambda_min, damping))
    lam_max, lam_min, damping = (conv.tensor(v) for v in (lambda_max, lambda_min, damping))
    _positive("damping", damping)
    return conv.out(1 + (lam_max - lam_min) / damping)
