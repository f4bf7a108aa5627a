"""Linear shrinkage rules toward a scaled identity (DESIGN.md section 4).

With the statistics of n observations M_k (mean S, dimension p; see ``_traces``):

- Ledoit–Wolf (Ledoit & Wolf 2004, as scikit-learn implements it): target mu I with
  mu = tr S / p, d2 = ||S - mu I||^2 / p, b2 = sum_k ||M_k - S||^2 / (n^2 p),
  rho = min(b2, d2) / d2.
- OAS (Chen et al. 2010, eq. 23 as scikit-learn implements it): target mu I,
  rho = min(1, (tr S^2 + (tr S)^2) / ((n + 1) (tr S^2 - (tr S)^2 / p))).
- RMTLinear (the paper, eq. 15): target I, delta = P^-1 Tr X^2 the noise variance of the
  estimate, rho = delta / (1 + delta).
- FixedShrinkage: a given rho or delta toward tau I.

For vector samples LedoitWolf and OAS equal ``sklearn.covariance.LedoitWolf``/``OAS``
(p = 1 gives shrinkage 0 as there: every shrinkage gives the same 1 x 1 matrix).
"""

from __future__ import annotations

from typing import Any

from curvlab._random import Seed
from curvlab.errors import InvalidInputError
from curvlab.estimator import CurvatureEstimator
from curvlab.shrinkage._traces import TraceStats
from curvlab.shrinkage.base import LinearShrinkage
from curvlab.shrinkage.conversions import damping_to_shrinkage, shrinkage_to_damping


def _spectral_variance(st: TraceStats) -> float:
    """||S - mu I||_F^2 = tr S^2 - (tr S)^2 / p."""
    return st.mean("trace_sq") - st.mean("trace_squared") / st.p


class LedoitWolf(LinearShrinkage):
    """Ledoit–Wolf shrinkage toward (tr S / p) I.

    Parameters
    ----------
    assume_centered : vector samples are not centred (the mean is taken as zero).
    store_precision : also store ``precision_`` (explicit inputs).
    exact : for estimators: None uses the n x n Gram matrix of per-sample gradients when
        they exist (curvature "ef") and shared probes otherwise; True requires the Gram
        route; False forces probes.
    n_probes, seed : shared unit probes of the matrix-free route.

    ``noise_variance_`` is b2 = sum_k ||M_k - S||^2 / (n^2 p), the estimated per-dimension
    squared error of S (before the cap at d2).
    """

    def __init__(self, *, assume_centered: bool = False, store_precision: bool = True,
                 exact: bool | None = None, n_probes: int = 30, seed: Seed = 0):
        self.assume_centered = assume_centered
        self.store_precision = store_precision
        self.exact = exact
        self.n_probes = n_probes
        self.seed = seed

    def _rule(self, st: TraceStats) -> tuple[float, float, float]:
        p, n = st.p, st.n
        mu = st.mean("trace") / p
        b2 = st.mean("dispersion") / (n**2 * p)
        if p == 1:
            return 0.0, mu, b2
        d2 = _spectral_variance(st) / p
        b2_capped = min(b2, d2)
        rho = 0.0 if b2_capped == 0 else b2_capped / d2
        return min(max(rho, 0.0), 1.0), mu, b2


class OAS(LinearShrinkage):
    """Oracle approximating shrinkage toward (tr S / p) I (parameters as LedoitWolf).

    ``noise_variance_`` is the noise the chosen rho implies, rho * ||S - mu I||^2 / p.
    """

    def __init__(self, *, assume_centered: bool = False, store_precision: bool = True,
                 exact: bool | None = None, n_probes: int = 30, seed: Seed = 0):
        self.assume_centered = assume_centered
        self.store_precision = store_precision
        self.exact = exact
        self.n_probes = n_probes
        self.seed = seed

    def _rule(self, st: TraceStats) -> tuple[float, float, float]:
        p, n = st.p, st.n
        mu = st.mean("trace") / p
        if p == 1:
            return 0.0, mu, 0.0
        spread = _spectral_variance(st)
        num = st.mean("trace_sq") + st.mean("trace_squared")
        den = (n + 1) * spread
        rho = 1.0 if den == 0 else min(num / den, 1.0)
        rho = max(rho, 0.0)
        return rho, mu, rho * spread / p


