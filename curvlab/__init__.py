"""curvlab: curvature of neural-network losses through one interface over many backends,
and principled damping from the noise in those estimates.

``import curvlab`` needs only torch, numpy and scipy; backends load when first used.
"""

from curvlab._version import __version__ as __version__
from curvlab.errors import (
    BackendUnavailableError,
    CurvlabError,
    CurvlabWarning,
    InvalidInputError,
    NotConvergedWarning,
    NumericalError,
    UnsupportedCapabilityError,
    UnsupportedModelError,
)
from curvlab.estimator import CURVATURES, CurvatureEstimator
from curvlab.operators import DenseOperator, IdentityOperator, Operator
from curvlab.registry import backends, estimator, register
from curvlab.results import (
    BackendInfo,
    DiagonalEstimate,
    Eigenpairs,
    Estimate,
    NoiseEstimate,
    SpectralDensity,
)

__all__ = [
    "CURVATURES",
    "BackendInfo",
    "BackendUnavailableError",
    "CurvatureEstimator",
    "CurvlabError",
    "CurvlabWarning",
    "DenseOperator",
    "DiagonalEstimate",
    "Eigenpairs",
    "Estimate",
    "IdentityOperator",
    "InvalidInputError",
    "NoiseEstimate",
    "NotConvergedWarning",
    "NumericalError",
    "Operator",
    "SpectralDensity",
    "UnsupportedCapabilityError",
    "UnsupportedModelError",
    "backends",
    "estimator",
    "register",
]

_LAZY = {
    "LinearShrinkageDamper": ("curvlab.damping", "LinearShrinkageDamper"),
    "noise_variance": ("curvlab.noise", "noise_variance"),
    "plot_spectral_density": ("curvlab.plotting", "plot_spectral_density"),
    "rmt": ("curvlab.rmt", None),
    "shrinkage": ("curvlab.shrinkage", None),
    "optim": ("curvlab.optim", None),
    "spectral": ("curvlab.spectral", None),
}


def __getattr__(name):
    """Load heavier submodules on first use, keeping ``import curvlab`` light."""
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'curvlab' has no attribute {name!r}")
