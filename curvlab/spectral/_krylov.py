"""Small shared pieces of the spectral methods: operator checks, blocked products with
progress, reorthogonalization."""

from __future__ import annotations

import torch

from curvlab.errors import InvalidInputError
from curvlab.operators import is_operator
from curvlab.progress import Progress
from curvlab.spectral._budget import TimedProducts
from curvlab.validation import check_int

#: Most columns per operator call in the probe-based estimators (traces, diagonals): bounds
#: the [P, b] blocks an operator holds at once and paces the progress reports.
PRODUCT_BLOCK = 16
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
    return check_int("the operator's num_params", op.num_params, minimum=1)


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


def block_widths(total: int) -> list[int]:
    """Widths of at most :data:`PRODUCT_BLOCK` summing to ``total``: the probe blocks of
    the stochastic estimators.

    Examples
    --------
    >>> block_widths(40)
    [16, 16, 8]
    """
    return [min(PRODUCT_BLOCK, total - i) for i in range(0, total, PRODUCT_BLOCK)]


def column_blocks(op, chunk: int = 256, product=None):
    """Yield (i, A[:, i:i+chunk]) for the P identity columns: the exact route of the
    estimators when the budget reaches P, and dense assembly for small operators.
    ``product`` (default :func:`apply`) computes each block's products."""
    P = op.num_params
    product = product or (lambda block: apply(op, block))
    eye = torch.eye(P, dtype=op.dtype, device=op.device)
    for i in range(0, P, chunk):
        yield i, product(eye[:, i : i + chunk])


class Products:
    """``op @ V`` for [P, b] blocks, in operator calls of at most :data:`PRODUCT_BLOCK`
    columns, with a progress bar / callback (``info["n_matvecs"]``) and the run-time
    prediction of :class:`~curvlab.spectral._budget.TimedProducts`. A context manager.

    Parameters
    ----------
    op : Operator
    what : str
        The operation (progress description and warnings).
    planned : int
        Products the operation will compute in all (the progress total).
    fix : str
        How to make the call cheaper, for the time warning.
    progress : bool or None
    callback : callable or None
    """

    def __init__(self, op, what: str, planned: int, fix: str, progress, callback):
        self.op, self.n_matvecs = op, 0
        self.bar = Progress(what, planned, progress=progress, callback=callback)
        self.timed = TimedProducts(lambda block: apply(op, block), what, planned, fix)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        if V.shape[1] <= PRODUCT_BLOCK:
            return self._block(V)
        out = torch.empty_like(V)
        for start in range(0, V.shape[1], PRODUCT_BLOCK):
            out[:, start : start + PRODUCT_BLOCK] = self._block(V[:, start : start + PRODUCT_BLOCK])
        return out

    def _block(self, V: torch.Tensor) -> torch.Tensor:
        out = self.timed(V)
        self.n_matvecs += V.shape[1]
        self.bar.update(V.shape[1], n_matvecs=self.n_matvecs)
        return out

    def __enter__(self) -> Products:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


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
