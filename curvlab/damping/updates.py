"""How an accepted raw estimate moves the damping: the damper's update rules.

An update rule is a callable ``rule(current, value, first) -> new damping``: ``current`` is
the damping before the update, ``value`` the raw estimate the guard let through (possibly
capped), ``first`` whether no estimate was folded in before. Any such callable works as
``LinearShrinkageDamper(update_rule=...)``; the string aliases of :data:`UPDATE_RULES` build
the three rules below. With s2 the raw estimate (the Hessian noise variance of a batch for
the paper's rule) and delta* the damper's ``init`` (the damping used before the first
estimate, the paper's "starting value delta*"):

- ``"paper"`` (:class:`PaperUpdate`), the paper's description (section 7.1): start from
  delta*, then an exponential moving average with coefficient 0.7,
  ``delta <- 0.7 delta + 0.3 s2``; no floor.
- ``"authors"`` (:class:`AuthorsUpdate`), the authors' released code (rmt_damping_dl,
  ``KFAC_damping_gap.py``): an *additive* floor and the first estimate at full weight,
  ``delta <- floor + s2`` at the first update, then ``delta <- 0.7 delta + 0.3 (floor + s2)``.
  There the floor is delta* itself; here it is its own setting.
- ``"curvlab"`` (:class:`CurvlabUpdate`), curvlab's rule before issue 13:
  ``delta <- 0.7 delta + 0.3 max(floor, s2)``, the first estimate blended in at 0.3.

:class:`Bounded` clamps any rule's result to [low, high].

**delta* and the floor.** The paper initialises "the learning algorithm with some starting
value delta*" (section 7.1) and its figures say "the damping is given an initial floor value
of delta*"; the released code makes delta* both the starting value and the additive floor.
curvlab reads delta* as the starting value, the damper's ``init``, and keeps the floor a
setting of the rule of its own: ``floor=None`` (the default of the rules that have a floor)
binds it to delta* when the damper is built, as in the released code, and any number
decouples the two. An additive floor never hides the learner: the damping is
floor + (smoothed s2) and moves with every estimate, where the max-floor of the "curvlab"
rule stays flat at the floor while the estimates are below it (which is why the old default,
floor = init, showed nothing). The default keeps the floor at delta* because a learned
damping below a stable delta* let KFAC diverge in the measurements (BENCHMARKS.md, damping
section); pass ``AuthorsUpdate(floor=...)`` with a small floor to let the damping fall below
delta*.

References
----------
Granziol et al., "A Random Matrix Theory Approach to Damping in Deep Learning", section 7.1
(the moving average, the starting value delta*) and Figs. 11-15.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvlab.errors import InvalidInputError
from curvlab.validation import check_nonnegative, check_number


class UpdateRule:
    """Base class of the update rules: ``rule(current, value, first) -> new damping``."""

    def __call__(self, current: float, value: float, first: bool) -> float:
        raise NotImplementedError

    def with_init(self, init: float) -> UpdateRule:
        """This rule with settings that default to the damper's ``init`` bound to it."""
        return self


class PaperUpdate(UpdateRule):
    """The paper's description: an exponential moving average from delta*.

        delta <- ema * delta + (1 - ema) * s2        (every update, the first included)

    Parameters
    ----------
    ema : float, default 0.7
        Weight of the old value, in [0, 1) (the paper's 0.7).

    Examples
    --------
    >>> round(PaperUpdate()(1e-3, 1e-2, first=True), 6)
    0.0037
    """

    def __init__(self, *, ema: float = 0.7):
        self.ema = _weight(ema)

    def __repr__(self) -> str:
        return f"PaperUpdate(ema={self.ema})"

    def __call__(self, current: float, value: float, first: bool) -> float:
        return self.ema * current + (1.0 - self.ema) * value


class AuthorsUpdate(UpdateRule):
    """The authors' released rule: an additive floor, the first estimate at full weight.

        delta <- floor + s2                                  (first update)
        delta <- ema * delta + (1 - ema) * (floor + s2)      (later updates)

    Parameters
    ----------
    ema : float, default 0.7
        Weight of the old value, in [0, 1).
    floor : float or None, default None
        The additive floor (>= 0); None is the damper's ``init`` delta*, as in the released
        code (bound by the damper through :meth:`with_init`).

    Examples
    --------
    >>> rule = AuthorsUpdate(floor=1e-3)
    >>> rule(5e-2, 2e-3, first=True)
    0.003
    >>> round(rule(3e-3, 1e-3, first=False), 6)
    0.0027
    >>> AuthorsUpdate().with_init(1e-2)
    AuthorsUpdate(ema=0.7, floor=0.01)
    """

    def __init__(self, *, ema: float = 0.7, floor: float | None = None):
        self.ema = _weight(ema)
        self.floor = None if floor is None else _floor(floor)

    def __repr__(self) -> str:
        return f"AuthorsUpdate(ema={self.ema}, floor={self.floor})"

    def with_init(self, init: float) -> AuthorsUpdate:
        return self if self.floor is not None else AuthorsUpdate(ema=self.ema, floor=init)

    def __call__(self, current: float, value: float, first: bool) -> float:
        target = _bound(self) + value
        return target if first else self.ema * current + (1.0 - self.ema) * target


