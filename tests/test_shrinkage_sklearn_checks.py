"""scikit-learn's estimator checks on every covariance estimator of curvlab.shrinkage."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks

from curvlab.shrinkage import (
    OAS,
    EmpiricalCovariance,
    FixedShrinkage,
    LedoitWolf,
    LedoitWolf2020,
    RMTLinear,
    ShrunkCovariance,
)

ESTIMATORS = [
    EmpiricalCovariance(),
    LedoitWolf(),
    OAS(),
    ShrunkCovariance(),
    RMTLinear(),
    FixedShrinkage(shrinkage=0.2),
    LedoitWolf2020(),
]

_LW2020_MIN = (
    "needs n - 1 >= 12 samples (the bandwidth n^-1/3 of Ledoit & Wolf 2020 is calibrated "
    "for that); this check fits 10 samples"
)
EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    "LedoitWolf2020": {
        "check_estimators_nan_inf": _LW2020_MIN,
        "check_fit2d_1feature": _LW2020_MIN,
    },
}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=lambda e: EXPECTED_FAILURES.get(
    type(e).__name__, {}))
def test_sklearn_compatible(estimator, check):
    check(estimator)
