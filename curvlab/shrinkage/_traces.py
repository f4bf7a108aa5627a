"""The trace statistics every linear shrinkage rule needs (DESIGN.md section 4).

For n matrix observations M_k (p x p) with mean S, Ledoit–Wolf, OAS and the RMT rule are
functions of five numbers: tr S, tr S^2 = ||S||_F^2, (tr S)^2, the spread
||S - (tr S / p) I||_F^2 = tr S^2 - (tr S)^2 / p and the dispersion sum_k ||M_k - S||_F^2.

Numerics. Every statistic is accumulated in float64 whatever the input dtype, and all of
them come from one reduction of the same data:

- vector samples x_k (M_k = x_k x_k^T; also per-sample gradients) are split around their
  column mean, x_k = m + d_k, in float64 column blocks (two passes over each block), so
  with K = D D^T, a = D m, r_k = ||d_k||^2:

      tr S = ||m||^2 + sum_k r_k / n,
      tr S^2 = ||m||^4 + 2 ||a||^2 / n + ||K||^2 / n^2,
      sum_k ||M_k - S||^2 = 2 ||m||^2 sum_k r_k + 2 ||a||^2 + 4 a.r + sum_k r_k^2 - ||K||^2 / n,

  where the mean's own terms (which dominate when the samples share a large mean, as
  per-sample gradients do) cancel exactly instead of in floating point. When n > p the
  p x p matrix S is formed instead and the spread is ||S - mu I||^2 itself, so
  near-isotropic data do not lose it to cancellation;
- per-sample factors F_k [m, p] (M_k = F_k^T F_k, GGN square roots) use the float64
  Gram matrix of the stacked factors: sum_k ||F_k F_k^T||^2 - ||K||^2 / n (accurate while
  the spread exceeds about 1e-8 of the mean);
- explicit matrices M [n, p, p] are centred at their float64 mean (two passes);
- matrix-free, with shared unit probes v and u_k = M_k v, u_bar = S v, a = v^T u_bar,
  b = ||u_bar||^2, c = sum_k ||u_k - u_bar||^2 (two passes, float64, column blocks):

      tr S ~ p a,   tr S^2 ~ p b,   sum_k ||M_k - S||^2 ~ p c,
      (tr S)^2 ~ p ((p + 2) a^2 - 2 b),   spread ~ (p + 2) ||u_bar - a v||^2,

  all unbiased for v uniform on the unit sphere (the last two are the unit-sphere
  correction (p + 2)/p (||Av||^2 - (v^T A v)^2) = ||A - tr(A)/p I||^2 / p rearranged).

Memory of the probe route: one probe's per-sample products [n, p] at a time
(``probe_batch=1``), plus the backend's own intermediates and float64 column blocks of
about 8 MiB: about 2.5 [n, p] blocks in all on the autograd backend (BENCHMARKS.md). A
larger ``probe_batch`` vectorises that many probes with ``torch.func.vmap`` (faster for
per-sample Hessians) at ``probe_batch`` times the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from curvlab import distributed as dist
from curvlab._random import Seed, make_generator, unit_sphere
from curvlab.errors import CurvlabError, InvalidInputError
from curvlab.validation import check_int

FIELDS = ("trace", "trace_sq", "trace_squared", "spread", "dispersion")
F64 = torch.float64
#: float64 numbers per column block of the reductions (8 MiB)
BLOCK_NUMBERS = 2**20


@dataclass(frozen=True)
class TraceStats:
    """Per-probe statistics ([m] float64 tensors, m = 1 when exact) of n observations in
    dimension p; see the module docstring for each field."""

    n: int
    p: int
    trace: torch.Tensor
    trace_sq: torch.Tensor
    trace_squared: torch.Tensor
    spread: torch.Tensor
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


def _exact(n: int, p: int, **values: torch.Tensor | float) -> TraceStats:
    return TraceStats(n, p, **{k: torch.as_tensor(float(v), dtype=F64).reshape(1)
                               for k, v in values.items()})


@dataclass(frozen=True)
class VectorMoments:
    """Float64 moments of samples X [n, p] split around their column mean m.

    ``gram`` is K = D D^T [n, n] when n <= p, else ``cov`` is D^T D / n [p, p];
    ``a`` = D m, ``r`` = row norms ||d_k||^2, ``m2`` = ||m||^2, ``mean`` = m.
    """

    n: int
    p: int
    mean: torch.Tensor
    a: torch.Tensor
    r: torch.Tensor
    m2: float
    gram: torch.Tensor | None
    cov: torch.Tensor | None

    def raw_gram(self) -> torch.Tensor:
        """X X^T = K + a 1^T + 1 a^T + ||m||^2 1 1^T (float64), for the Woodbury route."""
        a = self.a
        return self.gram + a[:, None] + a[None, :] + self.m2

    def raw_cov(self) -> torch.Tensor:
        """S = X^T X / n = D^T D / n + m m^T (float64)."""
        return self.cov + torch.outer(self.mean, self.mean)


def vector_moments(X: torch.Tensor, block: int | None = None) -> VectorMoments:
    """Two-pass float64 moments of X [n, p]; when n <= p in column blocks of ``block``
    columns (default: about 8 MiB of float64)."""
    n, p = X.shape
    if n > p:
        X64 = X.to(F64)
        mean = X64.mean(dim=0)
        D = X64 - mean
        return VectorMoments(n, p, mean, D @ mean, (D * D).sum(dim=1), float(mean @ mean),
                             None, D.T @ D / n)
    gram = torch.zeros(n, n, dtype=F64, device=X.device)
    a = torch.zeros(n, dtype=F64, device=X.device)
    means = []
    step = block or max(1, BLOCK_NUMBERS // max(1, n))
    for start in range(0, p, step):
        cols = X[:, start : start + step].to(F64)
        m = cols.mean(dim=0)
        D = cols - m
        gram += D @ D.T
        a += D @ m
        means.append(m)
    mean = torch.cat(means)
    return VectorMoments(n, p, mean, a, torch.diagonal(gram).clone(), float(mean @ mean),
                         gram, None)


def vector_stats(X: torch.Tensor, block: int | None = None
                 ) -> tuple[TraceStats, VectorMoments]:
    """Exact statistics of M_k = x_k x_k^T for the rows of X [n, p] (centred or not)."""
    mom = vector_moments(X, block)
    n, p, m2, a, r = mom.n, mom.p, mom.m2, mom.a, mom.r
    k_sq = float((mom.gram**2).sum()) if mom.gram is not None else n**2 * float((mom.cov**2).sum())
    trace = m2 + float(r.sum()) / n
    a_sq = float(a @ a)
    trace_sq = m2**2 + 2 * a_sq / n + k_sq / n**2
    dispersion = 2 * m2 * float(r.sum()) + 2 * a_sq + 4 * float(a @ r) + float(r @ r) - k_sq / n
    if mom.cov is not None:
        S = mom.raw_cov()
        S.diagonal().sub_(trace / p)
        spread = float((S * S).sum())
    else:
        spread = trace_sq - trace**2 / p
    stats = _exact(n, p, trace=trace, trace_sq=trace_sq, trace_squared=trace**2,
                   spread=max(spread, 0.0), dispersion=max(dispersion, 0.0))
    return stats, mom


def stacked_gram(F: torch.Tensor) -> torch.Tensor:
    """F F^T in float64 for F [r, p] of any float dtype (column blocks of about 8 MiB)."""
    r, p = F.shape
    gram = torch.zeros(r, r, dtype=F64, device=F.device)
    step = max(1, BLOCK_NUMBERS // max(1, r))
    for start in range(0, p, step):
        block = F[:, start : start + step].to(F64)
        gram += block @ block.T
    return gram


def factor_stats(F: torch.Tensor) -> tuple[TraceStats, torch.Tensor]:
    """Exact statistics of M_k = F_k^T F_k for per-sample factors F [n, m, p], and the
    float64 Gram matrix of the stacked [n m, p] factors (for the Woodbury route).

    m = 1 (per-sample gradients) goes through :func:`vector_stats` (two passes).
    """
    n, m, p = F.shape
    if m == 1:
        stats, mom = vector_stats(F[:, 0, :])
        return stats, mom.raw_gram() if mom.gram is not None else stacked_gram(F[:, 0, :])
    K = stacked_gram(F.reshape(n * m, p))
    blocks = K.reshape(n, m, n, m)
    own = torch.diagonal(blocks, dim1=0, dim2=2).permute(2, 0, 1)  # [n, m, m]: F_k F_k^T
    trace = float(torch.diagonal(K).sum()) / n
    k_sq = float((K * K).sum())
    trace_sq = k_sq / n**2
    dispersion = float((own * own).sum()) - k_sq / n
    stats = _exact(n, p, trace=trace, trace_sq=trace_sq, trace_squared=trace**2,
                   spread=max(trace_sq - trace**2 / p, 0.0), dispersion=max(dispersion, 0.0))
    return stats, K


def check_symmetric(M: torch.Tensor, what: str) -> None:
    """Refuse a matrix [p, p] (or a stack [n, p, p]) that is not symmetric to 1e-6 relative
    (1e-8 of its largest entry absolute)."""
    scale = float(M.abs().max()) if M.numel() else 0.0
    if not torch.allclose(M, M.transpose(-1, -2), rtol=1e-6, atol=1e-8 * scale):
        raise InvalidInputError(f"{what} must be symmetric; pass (M + M^T) / 2")


def matrix_stats(M: torch.Tensor, *, check: bool = True) -> tuple[TraceStats, torch.Tensor]:
    """Exact statistics of explicit symmetric matrices M [n, p, p]; also their float64
    mean S. ``check=False`` skips the symmetry check, for matrices already checked (the
    held-out refits of a fit on subsets of its own, validated, matrices)."""
    n, p, _ = M.shape
    if check:
        check_symmetric(M, "per-sample matrices")
    M64 = M.to(F64)
    S = M64.mean(dim=0)
    trace = float(torch.diagonal(S).sum())
    centred = S.clone()
    centred.diagonal().sub_(trace / p)
    stats = _exact(n, p, trace=trace, trace_sq=float((S * S).sum()), trace_squared=trace**2,
                   spread=float((centred * centred).sum()),
                   dispersion=float(((M64 - S) ** 2).sum()))
    return stats, S


# ---------------------------------------------------------------------- matrix-free
def probe_stats(op, n_probes: int, seed: Seed, *, probe_batch: int = 1) -> TraceStats:
    """Matrix-free statistics from ``op.group_matvecs(v, 1)`` with shared unit probes.

    Parameters
    ----------
    op : estimator-like
        Needs ``group_matvecs``, ``num_params``, ``dtype``, ``device``, ``n_matvecs``
        (and ``distributed``: under ``torch.distributed`` the sums and counts are
        all-reduced, so every rank gets the statistics of the union of the shards).
    n_probes : int
        Probes (>= 2, for a standard error).
    seed : int or torch.Generator
        Seeds the probes.
    probe_batch : int, default 1
        Probes whose per-sample products are held at once (module docstring: memory).
    """
    n_probes = check_int("n_probes", n_probes, minimum=2, fix="two probes give a standard error")
    probe_batch = check_int("probe_batch", probe_batch, minimum=1)
    p = int(op.num_params)
    gen = make_generator(seed, op.device)
    V = unit_sphere((p, n_probes), generator=gen, dtype=op.dtype, device=op.device).T
    before = op.n_matvecs
    parts = [_probe_moments(op, group_products(op, chunk), chunk)
             for chunk in V.split(probe_batch)]
    n = parts[0][0]
    a, b, c, resid = (torch.cat([part[i] for part in parts]) for i in range(1, 5))
    return TraceStats(
        n, p, trace=p * a, trace_sq=p * b, trace_squared=p * ((p + 2) * a * a - 2 * b),
        spread=(p + 2) * resid, dispersion=p * c, n_matvecs=op.n_matvecs - before,
        exact=False,
    )


def group_products(op, V: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """[k, G, p]: the group products of each row of V (vmapped over rows when k > 1)."""
    if V.shape[0] > 1:
        try:
            U = torch.func.vmap(lambda v: op.group_matvecs(v, group_size))(V)
        except CurvlabError:
            raise
        except Exception:  # a backend that cannot run under vmap: loop instead
            pass
        else:
            op.n_matvecs += (V.shape[0] - 1) * U.shape[1]  # counted once under vmap
            return U
    return torch.stack([op.group_matvecs(v, group_size) for v in V])


#: numbers the dense per-group matrices of :func:`group_means` may hold (256 MiB of float64)
GROUP_MEANS_NUMBERS = 2**25


def group_means(op, block: int = 64) -> torch.Tensor:
    """[m, p, p]: dense mean matrices of m groups of consecutive samples, from
    ``group_matvecs`` on identity columns (p calls, as ``to_dense``): the per-sample
    matrices themselves (m = n) when n p^2 numbers fit in ``GROUP_MEANS_NUMBERS``, else
    the largest m that does (a remainder of samples is dropped)."""
    p, n = int(op.num_params), int(op.num_samples)
    groups = max(1, min(n, GROUP_MEANS_NUMBERS // (p * p)))
    size = n // groups
    out = torch.empty(groups, p, p, dtype=op.dtype, device=op.device)
    for start in range(0, p, block):
        eye = torch.zeros(min(block, p - start), p, dtype=op.dtype, device=op.device)
        eye[:, start : start + eye.shape[0]].fill_diagonal_(1.0)
        cols = group_products(op, eye, size)[:, :groups].permute(1, 2, 0)
        out[:, :, start : start + eye.shape[0]] = cols
    return out


def _probe_moments(op, U: torch.Tensor, V: torch.Tensor):
    """(n, a, b, c, ||u_bar - a v||^2) per probe, in float64 column blocks, two passes."""
    shared = getattr(op, "distributed", False)
    k, n_local, p = U.shape
    cols = max(1, BLOCK_NUMBERS // max(1, k * n_local))
    sums = torch.cat([U[:, :, s : s + cols].to(F64).sum(dim=1) for s in range(0, p, cols)], 1)
    head = torch.cat([sums, sums.new_full((k, 1), n_local)], dim=1)
    if shared:
        head = dist.all_reduce_sum(head)
    n = round(float(head[0, -1]))
    if n < 2:
        raise InvalidInputError(f"only {n} sample(s): the dispersion needs at least 2")
    mean = head[:, :-1] / n
    centred = sum(
        ((U[:, :, s : s + cols].to(F64) - mean[:, None, s : s + cols]) ** 2).sum(dim=(1, 2))
        for s in range(0, p, cols)
    )
    if shared:
        centred = torch.tensor(dist.all_reduce_scalars(*centred.tolist()), dtype=F64)
    v = V.to(F64)
    norm = v.norm(dim=1)  # 1 up to the rounding of the probes' dtype: undo it exactly
    v, mean, centred = v / norm[:, None], mean / norm[:, None], centred / norm**2
    a = (v * mean).sum(dim=1)
    resid = ((mean - a[:, None] * v) ** 2).sum(dim=1)
    return n, a.cpu(), (mean * mean).sum(dim=1).cpu(), centred.cpu(), resid.cpu()
