"""Spectral algorithms on any :class:`~curvlab.Operator`, implemented once on ``matvec``.

Top/bottom eigenpairs by thick-restart Lanczos, spectral densities by stochastic Lanczos
quadrature, traces by Hutch++ / Hutchinson and diagonals by XDiag / Hutchinson.
"""

from curvlab.spectral.diagonal import diagonal, diagonal_estimate
from curvlab.spectral.lanczos import eigenpairs
from curvlab.spectral.slq import lanczos_tridiagonal, spectral_density
from curvlab.spectral.trace import trace, trace_of_square

__all__ = [
    "diagonal",
    "diagonal_estimate",
    "eigenpairs",
    "lanczos_tridiagonal",
    "spectral_density",
    "trace",
    "trace_of_square",
]