class CurvlabUpdate(UpdateRule):
    """curvlab's rule before issue 13: a moving average of the estimate raised to a floor.

        delta <- ema * delta + (1 - ema) * max(floor, s2)    (every update)

    Parameters
    ----------
    ema : float, default 0.7
        Weight of the old value, in [0, 1).
    floor : float or None, default None
        Lower bound of each estimate before smoothing (>= 0); None is the damper's ``init``
        (curvlab's old default).

    Examples
    --------
    >>> CurvlabUpdate(floor=1e-3)(1e-3, 0.0, first=True)
    0.001
    """

    def __init__(self, *, ema: float = 0.7, floor: float | None = None):
        self.ema = _weight(ema)
        self.floor = None if floor is None else _floor(floor)

    def __repr__(self) -> str:
        return f"CurvlabUpdate(ema={self.ema}, floor={self.floor})"

    def with_init(self, init: float) -> CurvlabUpdate:
        return self if self.floor is not None else CurvlabUpdate(ema=self.ema, floor=init)

    def __call__(self, current: float, value: float, first: bool) -> float:
        return self.ema * current + (1.0 - self.ema) * max(_bound(self), value)


class Bounded(UpdateRule):
    """Any update rule with its result clamped to [low, high].

    Parameters
    ----------
    rule : callable
        The update rule to clamp.
    low, high : float or None, default None
        The bounds (None: unbounded on that side).

    Examples
    --------
    >>> Bounded(PaperUpdate(ema=0.0), high=1.0)(0.5, 7.0, first=False)
    1.0
    """

    def __init__(self, rule: Callable[[float, float, bool], float], *, low=None, high=None):
        self.rule = as_update_rule(rule)
        self.low = None if low is None else _floor(low, "low")
        self.high = None if high is None else _floor(high, "high")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise InvalidInputError(f"low {low} exceeds high {high}")

    @property
    def floor(self) -> float | None:
        """The wrapped rule's floor (None if it has none)."""
        return getattr(self.rule, "floor", None)

    @property
    def ema(self) -> float | None:
        """The wrapped rule's smoothing weight (None if it has none)."""
        return getattr(self.rule, "ema", None)

    def __repr__(self) -> str:
        return f"Bounded({self.rule!r}, low={self.low}, high={self.high})"

    def with_init(self, init: float) -> Bounded:
        bind = getattr(self.rule, "with_init", None)
        return self if bind is None else Bounded(bind(init), low=self.low, high=self.high)

    def clamp(self, value: float) -> float:
        """``value`` clamped to [low, high]."""
        if self.low is not None:
            value = max(value, self.low)
        if self.high is not None:
            value = min(value, self.high)
        return value

    def __call__(self, current: float, value: float, first: bool) -> float:
        return self.clamp(self.rule(current, value, first))


#: The string aliases of ``update_rule=``: name -> factory of the rule.
UPDATE_RULES: dict[str, Callable[[], Any]] = {
    "paper": PaperUpdate,
    "authors": AuthorsUpdate,
    "curvlab": CurvlabUpdate,
}


def as_update_rule(spec: Any) -> Callable[[float, float, bool], float]:
    """The update rule that ``update_rule=`` names or holds.

    Parameters
    ----------
    spec : str or callable
        A name of :data:`UPDATE_RULES`, or a callable ``(current, value, first) -> float``.

    Examples
    --------
    >>> as_update_rule("authors")
    AuthorsUpdate(ema=0.7, floor=None)
    """
    if isinstance(spec, str):
        if spec not in UPDATE_RULES:
            raise InvalidInputError(
                f"update_rule must be one of {tuple(UPDATE_RULES)} or a callable "
                f"(current, value, first) -> damping, got {spec!r}"
            )
        return UPDATE_RULES[spec]()
    if callable(spec):
        return spec
    raise InvalidInputError(
        f"update_rule must be one of {tuple(UPDATE_RULES)} or a callable "
        f"(current, value, first) -> damping, got {type(spec).__name__}"
    )


def _bound(rule: Any) -> float:
    if rule.floor is None:
        raise InvalidInputError(
            f"{rule!r}: floor=None stands for the damper's init; call rule.with_init(init) "
            "or pass a number"
        )
    return rule.floor


def _weight(ema: Any) -> float:
    return check_number("ema", ema, low=0.0, high=1.0, high_open=True)


def _floor(value: Any, name: str = "floor") -> float:
    return check_nonnegative(name, value)


__all__ = [
    "UPDATE_RULES",
    "AuthorsUpdate",
    "Bounded",
    "CurvlabUpdate",
    "PaperUpdate",
    "UpdateRule",
    "as_update_rule",
]
