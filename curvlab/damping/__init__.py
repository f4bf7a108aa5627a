"""Learned damping as linear shrinkage: the paper's section 7, in three stages.

:class:`LinearShrinkageDamper` learns the damping online and feeds it to optimizers. It is
built from small parts, each replaceable by an object of your own:

- :mod:`~curvlab.damping.estimates`: what a raw estimate is (``rule=``): the paper's
  Hessian noise variance (:class:`RMTNoise`), a shrinkage estimator (:class:`ShrinkageRule`
  around LedoitWolf, OAS, RMTLinear, ...), any callable;
- :mod:`~curvlab.damping.guard`: outlier safety (``guard=``, :class:`OutlierGuard`);
- :mod:`~curvlab.damping.updates`: how an estimate moves the damping (``update_rule=``):
  :class:`PaperUpdate`, :class:`AuthorsUpdate`, :class:`CurvlabUpdate`;
- :mod:`~curvlab.damping.sinks`: where it goes (``attach``), with the learning-rate
  compensation of eq. 13;
- :mod:`~curvlab.damping.sync`: one agreement per update under ``torch.distributed``;
- :mod:`~curvlab.damping.history`: the records, a CSV writer and a plot;
- :mod:`~curvlab.damping.resolve`: the one damping resolver of every consumer.
"""

from curvlab.damping._data import Subsample
from curvlab.damping.damper import DEFAULT_UPDATE_RULE, LinearShrinkageDamper
from curvlab.damping.estimates import (
    ESTIMATE_RULES,
    CallableRule,
    EstimateRule,
    FixedRule,
    RawEstimate,
    RMTNoise,
    ShrinkageRule,
    as_estimate_rule,
)
from curvlab.damping.guard import NoGuard, OutlierGuard, Verdict
from curvlab.damping.history import DampingRecord, plot_damping_history, write_history_csv
from curvlab.damping.resolve import DampingSource, resolve_damping
from curvlab.damping.sinks import AttributeSink, MappingSink, ParamGroupSink
from curvlab.damping.sync import DEFAULT_TIMEOUT, DampingSyncError
from curvlab.damping.updates import (
    UPDATE_RULES,
    AuthorsUpdate,
    Bounded,
    CurvlabUpdate,
    PaperUpdate,
    UpdateRule,
    as_update_rule,
)

#: The string aliases of ``rule=`` (kept for the pre-issue-13 API).
RULES = tuple(ESTIMATE_RULES)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_UPDATE_RULE",
    "ESTIMATE_RULES",
    "RULES",
    "UPDATE_RULES",
    "AttributeSink",
    "AuthorsUpdate",
    "Bounded",
    "CallableRule",
    "CurvlabUpdate",
    "DampingRecord",
    "DampingSource",
    "DampingSyncError",
    "EstimateRule",
    "FixedRule",
    "LinearShrinkageDamper",
    "MappingSink",
    "NoGuard",
    "OutlierGuard",
    "PaperUpdate",
    "ParamGroupSink",
    "RMTNoise",
    "RawEstimate",
    "ShrinkageRule",
    "Subsample",
    "UpdateRule",
    "Verdict",
    "as_estimate_rule",
    "as_update_rule",
    "plot_damping_history",
    "resolve_damping",
    "write_history_csv",
]
