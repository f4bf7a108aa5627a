"""The keywords of ``LinearShrinkageDamper`` before issue 13, mapped onto the objects that
replace them (deprecated: each use warns once with its replacement)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

from curvlab.damping._data import Subsample
from curvlab.damping.estimates import ESTIMATE_RULES, RMTNoise, ShrinkageRule
from curvlab.damping.updates import Bounded, CurvlabUpdate
from curvlab.errors import InvalidInputError

#: pre-issue-13 keyword -> what replaces it
REPLACEMENTS = {
    "ema": "update_rule=CurvlabUpdate(ema=...)",
    "floor": "update_rule=CurvlabUpdate(floor=...) (or the floor of another update rule)",
    "min": "update_rule=Bounded(rule, low=...)",
    "max": "update_rule=Bounded(rule, high=...)",
    "n_probes": "rule=RMTNoise(n_probes=...) or a shrinkage estimator's n_probes",
    "group_size": "rule=RMTNoise(group_size=...)",
    "method": "rule=RMTNoise(method=...)",
    "population": "rule=RMTNoise(population=...)",
    "target": "rule=RMTNoise(target=...)",
    "fresh_subsample": "subsample=Subsample(size, fresh=True)",
    "backend": "estimator='backend name'",
    "backend_options": "estimator=functools.partial(curvlab.estimator, backend, **options)",
}
_RULE_KEYS = ("n_probes", "group_size", "method", "population", "target")
_UPDATE_KEYS = ("ema", "floor", "min", "max")


def from_legacy(legacy: dict, rule: Any, update_rule: Any, subsample: Any, estimator: Any):
    """(rule, update_rule, subsample, estimator) with the old keywords in ``legacy`` applied."""
    unknown = sorted(set(legacy) - set(REPLACEMENTS))
    if unknown:
        raise TypeError(f"LinearShrinkageDamper got unexpected keyword arguments {unknown}")
    if not legacy:
        return rule, update_rule, subsample, estimator
    warnings.warn(
        "LinearShrinkageDamper: "
        + "; ".join(f"{k}= is deprecated, use {REPLACEMENTS[k]}" for k in sorted(legacy)),
        DeprecationWarning,
        stacklevel=3,
    )
    rule = _rule(rule, {k: legacy[k] for k in _RULE_KEYS if k in legacy})
    update_rule = _update_rule(update_rule, {k: legacy[k] for k in _UPDATE_KEYS if k in legacy})
    if legacy.get("fresh_subsample"):
        if subsample is None:
            raise InvalidInputError("fresh_subsample needs subsample")
        subsample = Subsample(int(subsample), fresh=True)
    if "backend" in legacy or "backend_options" in legacy:
        estimator = _factory(legacy.get("backend", "autograd"), legacy.get("backend_options"))
    return rule, update_rule, subsample, estimator


def _rule(rule: Any, options: dict) -> Any:
    if not options:
        return rule
    if rule == "rmt":
        return RMTNoise(**options)
    if rule in ("ledoit_wolf", "oas") and set(options) == {"n_probes"}:
        shrinkage = ESTIMATE_RULES[rule]().estimator
        shrinkage.n_probes = options["n_probes"]
        return ShrinkageRule(shrinkage)
    raise InvalidInputError(f"{sorted(options)} do not apply to rule={rule!r}")


def _update_rule(update_rule: Any, options: dict) -> Any:
    if not options:
        return update_rule
    if update_rule != "authors":
        raise InvalidInputError("pass either update_rule= or the old ema/floor/min/max")
    rule = CurvlabUpdate(ema=options.get("ema", 0.7), floor=options.get("floor"))
    if "min" in options or "max" in options:
        rule = Bounded(rule, low=options.get("min"), high=options.get("max"))
    return rule


def _factory(backend: str, options: dict | None):
    from curvlab.registry import estimator

    return functools.partial(estimator, backend, **(options or {}))
