"""The trace statistics every linear shrinkage rule needs (DESIGN.md section 4).

For n matrix observations M_k (p x p) with mean S, Ledoit–Wolf, OAS and the RMT rule are
functions of four numbers: tr S, tr S^2 = ||S||_F^2, (tr S)^2 and the dispersion
sum_k ||M_k - S||_F^2. They come exactly from explicit samples (vectors x_k with
M_k = x_k x_k^T through the smaller of the two Gram matrices, or explicit matrices), or
per-sample factors F_k with M_k = F_k^T F_k (gradients, GGN square roots), or
matrix-free from an operator's per-sample products with shared unit probes v:
with u_k = M_k v, u_bar = S v, a = v^T u_bar, b = ||u_bar||^2, c = sum_k ||u_k - u_bar||^2,

    tr S ~ p a,   tr S^2 ~ p b,   sum_k ||M_k - S||^2 ~ p c,
    (tr S)^2 ~ p ((p + 2) a^2 - 2 b),

all unbiased for v uniform on the unit sphere (the last one is the unit-sphere correction
(p + 2)/p (||Av||^2 - (v^T A v)^2) = ||A - tr(A)/p I||^2 / p rearranged).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from curvlab._random import Seed, make_generator, unit_sphere
from curvlab.errors import InvalidInputError
from curvlab.noise import probe_statistics

FIELDS = ("trace", "trace_sq", "trace_squared", "dispersion")


@dataclass(frozen=True)
class TraceStats:
    """Per-probe statistics ([m] tensors, m = 1 when exact) of n observations in dimension p."""

    n: int
    p: int
    trace: torch.Tensor
    trace_sq: torch.Tensor
    trace_squared: torch.Tensor
    dispersion: torch.Tensor
    n_matvecs: int = 0
    exact: bool = True

    @property
    def n_probes(self) -> int:
        return int(self.trace.numel())

    def mean(self, name: str) -> float:
        return float(getattr(self, name).mean())

    def drop(self, j: int) -> TraceStats:
        """The statistics without probe ``j`` (for jackknife standard errors)."""
        keep = torch.arange(self.n_probes) != j
        return replace(self, **{f: getattr(self, f)[keep] for f in FIELDS})


def _scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(1).to(torch.float64)


def vector_stats(X: torch.Tensor, S: torch.Tensor | None = None) -> TraceStats:
    """Exact statistics of M_k = x_k x_k^T for the rows of X [n, p] (already centred or not)."""
    return factor_stats(X[:, None, :], S)


def factor_stats(F: torch.Tensor, S: torch.Tensor | None = None) -> TraceStats:
    """Exact statistics of M_k = F_k^T F_k for per-sample factors F [n, m, p].

    Rows of F_k are per-sample gradients (m = 1) or the columns of a GGN square root
    (m = outputs or MC samples). tr S = sum_k ||F_k||^2 / n; tr S^2 = ||F^T F||^2 / n^2 from
    the smaller Gram matrix of the [n m, p] stack (or from ``S`` = F^T F / n if given);
    sum_k ||M_k - S||^2 = sum_k ||F_k F_k^T||^2 - n tr S^2.
    """
    n, m, p = F.shape
    if S is None:
        flat = F.reshape(n * m, p)
        gram = flat @ flat.T if n * m <= p else flat.T @ flat
        trace_sq = (gram * gram).sum() / n**2
    else:
        trace_sq = (S * S).sum()
    small = F @ F.transpose(1, 2)  # [n, m, m]: ||M_k||_F = ||F_k F_k^T||_F
    trace = torch.diagonal(small, dim1=1, dim2=2).sum() / n
    dispersion = (small * small).sum() - n * trace_sq
    return TraceStats(n, p, _scalar(trace), _scalar(trace_sq), _scalar(trace**2),
                      _scalar(dispersion))


def matrix_stats(M: torch.Tensor) -> tuple[TraceStats, torch.Tensor]:
    """Exact statistics of explicit symmetric matrices M [n, p, p]; also returns their mean S."""
    n, p, _ = M.shape
    if not torch.allclose(M, M.transpose(1, 2), rtol=1e-6, atol=1e-8 * float(M.abs().max())):
        raise InvalidInputError("per-sample matrices must be symmetric; pass (M + M^T) / 2")
    S = M.mean(dim=0)
    trace = torch.diagonal(S).sum()
    stats = TraceStats(n, p, _scalar(trace), _scalar((S * S).sum()), _scalar(trace**2),
                       _scalar(((M - S) ** 2).sum()))
    return stats, S


def probe_stats(op, n_probes: int, seed: Seed) -> TraceStats:
    """Matrix-free statistics from ``op.group_matvecs(v, 1)`` with shared unit probes.

    The per-sample products and their all-reduce under ``torch.distributed`` are those of
    :func:`curvlab.noise.probe_statistics`, so every rank gets the statistics of the union.
    """
    if n_probes < 2:
        raise InvalidInputError(f"n_probes must be >= 2 (for a standard error), got {n_probes}")
    p = int(op.num_params)
    gen = make_generator(seed, op.device)
    V = unit_sphere((p, n_probes), generator=gen, dtype=op.dtype, device=op.device).T
    before = op.n_matvecs
    st = probe_statistics(op, V, 1)
    a, b = st.vu, st.mean_sq
    return TraceStats(
        st.n_groups,
        p,
        trace=p * a,
        trace_sq=p * b,
        trace_squared=p * ((p + 2) * a * a - 2 * b),
        dispersion=p * st.centred,
        n_matvecs=op.n_matvecs - before,
        exact=False,
    )
