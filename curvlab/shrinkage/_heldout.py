"""When the rotation-invariant estimator's model fails: diagnostics and a held-out choice.

The additive-noise RIE assumes M = C + X with X full-rank and rotation invariant of
variance sigma^2 = P^-1 Tr X^2. Real curvature breaks this (issue 16: on a digits MLP the
RIE is 30-70x worse than the raw batch Hessian at every batch size):

- a cluster of zero eigenvalues: a batch's curvature of rank below P, or directions that
  no sample moves (always-zero inputs), where the noise is not rotation invariant;
- a noise variance from the samples' dispersion that disagrees with the spread of the
  spectrum's bulk (a semicircle fit by moments, ``curvlab.rmt.fit_bulk_edge``).

:func:`diagnose` reports both. :func:`choose` then picks, by K-fold held-out score, among
the raw estimate, the RIE, Ledoit–Wolf and the paper's RMT rule: each candidate is fitted on
K - 1 folds of the units (per-sample matrices, or fold means of an estimator) and scored by
||H_hat - T_k||_F^2 against the held-out fold's mean T_k. Since T_k is independent of the
fit, the expected score is the candidate's squared error plus a constant common to all
candidates (``heldout_score``'s argument). The choice is conservative: the candidate with
the largest lower confidence bound g - ``Z_GAIN`` se of its mean gain g over the raw
estimate (se: the standard error of the paired gains over the folds), and the raw estimate
when no bound is positive. The held-out choice cannot see a finite population: batches
drawn without replacement from n samples have (1 - B/n) times the noise the samples'
dispersion implies, so with B/n large the linear rules over-shrink slightly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from curvlab.errors import CurvlabError

F64 = torch.float64
#: fraction of (numerically) zero eigenvalues above which the model is refused
ZERO_FRACTION = 0.01
#: largest factor between the dispersion's and the bulk fit's noise variance
NOISE_RATIO = 2.0
#: standard errors of the paired held-out gain subtracted before comparing candidates
Z_GAIN = 2.0


def diagnose(values: torch.Tensor, noise: float, p: int, *, nodes=None, weights=None,
             dtype: torch.dtype = F64) -> dict:
    """The additive-noise model's checks on a spectrum (all of it, or top values + SLQ).

    Returns
    -------
    dict
        ``zero_fraction`` (None without the full spectrum), ``noise_variance`` (sigma^2 in
        use), ``bulk_noise_variance`` (the semicircle fit's, None if the fit failed),
        ``reasons`` (why the model fails; empty when it holds) and ``holds``.
    """
    from curvlab.rmt import fit_bulk_edge

    values = values.to(F64)
    reasons = []
    zero_fraction = None
    if nodes is None:
        tol = math.sqrt(torch.finfo(dtype).eps) * float(values.abs().max())
        zero_fraction = float((values.abs() <= tol).to(F64).mean())
        if zero_fraction > ZERO_FRACTION:
            reasons.append(f"{100 * zero_fraction:.0f}% of the eigenvalues are zero (a "
                           "rank-deficient or structurally zero curvature)")
    kw = {} if nodes is None else {"nodes": nodes, "weights": weights, "size": p}
    try:
        bulk = fit_bulk_edge(values, **kw).sigma ** 2
    except (CurvlabError, ValueError, RuntimeError):
        bulk = None
        reasons.append("the semicircle bulk fit failed")
    if bulk is not None and noise > 0:
        ratio = noise / bulk if bulk > 0 else math.inf
        if not 1 / NOISE_RATIO <= ratio <= NOISE_RATIO:
            reasons.append(f"the samples' noise variance {noise:.3g} is {ratio:.3g}x the "
                           f"bulk's {bulk:.3g}")
    return {"zero_fraction": zero_fraction, "noise_variance": noise,
            "bulk_noise_variance": bulk, "reasons": reasons, "holds": not reasons}


def linear_candidates() -> dict[str, Callable]:
    """name -> trace statistics of the units -> (rho, tau) of the linear rules."""
    from curvlab.shrinkage.linear import LedoitWolf, RMTLinear

    def rule(cls):
        return lambda stats: cls(store_precision=False)._rule(stats)[:2]

    return {"ledoit_wolf": rule(LedoitWolf), "rmt": rule(RMTLinear)}


def _dense_fits(units: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every candidate fitted on the units (already validated), as dense float64 matrices:
    their statistics are computed once and shared, as a fit of each would compute them."""
    from curvlab.shrinkage._traces import matrix_stats
    from curvlab.shrinkage.nonlinear import RotationInvariant, noise_of_mean

    stats, mean = matrix_stats(units, check=False)
    out = {"raw": mean}
    eye = torch.eye(mean.shape[0], dtype=F64, device=mean.device)
    for name, rule in linear_candidates().items():
        rho, tau = rule(stats)
        out[name] = (1 - rho) * mean + rho * tau * eye
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rie = RotationInvariant(check_model=False, noise_variance=noise_of_mean(stats))
        rie.fit(mean.to(units.dtype))
    out["rotation_invariant"] = torch.as_tensor(rie.covariance_).to(F64)
    return out


def choose(units: torch.Tensor, folds: int) -> tuple[str, dict]:
    """(the chosen candidate, {name: (mean gain over raw, its standard error)}).

    ``units`` [m, p, p] are exchangeable: per-sample matrices or fold means.
    """
    m = units.shape[0]
    folds = min(folds, m)
    assign = torch.arange(m) % folds
    scores: dict[str, list[float]] = {}
    for k in range(folds):
        held = units[assign == k].to(F64).mean(dim=0)
        for name, fit in _dense_fits(units[assign != k]).items():
            scores.setdefault(name, []).append(float(((fit - held) ** 2).sum()))
    raw = torch.tensor(scores["raw"], dtype=F64)
    gains = {}
    for name, values in scores.items():
        if name == "raw":
            continue
        diff = raw - torch.tensor(values, dtype=F64)
        gains[name] = (float(diff.mean()), float(diff.std() / math.sqrt(folds)))
    bounds = {n: g - Z_GAIN * se for n, (g, se) in gains.items()}
    best = max(bounds, key=bounds.get)
    return (best if bounds[best] > 0 else "raw"), gains
