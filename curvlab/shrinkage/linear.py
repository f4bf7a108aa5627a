"""Linear shrinkage rules toward a scaled identity (DESIGN.md section 4).

With the statistics of n observations M_k (mean S, dimension p; see ``_traces``):

- Ledoit–Wolf (Ledoit & Wolf 2004, as scikit-learn implements it): target mu I with
  mu = tr S / p, d2 = ||S - mu I||^2 / p, b2 = sum_k ||M_k - S||^2 / (n^2 p),
  rho = min(b2, d2) / d2.
- OAS (Chen et al. 2010, eq. 23 as scikit-learn implements it): target mu I,
  rho = min(1, (tr S^2 + (tr S)^2) / ((n + 1) ||S - mu I||^2)).
- ShrunkCovariance: a given rho toward mu I (scikit-learn's ``ShrunkCovariance``).
- RMTLinear (the paper, eq. 15): target I, delta = P^-1 Tr X^2 the noise variance of the
  estimate, rho = delta / (1 + delta).
- FixedShrinkage: a given rho or delta toward tau I.

For vector samples LedoitWolf, OAS and ShrunkCovariance equal scikit-learn's estimators of
the same names (p = 1 gives shrinkage 0 as there: every shrinkage gives the same 1 x 1
matrix; one sample warns and gives the zero matrix).

Every rule also fits a curvature estimator (products only; ``exact``, ``n_probes``,
``probe_batch``, ``seed`` choose between the exact Gram route of per-sample factors and
shared probes, whose memory ``_traces`` documents).
"""

from __future__ import annotations

from typing import Any

from curvlab._random import Seed
from curvlab.errors import InvalidInputError
from curvlab.estimator import CurvatureEstimator
from curvlab.shrinkage._traces import TraceStats
from curvlab.shrinkage.base import LinearShrinkage
from curvlab.shrinkage.conversions import damping_to_shrinkage, shrinkage_to_damping
from curvlab.validation import check_int, check_probability


class LedoitWolf(LinearShrinkage):
    """Ledoit–Wolf shrinkage toward (tr S / p) I.

    Parameters
    ----------
    store_precision : bool, default True
        Store ``precision_`` (explicit inputs; ``get_precision`` forms it otherwise).
    assume_centered : bool, default False
        Vector samples are not centred (the mean is taken as zero).
    block_size : int, default 1000
        Columns per float64 block of the Gram reduction (memory only, as in
        scikit-learn; the result does not depend on it).
    exact : bool or None, default None
        For estimators: None uses the n x n Gram matrix of per-sample factors when they
        exist (curvature "ef", GGN square roots) and shared probes otherwise; True requires
        the Gram route; False forces probes.
    n_probes : int, default 30
        Shared unit probes of the matrix-free route.
    probe_batch : int, default 1
        Probes whose per-sample products are held at once (about 2.5 [n, P] blocks of
        memory each; see ``curvlab.shrinkage._traces``).
    seed : int or torch.Generator, default 0
        Seeds the probes.

    Attributes
    ----------
    shrinkage_, target_scale_, damping_, shrinkage_stderr_ : float
        rho, mu, delta = mu rho / (1 - rho), the jackknife error over probes (0 if exact).
    noise_variance_ : float
        b2 = sum_k ||M_k - S||^2 / (n^2 p), the per-dimension squared error of S (before
        the cap at d2).
    covariance_, precision_, location_ : array or tensor
        Explicit inputs only (``precision_`` None unless ``store_precision``).

    References
    ----------
    O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance
    matrices", Journal of Multivariate Analysis 88(2), 2004.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> fit = LedoitWolf().fit(X)
    >>> round(fit.shrinkage_, 3), fit.covariance_.shape
    (0.107, (4, 4))
    """

    def __init__(self, *, store_precision: bool = True, assume_centered: bool = False,
                 block_size: int = 1000, exact: bool | None = None, n_probes: int = 30,
                 probe_batch: int = 1, seed: Seed = 0):
        self.store_precision = store_precision
        self.assume_centered = assume_centered
        self.block_size = block_size
        self.exact = exact
        self.n_probes = n_probes
        self.probe_batch = probe_batch
        self.seed = seed

    def _block_columns(self) -> int:
        return check_int("block_size", self.block_size, minimum=1)

    def _rule(self, st: TraceStats) -> tuple[float, float, float]:
        p, n = st.p, st.n
        mu = st.mean("trace") / p
        b2 = st.mean("dispersion") / (n**2 * p)
        if p == 1:
            return 0.0, mu, b2
        d2 = st.mean("spread") / p
        b2_capped = min(b2, d2)
        rho = 0.0 if b2_capped <= 0 else b2_capped / d2
        return min(max(rho, 0.0), 1.0), mu, b2


