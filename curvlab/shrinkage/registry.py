"""Shrinkage rules by name: the one place where a name becomes an estimator.

Everything that takes a rule by name (:func:`curvlab.shrinkage.compare`, and any code that
calls :func:`make_rule`) reads this registry, so a new rule is one file with its class and
one :func:`register_rule` call::

    from curvlab.shrinkage import LinearShrinkage, register_rule

    class HalfWay(LinearShrinkage):
        '''rho = 1/2 toward the mean eigenvalue.'''
        def _rule(self, stats):
            return 0.5, stats.mean("trace") / stats.p, None

    register_rule("half_way", HalfWay)

after which ``compare(truth, ["half_way", "ledoit_wolf"], ...)`` and
``LinearShrinkageDamper(rule=make_rule("half_way"))`` (the damper takes any fitted-style
estimator as its rule) use it. The built-in names are listed by :func:`rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvlab.errors import InvalidInputError
from curvlab.shrinkage.ledoit_wolf_2020 import LedoitWolf2020
from curvlab.shrinkage.linear import (
    OAS,
    EmpiricalCovariance,
    FixedShrinkage,
    LedoitWolf,
    RMTLinear,
    ShrunkCovariance,
)
from curvlab.shrinkage.nonlinear import EigenvalueClipping, RotationInvariant
from curvlab.validation import check_callable

_RULES: dict[str, Callable[..., Any]] = {}


def register_rule(name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
    """Make ``name`` an alias of ``factory(**params)`` wherever rules are taken by name.

    Parameters
    ----------
    name : str
        The rule's name (lower case with underscores, by convention).
    factory : callable
        A shrinkage estimator class (or any callable returning an unfitted estimator with
        scikit-learn's ``fit``), called with the keyword parameters given to
        :func:`make_rule`.
    replace : bool, default False
        Allow replacing a registered name (otherwise that is refused, so two plug-ins cannot
        silently shadow each other).

    Raises
    ------
    InvalidInputError
        An empty or non-string name, a factory that is not callable, or a taken name.

    Examples
    --------
    >>> from curvlab.shrinkage import LedoitWolf, make_rule, register_rule
    >>> register_rule("lw_exact", lambda **kw: LedoitWolf(exact=True, **kw), replace=True)
    >>> make_rule("lw_exact").exact
    True
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"a rule's name must be a non-empty str, got {name!r}")
    check_callable("factory", factory, what="a callable returning a shrinkage estimator")
    if name in _RULES and not replace and _RULES[name] is not factory:
        raise InvalidInputError(
            f"the shrinkage rule {name!r} is already registered ({_RULES[name]!r}); "
            "pass replace=True to replace it"
        )
    _RULES[name] = factory


def rules() -> dict[str, Callable[..., Any]]:
    """The registered names and their factories, in registration order.

    Examples
    --------
    >>> from curvlab.shrinkage import rules
    >>> [name for name in rules()][:3]
    ['empirical_covariance', 'ledoit_wolf', 'oas']
    """
    return dict(_RULES)


def make_rule(spec: Any, **params: Any) -> Any:
    """The estimator ``spec`` names (built with ``params``), or ``spec`` itself.

    Parameters
    ----------
    spec : str or estimator
        A registered name, or an estimator with ``fit`` (returned as is; ``params`` must then
        be empty).
    **params
        Keyword parameters of the named rule's constructor.

    Returns
    -------
    estimator
        Unfitted (for a name), with scikit-learn's ``fit``.

    Raises
    ------
    InvalidInputError
        An unknown name (the message lists the registered ones), parameters for an object,
        or a spec that is neither.

    Examples
    --------
    >>> from curvlab.shrinkage import make_rule
    >>> make_rule("oas", n_probes=8).n_probes
    8
    """
    if isinstance(spec, str):
        if spec not in _RULES:
            raise InvalidInputError(
                f"unknown shrinkage rule {spec!r}; choose one of {', '.join(_RULES)}, or "
                "register yours with curvlab.shrinkage.register_rule(name, cls)"
            )
        return _RULES[spec](**params)
    if callable(getattr(spec, "fit", None)):
        if params:
            raise InvalidInputError(
                f"parameters {sorted(params)} apply to a rule given by name; set them on the "
                f"{type(spec).__name__} object itself"
            )
        return spec
    raise InvalidInputError(
        "a shrinkage rule is a registered name or an estimator with fit(); got "
        f"{type(spec).__name__}"
    )


for _name, _cls in (
    ("empirical_covariance", EmpiricalCovariance),
    ("ledoit_wolf", LedoitWolf),
    ("oas", OAS),
    ("rmt_linear", RMTLinear),
    ("shrunk_covariance", ShrunkCovariance),
    ("fixed_shrinkage", FixedShrinkage),
    ("eigenvalue_clipping", EigenvalueClipping),
    ("rotation_invariant", RotationInvariant),
    ("ledoit_wolf_2020", LedoitWolf2020),
):
    register_rule(_name, _cls)

__all__ = ["make_rule", "register_rule", "rules"]
