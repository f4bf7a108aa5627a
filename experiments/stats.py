"""One verdict rule for every experiment: a per-seed effect, its mean and standard error, and a
three-way verdict from its 95% confidence interval.

Every claim is turned into an *effect* measured once per seed (the seed sets the
initialisation, the data split and the batch order, and every arm of a comparison shares it,
so differences are paired) and a *threshold* the paper's claim puts it on one side of. Over
the n finite per-seed values we report mean ± standard error (SE = sd / sqrt(n)) and the 95%
t-interval mean ± t(0.975, n - 1) SE; the verdict is

- ``"supports"`` when the whole interval lies on the claimed side of the threshold,
- ``"contradicts"`` when it lies wholly on the other side,
- ``"inconclusive"`` otherwise, or with fewer than 3 finite values.

With 3 seeds the margin must exceed 4.30 SE, i.e. 2.48 standard deviations of the seeds: a
verdict needs an effect larger than the seed spread. (:data:`RULE` says this in one
sentence for the reports.)

Examples
--------
>>> e = effect([0.30, 0.25, 0.35], direction=+1)
>>> e.verdict, round(e.mean, 3), round(e.stderr, 4)
('supports', 0.3, 0.0289)
>>> effect([0.1, -0.2, 0.3], direction=+1).verdict
'inconclusive'
>>> effect([-1.0, -1.0, -1.0], direction=+1).verdict
'contradicts'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

SUPPORTS, CONTRADICTS, INCONCLUSIVE = "supports", "contradicts", "inconclusive"
VERDICTS = (SUPPORTS, CONTRADICTS, INCONCLUSIVE)
MIN_SEEDS = 3
CONFIDENCE = 0.95

RULE = (
    "Verdict rule (all experiments): each claim is an effect measured once per seed (arms of "
    "a comparison share the seed: same initialisation, split and batch order) and a threshold "
    "the claim puts it beyond. We report mean ± standard error over the seeds and the 95% "
    "t-interval mean ± t(0.975, n-1)·SE. SUPPORTS: the whole interval is on the claimed side; "
    "CONTRADICTS: it is wholly on the other side; INCONCLUSIVE: otherwise, or fewer than 3 "
    "finite seeds. With 3 seeds the margin must exceed 4.3 SE (2.5 seed standard deviations)."
)


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile t((1 + confidence) / 2, n - 1) for n >= 2 values.

    Parameters
    ----------
    n : int
        Number of values (n - 1 degrees of freedom).
    confidence : float, default 0.95
        Coverage of the two-sided interval.

    Returns
    -------
    float
        The quantile (12.71 for n = 2, 4.30 for n = 3, 1.96 as n grows).

    Examples
    --------
    >>> round(t_quantile(3), 2)
    4.3
    """
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, standard error sd / sqrt(n) and n of the finite values (NaN where undefined).

    Parameters
    ----------
    values : iterable of float
        Per-seed values; NaN and infinities are left out.

    Returns
    -------
    (mean, stderr, n) : tuple of float, float, int
        stderr is NaN for fewer than 2 finite values.

    Examples
    --------
    >>> mean, se, n = mean_se([1.0, 2.0, 3.0, float("nan")])
    >>> mean, round(se, 4), n
    (2.0, 0.5774, 3)
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(finite) / n
    if n < 2:
        return mean, math.nan, n
    var = sum((v - mean) ** 2 for v in finite) / (n - 1)
    return mean, math.sqrt(var / n), n


@dataclass(frozen=True)
class Effect:
    """A per-seed effect, its summary and its verdict (see the module docstring).

    Attributes
    ----------
    values : tuple of float
        One value per seed, in seed order (NaN where a seed gave none).
    mean, stderr : float
        Over the finite values.
    low, high : float
        The 95% t-interval of the mean (NaN with fewer than 2 finite values).
    n : int
        Finite values used.
    direction : int
        +1: the claim says effect > threshold; -1: effect < threshold.
    threshold : float
    verdict : str
        One of :data:`VERDICTS`.
    """

    values: tuple[float, ...]
    mean: float
    stderr: float
    low: float
    high: float
    n: int
    direction: int
    threshold: float
    verdict: str

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, fmt: str = ".3g") -> str:
        """``mean ± SE [95% CI low, high] (n seeds)``."""
        if self.n == 0:
            return "no finite value"
        if self.n == 1:
            return f"{self.mean:{fmt}} (1 seed)"
        return (
            f"{self.mean:{fmt}} ± {self.stderr:{fmt}} [95% CI {self.low:{fmt}}, "
            f"{self.high:{fmt}}] ({self.n} seeds)"
        )

    def claimed_side(self) -> str:
        """The claim as an inequality, e.g. ``> 0``."""
        return f"{'>' if self.direction > 0 else '<'} {self.threshold:g}"

    def seeds_for_verdict(self) -> int | None:
        """Seeds that would make the interval exclude the threshold if the mean and the
        standard deviation stayed as measured (None when the mean sits on the threshold or
        the spread is unknown)."""
        gap = abs(self.mean - self.threshold)
        if self.n < 2 or not math.isfinite(self.stderr) or gap == 0:
            return None
        sd = self.stderr * math.sqrt(self.n)
        if sd == 0:
            return MIN_SEEDS
        n = max(MIN_SEEDS, self.n)
        while n < 10_000 and t_quantile(n) * sd / math.sqrt(n) >= gap:
            n += 1
        return n if n < 10_000 else None


def effect(values: Iterable[float], *, direction: int = 1, threshold: float = 0.0) -> Effect:
    """Summarise per-seed ``values`` and decide the verdict (module docstring's rule).

    Parameters
    ----------
    values : iterable of float
        The effect measured once per seed (NaN or infinite: that seed gave no value; it is
        left out and does not count towards the 3 needed).
    direction : {+1, -1}, default +1
        +1 when the claim predicts values above ``threshold``, -1 below it.
    threshold : float, default 0.0

    Returns
    -------
    Effect

    Examples
    --------
    >>> effect([0.01, 0.02, 0.015], direction=-1, threshold=0.05).verdict
    'supports'
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    raw = tuple(math.nan if v is None else float(v) for v in values)
    mean, se, n = mean_se(raw)
    if n >= 2:
        half = t_quantile(n) * se
        low, high = mean - half, mean + half
    else:
        low = high = math.nan
    verdict = INCONCLUSIVE
    if n >= MIN_SEEDS:
        lo, hi = (low, high) if direction > 0 else (-high, -low)
        thr = threshold * direction
        if lo > thr:
            verdict = SUPPORTS
        elif hi < thr:
            verdict = CONTRADICTS
    return Effect(raw, mean, se, low, high, n, direction, float(threshold), verdict)


def combine(verdicts: Iterable[str]) -> str:
    """One verdict for a claim made of parts: contradicts if any part does, supports if every
    part does, inconclusive otherwise (and for no parts).

    Examples
    --------
    >>> combine(["supports", "inconclusive"]), combine(["supports", "contradicts"])
    ('inconclusive', 'contradicts')
    """
    verdicts = list(verdicts)
    if CONTRADICTS in verdicts:
        return CONTRADICTS
    if verdicts and all(v == SUPPORTS for v in verdicts):
        return SUPPORTS
    return INCONCLUSIVE


__all__ = [
    "CONTRADICTS",
    "INCONCLUSIVE",
    "MIN_SEEDS",
    "RULE",
    "SUPPORTS",
    "VERDICTS",
    "Effect",
    "combine",
    "effect",
    "mean_se",
    "t_quantile",
]
