"""Shrinkage of noisy covariance and curvature estimates, scikit-learn style (DESIGN.md 4).

The unshrunk ``EmpiricalCovariance``; linear rules toward a scaled identity
(``LedoitWolf``, ``OAS``, ``ShrunkCovariance``, the paper's ``RMTLinear``,
``FixedShrinkage``), nonlinear eigenvalue cleaning (``EigenvalueClipping``,
``RotationInvariant``, ``LedoitWolf2020``), scikit-learn's covariance functions
(``empirical_covariance``, ``shrunk_covariance``, ``ledoit_wolf``, ``ledoit_wolf_shrinkage``,
``oas``, ``log_likelihood``), damping <-> shrinkage conversions, and
``compare``/``heldout_score`` to choose between them. Rules have names (``"ledoit_wolf"``,
``"oas"``, ...): :func:`register_rule` adds one, :func:`make_rule` builds one by name.

Every estimator has scikit-learn's covariance API (``fit``, ``score``, ``mahalanobis``,
``error_norm``, ``get_precision``, ``covariance_``, ``precision_``, ``location_``) and is,
once fitted, a :class:`curvlab.operators.Operator` (``matvec``, ``solve``, ``eigenpairs``).
scikit-learn itself is optional: it is imported only when it asks for the tags.
"""

from curvlab.shrinkage._validation import InputTypeError, NotFittedError
from curvlab.shrinkage.base import BaseShrinkage, LinearShrinkage
from curvlab.shrinkage.compare import compare, heldout_score
from curvlab.shrinkage.conversions import (
    damping_to_shrinkage,
    learning_rate_scale,
    shrinkage_to_damping,
)
from curvlab.shrinkage.functions import (
    empirical_covariance,
    ledoit_wolf,
    ledoit_wolf_shrinkage,
    log_likelihood,
    oas,
    shrunk_covariance,
)
from curvlab.shrinkage.ledoit_wolf_2020 import LedoitWolf2020, analytical_shrinkage
from curvlab.shrinkage.linear import (
    OAS,
    EmpiricalCovariance,
    FixedShrinkage,
    LedoitWolf,
    RMTLinear,
    ShrunkCovariance,
)
from curvlab.shrinkage.nonlinear import (
    EigenvalueClipping,
    RotationInvariant,
    eigenvector_oracle,
    noise_of_mean,
)
from curvlab.shrinkage.registry import make_rule, register_rule, rules
from curvlab.shrinkage.synthetic import PerSampleMatrices, SpikedModel
from curvlab.shrinkage.table import Comparison

__all__ = [
    "OAS",
    "BaseShrinkage",
    "Comparison",
    "EigenvalueClipping",
    "EmpiricalCovariance",
    "FixedShrinkage",
    "InputTypeError",
    "LedoitWolf",
    "LedoitWolf2020",
    "LinearShrinkage",
    "NotFittedError",
    "PerSampleMatrices",
    "RMTLinear",
    "RotationInvariant",
    "ShrunkCovariance",
    "SpikedModel",
    "analytical_shrinkage",
    "compare",
    "damping_to_shrinkage",
    "eigenvector_oracle",
    "empirical_covariance",
    "heldout_score",
    "learning_rate_scale",
    "ledoit_wolf",
    "ledoit_wolf_shrinkage",
    "log_likelihood",
    "make_rule",
    "noise_of_mean",
    "oas",
    "register_rule",
    "rules",
    "shrinkage_to_damping",
    "shrunk_covariance",
]