class OAS(LinearShrinkage):
    """Oracle approximating shrinkage toward (tr S / p) I.

    Parameters
    ----------
    store_precision : bool, default True
        As for :class:`LedoitWolf`.
    assume_centered : bool, default False
        As for :class:`LedoitWolf`.
    exact : bool or None, default None
        As for :class:`LedoitWolf`.
    n_probes : int, default 30
        As for :class:`LedoitWolf`.
    probe_batch : int, default 1
        As for :class:`LedoitWolf`.
    seed : int or torch.Generator, default 0
        As for :class:`LedoitWolf`.

    Attributes
    ----------
    shrinkage_, target_scale_, damping_, shrinkage_stderr_, covariance_, precision_,
    location_
        As for :class:`LedoitWolf`.
    noise_variance_ : float
        The noise the chosen rho implies, rho ||S - mu I||^2 / p.

    References
    ----------
    Y. Chen, A. Wiesel, Y. C. Eldar and A. O. Hero, "Shrinkage algorithms for MMSE
    covariance estimation", IEEE Trans. Signal Processing 58(10), 2010 (eq. 23).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> round(OAS().fit(X).shrinkage_, 3)
    0.14
    """

    def __init__(self, *, store_precision: bool = True, assume_centered: bool = False,
                 exact: bool | None = None, n_probes: int = 30, probe_batch: int = 1,
                 seed: Seed = 0):
        self.store_precision = store_precision
        self.assume_centered = assume_centered
        self.exact = exact
        self.n_probes = n_probes
        self.probe_batch = probe_batch
        self.seed = seed

    def _rule(self, st: TraceStats) -> tuple[float, float, float]:
        p, n = st.p, st.n
        mu = st.mean("trace") / p
        if p == 1:
            return 0.0, mu, 0.0
        spread = st.mean("spread")
        num = st.mean("trace_sq") + st.mean("trace_squared")
        den = (n + 1) * spread
        rho = 1.0 if den <= 0 else min(num / den, 1.0)
        rho = max(rho, 0.0)
        return rho, mu, rho * spread / p


class ShrunkCovariance(LinearShrinkage):
    """A given shrinkage toward (tr S / p) I: (1 - shrinkage) S + shrinkage (tr S / p) I.

    Parameters
    ----------
    store_precision : bool, default True
        As for :class:`LedoitWolf`.
    assume_centered : bool, default False
        As for :class:`LedoitWolf`.
    shrinkage : float, default 0.1
        rho in [0, 1].
    exact : bool or None, default None
        For estimators: how tr S is obtained (as for :class:`LedoitWolf`).
    n_probes : int, default 30
        As for :class:`LedoitWolf`.
    probe_batch : int, default 1
        As for :class:`LedoitWolf`.
    seed : int or torch.Generator, default 0
        As for :class:`LedoitWolf`.

    Attributes
    ----------
    shrinkage_, target_scale_, damping_ : float
        rho, mu = tr S / p and delta = mu rho / (1 - rho).
    covariance_, precision_, location_ : array or tensor
        Explicit inputs only, as for :class:`LedoitWolf`.

    References
    ----------
    F. Pedregosa et al., "Scikit-learn: machine learning in Python", JMLR 12 (2011)
    (``sklearn.covariance.ShrunkCovariance``, which this class matches).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4))
    >>> fit = ShrunkCovariance(shrinkage=0.5).fit(X)
    >>> fit.shrinkage_, bool(np.isclose(np.trace(fit.covariance_), np.trace(np.cov(X.T, bias=1))))
    (0.5, True)
    """

    def __init__(self, *, store_precision: bool = True, assume_centered: bool = False,
                 shrinkage: float = 0.1, exact: bool | None = None, n_probes: int = 30,
                 probe_batch: int = 1, seed: Seed = 0):
        self.store_precision = store_precision
        self.assume_centered = assume_centered
        self.shrinkage = shrinkage
        self.exact = exact
        self.n_probes = n_probes
        self.probe_batch = probe_batch
        self.seed = seed

    def _rule(self, st: TraceStats) -> tuple[float, float, None]:
        rho = check_probability("shrinkage", self.shrinkage, include_one=True)
        return rho, st.mean("trace") / st.p, None


