"""Minimal linear-operator protocol shared by estimators and the spectral algorithms.

Anything with ``num_params``, ``dtype``, ``device`` and ``matvec`` (accepting [P] or
[P, k]) is an operator: every :class:`~curvlab.CurvatureEstimator` is one, and
:class:`DenseOperator` wraps an explicit symmetric matrix for tests and synthetic models.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from curvlab.errors import InvalidInputError


@runtime_checkable
class Operator(Protocol):
    num_params: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class DenseOperator:
    """A symmetric matrix as an operator; counts its matrix-vector products."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InvalidInputError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += 1 if v.ndim == 1 else v.shape[1]
        return self.matrix @ v

    def to_dense(self) -> torch.Tensor:
        return self.matrix