class RMTLinear(LinearShrinkage):
    """The paper's rule: damping delta = P^-1 Tr X^2 toward the identity, rho = delta/(1+delta).

    X is the noise of the curvature estimate; its variance comes from the dispersion of the
    per-sample matrices, s2 = sum_k ||M_k - S||^2 / ((n - 1) p) (unbiased for
    P^-1 E||M_k - E M||^2):

    - ``batch_size=None``: the estimate shrunk is the mean S of all n samples, treated as
      iid draws, so delta = s2 / n;
    - ``batch_size=B``: the damping for the curvature of a mini-batch of B drawn without
      replacement from the n samples, delta = (1/B - 1/n) s2 (DESIGN.md section 4); for a
      ``CurvatureEstimator`` this is ``est.noise_variance(B, n_probes, method, subsample,
      seed)`` itself (``noise_estimate_`` keeps its NoiseEstimate). The fitted matrix is
      still (1 - rho) S + rho I.

    ``noise_variance_`` and ``damping_`` are delta.
    """

    def __init__(self, *, batch_size: int | None = None, assume_centered: bool = False,
                 store_precision: bool = True, exact: bool | None = None,
                 n_probes: int = 30, method: str = "unbiased", subsample: int | None = None,
                 seed: Seed = 0):
        self.batch_size = batch_size
        self.assume_centered = assume_centered
        self.store_precision = store_precision
        self.exact = exact
        self.n_probes = n_probes
        self.method = method
        self.subsample = subsample
        self.seed = seed

    def fit(self, X: Any, y: Any = None) -> RMTLinear:
        self._noise = None
        if self.batch_size is not None and isinstance(X, CurvatureEstimator):
            from curvlab.noise import noise_variance

            self._noise = noise_variance(
                X, batch_size=self.batch_size, n_probes=self.n_probes, method=self.method,
                subsample=self.subsample, seed=self.seed,
            )
        super().fit(X, y)
        if self._noise is not None:
            self.noise_estimate_ = self._noise
            self.n_matvecs_ = self._noise.n_matvecs
            self.shrinkage_stderr_ = self._noise.stderr / (1.0 + self._noise.value) ** 2
        return self

    def _operator_stats(self, op: Any) -> TraceStats | None:
        return None if self._noise is not None else super()._operator_stats(op)

    def _rule(self, st: TraceStats | None) -> tuple[float, float, float]:
        if st is None:
            delta = max(float(self._noise.value), 0.0)
        else:
            n = st.n
            if n < 2:
                raise InvalidInputError("the RMT rule needs at least 2 samples")
            s2 = st.mean("dispersion") / ((n - 1) * st.p)
            B = self.batch_size
            if B is not None and not 1 <= B <= n:
                raise InvalidInputError(f"batch_size must lie in [1, {n}], got {B}")
            delta = max(s2 / n if B is None else (1.0 / B - 1.0 / n) * s2, 0.0)
        return damping_to_shrinkage(delta), 1.0, delta


class FixedShrinkage(LinearShrinkage):
    """A given shrinkage rho (or damping delta) toward target_scale * I.

    Works on any operator (only ``matvec`` is needed). ``noise_variance_`` is None.
    """

    _needs_stats = False

    def __init__(self, *, shrinkage: float | None = None, damping: float | None = None,
                 target_scale: float = 1.0, assume_centered: bool = False,
                 store_precision: bool = True):
        self.shrinkage = shrinkage
        self.damping = damping
        self.target_scale = target_scale
        self.assume_centered = assume_centered
        self.store_precision = store_precision

    def _rule(self, st: TraceStats | None) -> tuple[float, float, None]:
        if (self.shrinkage is None) == (self.damping is None):
            raise InvalidInputError("give exactly one of shrinkage= or damping=")
        tau = float(self.target_scale)
        if self.shrinkage is not None:
            rho = float(self.shrinkage)
            shrinkage_to_damping(rho, tau)  # validates rho and tau
        else:
            rho = damping_to_shrinkage(self.damping, tau)
        return rho, tau, None
