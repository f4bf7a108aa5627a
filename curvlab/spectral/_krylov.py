"""Small shared pieces of the Krylov methods: operator checks and reorthogonalization."""

from __future__ import annotations

import torch

from curvlab.errors import InvalidInputError
from curvlab.operators import is_operator

#: A Lanczos step breaks down (the Krylov space is invariant) when the new residual is
#: below this many units of roundoff times the operator-norm estimate.
BREAKDOWN_ULPS = 10.0


def check_operator(op) -> int:
    """Validate ``op`` against the :class:`~curvlab.Operator` protocol; return P."""
    if not is_operator(op):
        raise InvalidInputError(
            "expected an Operator (num_params, dtype, device, matvec); wrap an explicit "
            f"matrix with curvlab.DenseOperator, got {type(op).__name__}"
        )
    if not isinstance(op.num_params, int) or op.num_params < 1:
        raise InvalidInputError(
            f"operator num_params must be a positive int, got {op.num_params!r}"
        )
    return op.num_params


def apply(op, v: torch.Tensor) -> torch.Tensor:
    """``op.matvec(v)`` with a shape check (the spectral methods trust nothing else)."""
    out = op.matvec(v)
    if not isinstance(out, torch.Tensor) or out.shape != v.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidInputError(
            f"operator matvec returned {got} for an input of shape {tuple(v.shape)}; "
            "it must return the same shape"
        )
    return out


def column_blocks(op, chunk: int = 256):
    """Yield (i, A[:, i:i+chunk]) for the P identity columns: the exact route of the
    estimators when the budget reaches P, and dense assembly for small operators."""
    P = op.num_params
    eye = torch.eye(P, dtype=op.dtype, device=op.device)
    for i in range(0, P, chunk):
        yield i, apply(op, eye[:, i : i + chunk])


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def breakdown_threshold(dtype: torch.dtype, scale: float) -> float:
    return BREAKDOWN_ULPS * torch.finfo(dtype).eps * scale


def cgs2_(w: torch.Tensor, *bases: torch.Tensor) -> list[torch.Tensor]:
    """Classical Gram–Schmidt twice ("twice is enough"), in place, of ``w`` against bases.

    ``w`` is [P]; each basis is [j, P] with orthonormal rows (contiguous: every pass reads
    rows in order). ``w`` is overwritten with its orthogonalized version; returns, per basis,
    the summed projection coefficients of both passes (basis @ w for the original ``w``).
    """
    coeffs = [torch.zeros(b.shape[0], dtype=w.dtype, device=w.device) for b in bases]
    for _ in range(2):
        for i, basis in enumerate(bases):
            if basis.shape[0]:
                c = torch.mv(basis, w)
                w.addmv_(basis.T, c, alpha=-1)
                coeffs[i] += c
    return coeffs
