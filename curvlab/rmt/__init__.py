"""Random-matrix formulas for curvature spectra (DESIGN section 4, paper sections 4-6).

Pure math on torch/numpy, no backend, in three modules by job:

- :mod:`curvlab.rmt.laws`: the semicircle and Marchenko-Pastur laws, Stieltjes transforms,
  the BBP transition, the paper's Theorem 1 and R_est-curv;
- :mod:`curvlab.rmt.bulk`: fitting the noise bulk of a spectrum and flagging the outliers
  beyond its Tracy-Widom edge (:func:`fit_bulk_edge`);
- :mod:`curvlab.rmt.synthetic`: GOE and spiked Wigner matrices.

Every public name is available here (``from curvlab import rmt; rmt.fit_bulk_edge(...)``).
Vectorized functions accept floats, numpy arrays or torch tensors and broadcast; they return a
torch tensor when any array argument is a tensor (its dtype and device when floating), else a
numpy array (a Python number when 0-d).

Conventions (DESIGN section 4): the Wigner noise X = sigma (G + G^T) / sqrt(2P) has the
semicircle law on [-2 sigma, 2 sigma], so ``sigma^2 = P^-1 E Tr X^2``; the Stieltjes transform
is g(z) = P^-1 Tr (z - M)^-1 (Bun, Bouchaud & Potters 2017, "Cleaning large correlation
matrices", Phys. Rep. 666, section 2), so g(z) ~ 1/z at infinity and the rotation-invariant
estimator reads xi = lambda - 2 sigma^2 Re g(lambda - i eta).
"""

from curvlab.rmt.bulk import EDGE_STDERR_Z, BulkFit, detect_outliers, fit_bulk_edge
from curvlab.rmt.laws import (
    TW1_QUANTILE_95,
    TW1_QUANTILE_99,
    bbp_outlier,
    bbp_overlap,
    marchenko_pastur_cdf,
    marchenko_pastur_pdf,
    r_est_curv,
    semicircle_cdf,
    semicircle_pdf,
    semicircle_stieltjes,
    stieltjes,
    theorem1_overlap,
)
from curvlab.rmt.synthetic import goe, spiked_wigner

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
