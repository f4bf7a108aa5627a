"""Shrinkage of noisy curvature estimates, scikit-learn style (DESIGN.md section 4).

Linear rules toward a scaled identity (``LedoitWolf``, ``OAS``, the paper's ``RMTLinear``,
``FixedShrinkage``), nonlinear eigenvalue cleaning (``EigenvalueClipping``,
``RotationInvariant``, ``LedoitWolf2020``), damping <-> shrinkage conversions, and
``compare``/``heldout_score`` to choose between them.
"""

from curvlab.shrinkage.base import BaseShrinkage, LinearShrinkage
from curvlab.shrinkage.compare import compare, heldout_score
from curvlab.shrinkage.conversions import (
    damping_to_shrinkage,
    learning_rate_scale,
    shrinkage_to_damping,
)
from curvlab.shrinkage.ledoit_wolf_2020 import LedoitWolf2020, analytical_shrinkage
from curvlab.shrinkage.linear import OAS, FixedShrinkage, LedoitWolf, RMTLinear
from curvlab.shrinkage.nonlinear import (
    EigenvalueClipping,
    RotationInvariant,
    eigenvector_oracle,
    noise_of_mean,
)
from curvlab.shrinkage.synthetic import PerSampleMatrices, SpikedModel

__all__ = [
    "OAS",
    "BaseShrinkage",
    "EigenvalueClipping",
    "FixedShrinkage",
    "LedoitWolf",
    "LedoitWolf2020",
    "LinearShrinkage",
    "PerSampleMatrices",
    "RMTLinear",
    "RotationInvariant",
    "SpikedModel",
    "analytical_shrinkage",
    "compare",
    "damping_to_shrinkage",
    "eigenvector_oracle",
    "heldout_score",
    "learning_rate_scale",
    "noise_of_mean",
    "shrinkage_to_damping",
]
