"""What one raw damping estimate is: the first stage of the damper (estimate, judge, sink).

An *estimate rule* turns a curvature estimator holding the data of one update into a raw
damping :class:`RawEstimate` (value, standard error, target scale). The damper never looks
inside a rule; it calls ``rule.estimate(est, batch_size=B, seed=s)`` and reads three
optional attributes with these defaults:

- ``learns`` (True): False means the damping never changes (:class:`FixedRule`);
- ``shuffle`` (False): the samples must come in a fresh random order (groups of samples);
- ``skip_reason(counts)`` (None): why a batch of these per-rank sample counts is too small.

So a new rule is one class with an ``estimate`` method, passed as
``LinearShrinkageDamper(rule=MyRule())``; nothing else is edited. The string aliases of
:data:`ESTIMATE_RULES` build the built-in ones:

- ``"rmt"``: :class:`RMTNoise`, the paper's rule, delta = P^-1 Tr X^2, the Hessian noise
  variance of a batch of B (eq. 15; :func:`curvlab.noise.noise_variance`);
- ``"ledoit_wolf"`` / ``"oas"``: :class:`ShrinkageRule` around
  :class:`~curvlab.shrinkage.LedoitWolf` / :class:`~curvlab.shrinkage.OAS`, whose
  shrinkage rho toward tau I is the damping delta = tau rho / (1 - rho) (eq. 13);
- ``"fixed"``: :class:`FixedRule`, no updates.

Any object with scikit-learn's ``fit(est)`` and the fitted ``shrinkage_``,
``target_scale_`` (and optionally ``shrinkage_stderr_``) attributes is wrapped in a
:class:`ShrinkageRule`, and a plain callable ``est -> number or NoiseEstimate`` in a
:class:`CallableRule`.

References
----------
D. Granziol, S. Zohren, S. Roberts et al., "A Random Matrix Theory Approach to Damping in
Deep Learning", section 7, eq. 13 and 15 (the paper behind curvlab).
O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance
matrices", Journal of Multivariate Analysis 88(2), 2004.
Y. Chen, A. Wiesel, Y. C. Eldar and A. O. Hero, "Shrinkage algorithms for MMSE covariance
estimation", IEEE Trans. Signal Processing 58(10), 2010 (OAS).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from curvlab._params import shard_layout
from curvlab.errors import InvalidInputError
from curvlab.estimator import CurvatureEstimator
from curvlab.noise import METHODS, noise_variance
from curvlab.results import NoiseEstimate
from curvlab.validation import check_choice, check_int, check_number, check_optional

TARGETS = ("identity", "trace")


@dataclass(frozen=True)
class RawEstimate:
    """One raw damping estimate, before it is judged and smoothed.

    Attributes
    ----------
    value : float
        The raw damping delta (NaN or negative values are rejected by the damper).
    stderr : float, default nan
        Its standard error (NaN when the rule gives none).
    target_scale : float or None, default None
        tau of the shrinkage target tau I the damping refers to; None is the identity.
    """

    value: float
    stderr: float = math.nan
    target_scale: float | None = None


def as_raw_estimate(result: Any) -> RawEstimate:
    """A :class:`RawEstimate` from what a rule returned: a number, a NoiseEstimate or one.

    Examples
    --------
    >>> as_raw_estimate(0.5)
    RawEstimate(value=0.5, stderr=nan, target_scale=None)
    """
    if isinstance(result, RawEstimate):
        return result
    if isinstance(result, NoiseEstimate):
        return RawEstimate(float(result.value), float(result.stderr))
    if isinstance(result, Real) and not isinstance(result, bool):
        return RawEstimate(float(result))
    raise InvalidInputError(
        "an estimate must be a number, a NoiseEstimate or a RawEstimate, got "
        f"{type(result).__name__}"
    )


class EstimateRule:
    """Base class of the estimate rules (optional: any object with ``estimate`` works).

    Subclasses implement :meth:`estimate`; :meth:`skip_reason`, ``learns`` and ``shuffle``
    have the defaults the damper also assumes for duck-typed rules.
    """

    #: False: the rule never updates the damping.
    learns: bool = True
    #: True: the damper hands the samples over in a fresh random order.
    shuffle: bool = False

    def estimate(self, est: CurvatureEstimator, *, batch_size: int, seed: int) -> RawEstimate:
        """The raw damping for batches of ``batch_size`` from the data ``est`` holds.

        Parameters
        ----------
        est : CurvatureEstimator
            The curvature of the update's samples (the training batch or a subsample).
        batch_size : int
            B, the optimizer's batch the damping is for.
        seed : int
            Seeds the rule's probes (drawn afresh by the damper at every update).
        """
        raise NotImplementedError

    def skip_reason(self, counts: Sequence[int], coupled: bool = False) -> str | None:
        """Why samples held as ``counts`` (one count per rank) are too few, or None;
        ``coupled``: the model has batch-coupled layers (train-mode BatchNorm)."""
        return None if sum(counts) >= 1 else "the batch is empty"


#: Groups per rank the RMT rule forms when ``group_size`` is None.
DEFAULT_GROUPS = 4


def _held(est: CurvatureEstimator) -> list[int]:
    """Samples held per rank (gathered in one collective under torch.distributed)."""
    bounds, _ = shard_layout(est.local_num_samples, bool(getattr(est, "distributed", False)))
    return (bounds[1:] - bounds[:-1]).tolist()


class RMTNoise(EstimateRule):
    """The paper's rule: delta = P^-1 Tr X^2, the Hessian noise variance of a batch (eq. 15).

    With shared unit probes v and groups i of ``group_size`` samples, u_i = H_i v,

        delta = (1/B - 1/N) * g * 1/(n-1) sum_i ||u_i - u_bar||^2

    averaged over ``n_probes`` probes (:func:`curvlab.noise.noise_variance`, unbiased).

    Parameters
    ----------
    n_probes : int, default 1
        Probe rounds per update. One probe is the paper's Algorithm 1; its standard error
        comes from the groups' delete-one jackknife (:func:`curvlab.noise.noise_variance`),
        and the spread between updates, which the update rule averages, dominates anyway.
        Each probe costs one product per group (BENCHMARKS.md: an update then costs 4-6
        training steps on resnet18 and a small transformer).
    group_size : int or None, default None
        g, samples per group; groups are formed from a fresh random order of the samples.
        None forms ``DEFAULT_GROUPS`` (4) groups per rank from the samples held (g = 16 for a
        batch of 64), which keeps an update at a few training steps on large networks and,
        under train-mode BatchNorm, keeps groups (each normalised as its own mini-batch)
        close to the batch; at least 2 samples per group then. 1 is per-sample products.
    method : {"unbiased", "paper"}, default "unbiased"
        "paper" is Algorithm 1 as printed (biased; DESIGN.md section 4).
    population : float or None, default None
        N in the factor 1/B - 1/N; None treats training batches as i.i.d. draws (1/B).
    target : {"identity", "trace"}, default "identity"
        The shrinkage target the damping refers to: I, or (tr H / P) I with tr H / P read
        from the same probes (sets the damper's ``tau``, ``shrinkage`` and the learning-rate
        compensation, not the damping).

    References
    ----------
    Granziol et al., "A Random Matrix Theory Approach to Damping in Deep Learning", eq. 15
    and Algorithm 1.

    Examples
    --------
    >>> import torch, curvlab
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(4, 3).double()
    >>> x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    >>> est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> raw = RMTNoise(n_probes=4, group_size=4).estimate(est, batch_size=8, seed=0)
    >>> raw.value > 0, raw.stderr > 0
    (True, True)
    """

    def __init__(
        self,
        *,
        n_probes: int = 1,
        group_size: int | None = None,
        method: str = "unbiased",
        population: float | None = None,
        target: str = "identity",
    ):
        self.n_probes = check_int("n_probes", n_probes, minimum=1)
        self.group_size = check_optional(check_int, "group_size", group_size, minimum=1)
        self.method = check_choice("method", method, METHODS)
        self.target = check_choice("target", target, TARGETS)
        self.population = check_optional(
            check_number, "population", population, low=2, finite=False,
            fix="pass the dataset size, or None for i.i.d. batches",
        )

    @property
    def shuffle(self) -> bool:  # type: ignore[override]
        """Groups of more than one sample need a random partition of the samples."""
        return self.group_size is None or self.group_size > 1

    def groups_of(self, counts: Sequence[int], coupled: bool = False) -> int:
        """The group size for samples held as ``counts`` (one count per rank)."""
        if self.group_size is not None:
            return self.group_size
        g = max(1, min(counts) // DEFAULT_GROUPS)
        return max(g, 2) if coupled else g

    def __repr__(self) -> str:
        return (
            f"RMTNoise(n_probes={self.n_probes}, group_size={self.group_size}, "
            f"method={self.method!r}, population={self.population}, target={self.target!r})"
        )

    def skip_reason(self, counts: Sequence[int], coupled: bool = False) -> str | None:
        """Too few samples: a rank with fewer than ``group_size``, or fewer than 2 groups
        (of at least 2 samples under batch-coupled layers)."""
        g = self.groups_of(counts, coupled)
        short = [r for r, n in enumerate(counts) if n < g]
        if len(counts) > 1 and short:
            return (
                f"rank {short[0]} holds {counts[short[0]]} sample(s), fewer than one group of "
                f"{g}"
            )
        groups = sum(n // g for n in counts)
        if groups < 2:
            return (
                f"{sum(counts)} sample(s) make {groups} group(s) of {g}; the noise variance "
                f"needs 2 (at least {2 * g} samples)"
            )
        return None

    def estimate(self, est: CurvatureEstimator, *, batch_size: int, seed: int) -> RawEstimate:
        population = math.inf if self.population is None else self.population
        if population < batch_size:
            raise InvalidInputError(
                f"population {population:g} is smaller than the batch size {batch_size}"
            )
        noise = noise_variance(
            est,
            batch_size=batch_size,
            n_probes=self.n_probes,
            method=self.method,
            group_size=self.groups_of(_held(est), bool(est.view.batch_coupled())),
            population=population,
            seed=seed,
        )
        tau = noise.trace_per_param if self.target == "trace" else None
        return RawEstimate(noise.value, noise.stderr, tau)


class ShrinkageRule(EstimateRule):
    """A fitted linear shrinkage toward tau I, read as the damping delta = tau rho / (1 - rho).

    Wraps any object with scikit-learn's ``fit(X)`` that leaves ``shrinkage_`` (rho in
    [0, 1]), ``target_scale_`` (tau > 0) and optionally ``shrinkage_stderr_``:
    :class:`~curvlab.shrinkage.LedoitWolf`, :class:`~curvlab.shrinkage.OAS`,
    :class:`~curvlab.shrinkage.RMTLinear`, or your own. Each update fits a shallow copy, with
    ``seed`` set to the damper's fresh draw when the object has one (fresh probes every
    update). These rules shrink the curvature of the data they are given, so the batch size
    B does not enter (except through an object's own ``batch_size``).

    The standard error is the delta method's: se(delta) = tau se(rho) / (1 - rho)^2.

    Parameters
    ----------
    estimator : object
        The shrinkage estimator (not fitted; it is copied at every update).

    References
    ----------
    Granziol et al., eq. 13 (damping as linear shrinkage); Ledoit and Wolf (2004); Chen et
    al. (2010).

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.shrinkage import OAS
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(4, 3).double()
    >>> x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    >>> est = curvlab.estimator(
    ...     "autograd", model, torch.nn.CrossEntropyLoss(), (x, y), curvature="ggn")
    >>> raw = ShrinkageRule(OAS(n_probes=4)).estimate(est, batch_size=32, seed=0)
    >>> raw.value >= 0 and raw.target_scale > 0
    True
    """

    def __init__(self, estimator: Any):
        if not callable(getattr(estimator, "fit", None)):
            raise InvalidInputError(
                f"a shrinkage rule needs an object with fit(), got {type(estimator).__name__}"
            )
        self.estimator = estimator

    def __repr__(self) -> str:
        return f"ShrinkageRule({self.estimator!r})"

    def skip_reason(self, counts: Sequence[int], coupled: bool = False) -> str | None:
        """A shrinkage fit needs at least 2 samples."""
        n = sum(counts)
        return None if n >= 2 else f"{n} sample(s): a shrinkage fit needs at least 2"

    def estimate(self, est: CurvatureEstimator, *, batch_size: int, seed: int) -> RawEstimate:
        fitted = copy.copy(self.estimator)
        if hasattr(fitted, "seed"):
            fitted.seed = seed
        fitted.fit(est)
        rho, tau = float(fitted.shrinkage_), float(fitted.target_scale_)
        rho_se = float(getattr(fitted, "shrinkage_stderr_", math.nan))
        if not (math.isfinite(tau) and tau > 0 and 0.0 <= rho < 1.0):
            # no positive mean curvature to shrink toward, or the target alone (rho = 1)
            return RawEstimate(math.nan if rho < 1.0 else math.inf, math.nan, None)
        delta = tau * rho / (1.0 - rho)
        return RawEstimate(delta, rho_se * tau / (1.0 - rho) ** 2, tau)


class CallableRule(EstimateRule):
    """A plain function of the estimator: ``fn(est)`` returns a number, a NoiseEstimate or
    a :class:`RawEstimate`.

    Parameters
    ----------
    fn : callable
        Called as ``fn(est)`` at every update.

    Examples
    --------
    >>> rule = CallableRule(lambda est: 0.1)
    >>> rule.estimate(None, batch_size=8, seed=0).value
    0.1
    """

    def __init__(self, fn: Callable[[CurvatureEstimator], Any]):
        if not callable(fn):
            raise InvalidInputError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __repr__(self) -> str:
        return f"CallableRule({getattr(self.fn, '__name__', self.fn)!r})"

    def estimate(self, est: CurvatureEstimator, *, batch_size: int, seed: int) -> RawEstimate:
        return as_raw_estimate(self.fn(est))


class FixedRule(EstimateRule):
    """No estimates: the damping stays at the damper's ``init`` (a flat damping).

    Examples
    --------
    >>> FixedRule().learns
    False
    """

    learns = False

    def __repr__(self) -> str:
        return "FixedRule()"

    def estimate(self, est: CurvatureEstimator, *, batch_size: int, seed: int) -> RawEstimate:
        raise InvalidInputError("the fixed rule keeps the damping at init; it has no estimates")


def _ledoit_wolf() -> ShrinkageRule:
    from curvlab.shrinkage import LedoitWolf

    return ShrinkageRule(LedoitWolf(n_probes=2, store_precision=False))


def _oas() -> ShrinkageRule:
    from curvlab.shrinkage import OAS

    return ShrinkageRule(OAS(n_probes=2, store_precision=False))


#: The string aliases of ``rule=``: name -> factory of the rule object.
ESTIMATE_RULES: dict[str, Callable[[], Any]] = {
    "rmt": RMTNoise,
    "ledoit_wolf": _ledoit_wolf,
    "oas": _oas,
    "fixed": FixedRule,
}


def as_estimate_rule(spec: Any) -> Any:
    """The estimate rule that ``rule=`` names or holds.

    Parameters
    ----------
    spec : str, rule object, shrinkage estimator or callable
        A name of :data:`ESTIMATE_RULES` or of a shrinkage rule registered with
        :func:`curvlab.shrinkage.register_rule`; an object with ``estimate`` (used as is); an
        object with ``fit`` (wrapped in :class:`ShrinkageRule`); a callable ``est -> value``
        (wrapped in :class:`CallableRule`).

    Examples
    --------
    >>> as_estimate_rule("rmt")
    RMTNoise(n_probes=1, group_size=None, method='unbiased', population=None, target='identity')
    """
    if isinstance(spec, str):
        if spec in ESTIMATE_RULES:
            return ESTIMATE_RULES[spec]()
        from curvlab.shrinkage import rules

        if spec in rules():  # a shrinkage rule registered by name
            from curvlab.shrinkage import make_rule

            return ShrinkageRule(make_rule(spec))
        raise InvalidInputError(
            f"rule must be one of {tuple(ESTIMATE_RULES)}, a shrinkage rule registered with "
            f"curvlab.shrinkage.register_rule ({', '.join(rules())}) or a rule object, "
            f"got {spec!r}"
        )
    if callable(getattr(spec, "estimate", None)):
        return spec
    if callable(getattr(spec, "fit", None)):
        return ShrinkageRule(spec)
    if callable(spec):
        return CallableRule(spec)
    raise InvalidInputError(
        f"rule must be one of {tuple(ESTIMATE_RULES)}, an object with estimate(est, "
        "batch_size=, seed=), a shrinkage estimator with fit() or a callable est -> value; "
        f"got {type(spec).__name__}"
    )


__all__ = [
    "ESTIMATE_RULES",
    "TARGETS",
    "CallableRule",
    "EstimateRule",
    "FixedRule",
    "RMTNoise",
    "RawEstimate",
    "ShrinkageRule",
    "as_estimate_rule",
    "as_raw_estimate",
]