class EmpiricalCovariance(LinearShrinkage):
    """The maximum-likelihood covariance S itself (no shrinkage), with the covariance API.

    The baseline every shrinkage is compared with: ``EmpiricalCovariance().fit(X)`` is
    :class:`ShrunkCovariance` at ``shrinkage=0``; for n <= p its precision is the
    pseudo-inverse and its ``score`` is -inf, as in scikit-learn.

    Parameters
    ----------
    store_precision : bool, default True
        As for :class:`LedoitWolf`.
    assume_centered : bool, default False
        As for :class:`LedoitWolf`.
    exact : bool or None, default None
        For estimators: how tr S is obtained (as for :class:`LedoitWolf`).
    n_probes : int, default 30
        As for :class:`LedoitWolf`.
    probe_batch : int, default 1
        As for :class:`LedoitWolf`.
    seed : int or torch.Generator, default 0
        As for :class:`LedoitWolf`.

    Attributes
    ----------
    shrinkage_, damping_ : float
        0.
    covariance_, precision_, location_ : array or tensor
        Explicit inputs only, as for :class:`LedoitWolf`.

    References
    ----------
    F. Pedregosa et al., "Scikit-learn: machine learning in Python", JMLR 12 (2011)
    (``sklearn.covariance.EmpiricalCovariance``, which this class matches).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4))
    >>> fit = EmpiricalCovariance().fit(X)
    >>> bool(np.allclose(fit.covariance_, np.cov(X.T, bias=True))), fit.shrinkage_
    (True, 0.0)
    """

    def __init__(self, *, store_precision: bool = True, assume_centered: bool = False,
                 exact: bool | None = None, n_probes: int = 30, probe_batch: int = 1,
                 seed: Seed = 0):
        self.store_precision = store_precision
        self.assume_centered = assume_centered
        self.exact = exact
        self.n_probes = n_probes
        self.probe_batch = probe_batch
        self.seed = seed

    def _rule(self, st: TraceStats) -> tuple[float, float, None]:
        return 0.0, st.mean("trace") / st.p, None


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

    Parameters
    ----------
    batch_size : int or None, default None
        B (see above).
    store_precision : bool, default True
        As for :class:`LedoitWolf`.
    assume_centered : bool, default False
        As for :class:`LedoitWolf`.
    exact : bool or None, default None
        As for :class:`LedoitWolf`.
    n_probes : int, default 30
        As for :class:`LedoitWolf`; also ``noise_variance``'s probes when ``batch_size``
        is set on an estimator.
    probe_batch : int, default 1
        As for :class:`LedoitWolf`.
    method : {"unbiased", "paper"}, default "unbiased"
        Passed to ``noise_variance`` when ``batch_size`` is set on an estimator.
    subsample : int or None, default None
        Passed to ``noise_variance`` when ``batch_size`` is set on an estimator.
    seed : int or torch.Generator, default 0
        Seeds the probes (and the subsample).

    Attributes
    ----------
    shrinkage_, target_scale_, shrinkage_stderr_ : float
        rho = delta / (1 + delta), 1.0, and the standard error of rho.
    noise_variance_, damping_ : float
        delta.
    noise_estimate_ : NoiseEstimate
        The estimate behind delta (only with ``batch_size`` on an estimator).
    covariance_, precision_, location_ : array or tensor
        Explicit inputs only, as for :class:`LedoitWolf`.

    Notes
    -----
    At least 2 samples are needed (the dispersion has n - 1 degrees of freedom).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022): damping as linear shrinkage (eq. 13) and the
    optimal damping delta = P^-1 Tr X^2 (eq. 15).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 3, 4]
    >>> fit = RMTLinear().fit(X)
    >>> fit.target_scale_, round(fit.damping_, 2)
    (1.0, 5.02)
    """

    _min_samples = 2

    def __init__(self, *, batch_size: int | None = None, store_precision: bool = True,
                 assume_centered: bool = False, exact: bool | None = None,
                 n_probes: int = 30, probe_batch: int = 1, method: str = "unbiased",
                 subsample: int | None = None, seed: Seed = 0):
        self.batch_size = batch_size
        self.store_precision = store_precision
        self.assume_centered = assume_centered
        self.exact = exact
        self.n_probes = n_probes
        self.probe_batch = probe_batch
        self.method = method
        self.subsample = subsample
        self.seed = seed

    def fit(self, X: Any, y: Any = None) -> RMTLinear:
        """Estimate delta from the samples (or the estimator) ``X`` and shrink toward I.

        Parameters
        ----------
        X : array, tensor, CurvatureEstimator or operator
            Vector samples [n, p], per-sample matrices [n, p, p], or a curvature estimator
            (see :meth:`~curvlab.shrinkage.base.LinearShrinkage.fit`).
        y : None
            Ignored (scikit-learn compatibility).

        Returns
        -------
        RMTLinear
            ``self``, fitted.
        """
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

    def _operator_stats(self, op: Any):
        return (None, None) if self._noise is not None else super()._operator_stats(op)

    def _rule(self, st: TraceStats | None) -> tuple[float, float, float]:
        if st is None:
            delta = max(float(self._noise.value), 0.0)
        else:
            n = st.n
            if n < 2:
                raise InvalidInputError(
                    f"RMTLinear needs at least 2 samples to estimate the noise, got {n} sample"
                )
            s2 = st.mean("dispersion") / ((n - 1) * st.p)
            B = self.batch_size
            if B is not None:
                B = check_int("batch_size", B, minimum=1, maximum=n)
            delta = max(s2 / n if B is None else (1.0 / B - 1.0 / n) * s2, 0.0)
        return damping_to_shrinkage(delta), 1.0, delta


class FixedShrinkage(LinearShrinkage):
    """A given shrinkage rho (or damping delta) toward target_scale * I.

    Works on any operator (only ``matvec`` is needed). ``noise_variance_`` is None.

    Parameters
    ----------
    shrinkage : float or None, default None
        rho in [0, 1]; give exactly one of ``shrinkage`` and ``damping``.
    damping : float or None, default None
        delta >= 0, the same as rho = delta / (target_scale + delta).
    target_scale : float, default 1.0
        tau > 0.
    store_precision : bool, default True
        As for :class:`LedoitWolf`.
    assume_centered : bool, default False
        As for :class:`LedoitWolf`.

    Attributes
    ----------
    shrinkage_, target_scale_, damping_ : float
        rho, tau and delta = tau rho / (1 - rho).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13: a damped step with delta equals a step
    with the shrunk matrix (1 - rho) H + rho tau I, rho = delta / (tau + delta).

    Examples
    --------
    >>> import numpy as np
    >>> fit = FixedShrinkage(damping=1.0).fit(2 * np.eye(3)[None])
    >>> fit.shrinkage_, float(fit.covariance_[0, 0])
    (0.5, 1.5)
    """

    _needs_stats = False

    def __init__(self, *, shrinkage: float | None = None, damping: float | None = None,
                 target_scale: float = 1.0, store_precision: bool = True,
                 assume_centered: bool = False):
        self.shrinkage = shrinkage
        self.damping = damping
        self.target_scale = target_scale
        self.store_precision = store_precision
        self.assume_centered = assume_centered

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
