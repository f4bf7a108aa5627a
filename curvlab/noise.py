"""Hessian noise variance delta = P^-1 E||H_B - H||_F^2: the paper's optimal damping.

Paper eq. 15 and section 7; DESIGN.md section 4. With one shared random *unit* probe v
per round and u_i = H_i v for groups i = 1..n of ``g`` consecutive samples,

    s2 = 1/(n-1) sum_i ||u_i - u_bar||^2

is unbiased for P^-1 E||H_i - H||_F^2 (E_v ||A v||^2 = ||A||_F^2 / P for unit v). For
groups of one sample that is the per-sample variance S2 = 1/(N-1) sum_n ||H_n - H||_F^2 / P,
and a batch of B drawn without replacement from N samples has noise (1/B - 1/N) S2. Groups of
g samples (a random partition of randomly ordered data) estimate S2 / g, so both routes use

    delta = (1/B - 1/N) * g * s2

(for g = B this is s2 itself up to the finite-population factor 1 - B/N). The value averages
the probes; its standard error is their spread / sqrt(n_probes). The products u_i come from
``est.group_matvecs`` (vmapped over groups by the autograd backend) and the probes are
vectorised with ``torch.func.vmap`` over it where the backend allows (a loop otherwise).

``method="paper"`` is Algorithm 1 as printed, sigma2 = mean_i v^T H_i^2 v - (v^T H_bar v)^2
(with the 1/n the printed loop omits), then the same conversion. It is biased: for a unit
probe its expected excess over the centred form is P/(P+2) times the spectral variance
P^-1 Tr H_bar^2 - (P^-1 Tr H_bar)^2 (DESIGN.md section 4).

``source="diagonal"`` uses per-sample diagonal curvature D [N, P] (BackPACK) instead of
probes: delta = (1/B - 1/N) * sum_j Var_n(D_nj) = (1/B - 1/N) * P * mean_j Var_n(D_nj),
which assumes the off-diagonal entries of H_n - H are as variable as the diagonal ones
(homogeneous noise); it is cheap but only as good as that assumption.

Under ``torch.distributed`` each rank's estimator holds a shard; the group sums, centred
squared norms and counts are all-reduced, so every rank gets the single-process value on
the union of the shards (exactly, for ``group_size=1``; larger groups never straddle ranks).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from curvlab import distributed as dist
from curvlab._params import draw_subsample, shard_layout
from curvlab._random import Seed, make_generator, unit_sphere
from curvlab.errors import CurvlabWarning, InvalidInputError, UnsupportedCapabilityError
from curvlab.operators import Operator
from curvlab.progress import Callback, track
from curvlab.results import NoiseEstimate
from curvlab.validation import check_choice, check_int

if TYPE_CHECKING:  # the estimator calls this module; this module only duck-types it
    from curvlab.estimator import CurvatureEstimator

METHODS = ("unbiased", "paper")
SOURCES = ("matvec", "diagonal")
_BLOCK_NUMBERS = 2**25  # probes per vectorised call: [k, G, P] within about this many numbers
#: What noise_variance reads from its estimator (any object with these works).
_NEEDED = ("num_params", "num_samples", "dtype", "device", "group_matvecs")


def noise_variance(
    est: CurvatureEstimator,
    *,
    batch_size: int = 128,
    n_probes: int = 10,
    method: str = "unbiased",
    subsample: int | torch.Tensor | None = None,
    group_size: int = 1,
    source: str = "matvec",
    population: float | None = None,
    seed: Seed = 0,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> NoiseEstimate:
    """Noise variance of the curvature of a batch of ``batch_size`` samples (the damping).

    Parameters
    ----------
    est : CurvatureEstimator
        The estimator; its samples are the population the batches are drawn from.
    batch_size : int, default 128
        B, the batch whose curvature noise is wanted (the optimizer's batch).
    n_probes : int, default 10
        Probe rounds (each costs one product per group); for ``source="diagonal"`` the
        number of jackknife folds behind the standard error (at least 2).
    method : {"unbiased", "paper"}, default "unbiased"
        ``"paper"`` is Algorithm 1 as printed: biased (see the module docstring), kept for
        comparison only.
    subsample : int or torch.Tensor, optional
        An int draws that many samples at random (seeded, in random order), a 1-D index
        tensor picks those samples (global indices over all ranks, in that order); the
        estimate is formed on ``est.subset(...)``, which holds only them. S2 of a random
        subset is unbiased for the S2 of all samples. Default: all samples.
    group_size : int, default 1
        g; 1 is per-sample, ``batch_size`` is the paper's per-batch route. For g > 1 the
        groups are consecutive samples, so the data order must be random (``subsample``
        draws a random order); the standard error then covers the probes, not the
        partition.
    source : {"matvec", "diagonal"}, default "matvec"
        Probes through ``group_matvecs``, or per-sample diagonals from
        ``est.per_sample_diagonal(kind)`` (the BackPACK backend).
    population : float, optional
        N in the factor 1/B - 1/N; default the estimator's ``num_samples``; ``math.inf``
        for batches drawn i.i.d. (factor 1/B).
    seed : int or torch.Generator, default 0
        The probes and the subsample (a generator on the estimator's device).
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every block of probes.

    Returns
    -------
    NoiseEstimate
        ``value`` averages the probes. ``stderr`` = sqrt(``stderr_probes``^2 +
        ``stderr_groups``^2): the spread over probes / sqrt(n_probes), and a delete-one-group
        jackknife over the groups times the finite-population correction 1 - n / N (the
        groups' n samples are a draw from the population of N, so this covers which samples
        were drawn; it is 0 when the estimator holds the whole population, and the full
        jackknife for i.i.d. batches, ``population=math.inf``).

    Raises
    ------
    InvalidInputError
        For a bad option, a population smaller than ``batch_size``, or fewer than 2 groups.
    UnsupportedCapabilityError
        For ``source="diagonal"`` on a backend without per-sample diagonals, or for the
        empirical Fisher there.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022): eq. 15 (delta = P^-1 Tr X^2) and Algorithm 1.
    B. Efron and C. Stein, "The jackknife estimate of variance", Ann. Statist. 9 (1981).

    Examples
    --------
    A linear model under MSELoss has per-sample Hessians 2 x x^T (x with a 1 for the bias),
    so the truth (1/B - 1/N) S2 is known in closed form:

    >>> import torch, curvlab
    >>> from curvlab.noise import noise_variance
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    >>> y = torch.randn(50, 1, generator=g, dtype=torch.float64)
    >>> est = curvlab.estimator("autograd", torch.nn.Linear(3, 1).double(), torch.nn.MSELoss(),
    ...                         (x, y))
    >>> xa = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    >>> H_n = 2 * xa[:, :, None] * xa[:, None, :]
    >>> S2 = float(((H_n - H_n.mean(0)) ** 2).sum() / (49 * 4))  # 1/(N-1) sum ||.||_F^2 / P
    >>> noise = noise_variance(est, batch_size=10, n_probes=20, seed=0)
    >>> abs(noise.value - (1 / 10 - 1 / 50) * S2) < 3 * noise.stderr
    True
    """
    _check_args(est, batch_size, n_probes, method, group_size, source, subsample)
    n_pop = float(est.num_samples if population is None else population)
    if not n_pop >= batch_size:
        raise InvalidInputError(
            f"population {n_pop:g} is smaller than batch_size {batch_size}; pass the size of "
            "the dataset the batches are drawn from (math.inf for i.i.d. batches)"
        )
    factor = 1.0 / batch_size - (0.0 if math.isinf(n_pop) else 1.0 / n_pop)
    gen = make_generator(seed, est.device)
    work = est if subsample is None else subsample_estimator(est, subsample, gen)
    view = getattr(work, "view", None)
    if view is not None:
        work._current()  # the model's modes as they are now
    coupled = view.batch_coupled() if view is not None else []
    if coupled and 1 < group_size < batch_size:  # groups of one are refused below
        warnings.warn(
            f"train-mode BatchNorm ({', '.join(coupled[:2])}): each group of {group_size} is "
            f"normalised with its own statistics, so the noise of such groups, rescaled to "
            f"batches of {batch_size}, is not the noise of a batch of {batch_size} (smaller "
            "groups overstate it); use groups close to the batch size, or model.eval()",
            CurvlabWarning,
            stacklevel=3,
        )
    if source == "diagonal":
        return _diagonal_estimate(work, n_probes, factor, batch_size)
    # rows: probes uniform on the unit sphere
    V = unit_sphere((est.num_params, n_probes), generator=gen, dtype=est.dtype, device=est.device).T
    stats = probe_statistics(work, V, group_size, progress=progress, callback=callback)
    n_groups = stats.n_groups
    if method == "unbiased":
        sigma2 = stats.centred / (n_groups - 1)
    else:  # Algorithm 1 as printed, with the 1/n: mean ||u_i||^2 - (v^T u_bar)^2
        sigma2 = (stats.centred + n_groups * stats.mean_sq) / n_groups - stats.vu**2
    values = factor * group_size * sigma2
    # the groups are a sample of the population only where it is larger than what is held
    held = 0.0 if math.isinf(n_pop) else min(1.0, work.num_samples / n_pop)
    # the whole population held: the groups are not a sample and add no error
    group_var = (torch.zeros_like(values) if held >= 1.0
                 else (1.0 - held) * (factor * group_size) ** 2 * stats.group_variance())
    probes, groups = _variances(values, group_var)
    return NoiseEstimate(
        value=float(values.mean()),
        stderr=math.sqrt(probes + groups),
        stderr_probes=math.sqrt(probes),
        stderr_groups=math.sqrt(groups),
        per_probe=values,
        batch_size=batch_size,
        n_samples=work.num_samples,
        n_groups=n_groups,
        n_matvecs=n_groups * n_probes,
        method=method,
        source=source,
        trace_per_param=float(stats.vu.mean()),
    )


def _variances(values: torch.Tensor, group_variance: torch.Tensor) -> tuple[float, float]:
    """(var over probes / n_probes, mean over probes of the groups' jackknife variance); the
    first is NaN for one probe, the second 0 when the groups hold the whole population."""
    probes = float(values.var() / values.numel()) if values.numel() > 1 else math.nan
    groups = float(group_variance.mean())
    if math.isnan(probes) and groups > 0:
        probes = 0.0  # one probe: the groups' spread is the error we can measure
    return probes, groups


def _check_args(est, batch_size, n_probes, method, group_size, source, subsample) -> None:
    needed = _NEEDED + (("subset",) if subsample is not None else ())
    missing = [name for name in needed if not hasattr(est, name)]
    if missing:
        raise InvalidInputError(
            f"expected a CurvatureEstimator (curvlab.estimator(...)) or an object with "
            f"{', '.join(needed)}; {type(est).__name__} has no {', '.join(missing)}"
        )
    check_choice("method", method, METHODS)
    check_choice("source", source, SOURCES)
    check_int("batch_size", batch_size, minimum=1)
    check_int("group_size", group_size, minimum=1)
    check_int("n_probes", n_probes, minimum=2 if source == "diagonal" else 1)
    if source == "diagonal" and (method != "unbiased" or group_size != 1):
        raise InvalidInputError(
            "source='diagonal' uses per-sample diagonals: leave method='unbiased' and group_size=1"
        )


def _probes_per_call(est, group_size: int) -> int:
    """Probes vectorised together: [k, G, P] products within about 2^25 numbers (the same
    count on every rank, so the collectives line up)."""
    return max(1, _BLOCK_NUMBERS // max(1, est.num_samples // group_size * est.num_params))


def _group_products(est, V: torch.Tensor, group_size: int) -> torch.Tensor:
    """[k, G, P]: group products for each probe row of V. An Operator (a curvature
    estimator) takes the whole [P, k] block (the autograd backend vectorises it); other
    objects with ``group_matvecs`` (such as PerSampleMatrices) are looped."""
    if isinstance(est, Operator):
        return est.group_matvecs(V.T, group_size)
    return torch.stack([est.group_matvecs(v, group_size) for v in V])


@dataclass(frozen=True)
class ProbeStatistics:
    """Per probe row v of V, over all ranks' n groups with products u_i = H_i v:
    ``centred`` = sum_i d_i with d_i = ||u_i - u_bar||^2, ``spread`` = sum_i (d_i - d_bar)^2,
    ``mean_sq`` = ||u_bar||^2, ``vu`` = v^T u_bar ([k] float64 on the CPU), and ``n_groups``.

    Returned by :func:`probe_statistics`; s2 = centred / (n - 1) is the unbiased per-group
    noise of the module docstring.

    Attributes
    ----------
    centred : torch.Tensor
        [k] sum_i ||u_i - u_bar||^2.
    spread : torch.Tensor
        [k] sum_i (d_i - d_bar)^2, for the jackknife of :meth:`group_variance`.
    mean_sq : torch.Tensor
        [k] ||u_bar||^2.
    vu : torch.Tensor
        [k] v^T u_bar (an estimate of P^-1 Tr H for unit v).
    n_groups : int
        n, the groups over all ranks.

    Examples
    --------
    >>> import torch
    >>> from curvlab.noise import probe_statistics
    >>> from curvlab.shrinkage.synthetic import PerSampleMatrices
    >>> M = torch.stack([torch.eye(2, dtype=torch.float64) * c for c in (1.0, 2.0, 3.0)])
    >>> stats = probe_statistics(PerSampleMatrices(M), torch.tensor([[1.0, 0.0]],
    ...                                                            dtype=torch.float64))
    >>> stats.centred, stats.vu, stats.n_groups  # u_i = (c_i, 0): centred = 1 + 0 + 1
    (tensor([2.], dtype=torch.float64), tensor([2.], dtype=torch.float64), 3)
    """

    centred: torch.Tensor
    spread: torch.Tensor
    mean_sq: torch.Tensor
    vu: torch.Tensor
    n_groups: int

    def group_variance(self) -> torch.Tensor:
        """[k] delete-one-group jackknife variance of s2 = centred / (n - 1).

        Leaving group j out gives s2_(j) = ((n - 1) s2 - n d_j / (n - 1)) / (n - 2), so the
        jackknife variance (n - 1)/n sum_j (s2_(j) - mean)^2 is
        n / ((n - 1) (n - 2)^2) sum_j (d_j - d_bar)^2 (NaN below 3 groups).
        """
        n = self.n_groups
        if n < 3:
            return torch.full_like(self.centred, math.nan)
        return n / ((n - 1) * (n - 2) ** 2) * self.spread


def probe_statistics(
    est,
    V: torch.Tensor,
    group_size: int = 1,
    *,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> ProbeStatistics:
    """The sufficient statistics of shared-probe group products, for probe rows V [k, P].

    Two passes per block of probes: the group sums and counts are all-reduced first, then
    the centred squared norms, which stays accurate when the mean product dominates the
    spread. ``est`` needs ``group_matvecs``, ``num_samples``, ``num_params``, ``n_matvecs``
    and (optionally) ``distributed``.

    Parameters
    ----------
    est : CurvatureEstimator or estimator-like
        Anything with the attributes above (e.g.
        :class:`~curvlab.shrinkage.synthetic.PerSampleMatrices`).
    V : torch.Tensor
        [k, P] probes, one per row.
    group_size : int, default 1
        Samples per group.
    progress : bool, optional
        Show a progress bar on stderr (default: only when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every block of probes.

    Returns
    -------
    ProbeStatistics
        The per-probe sums over all groups (float64, CPU).

    Raises
    ------
    InvalidInputError
        When fewer than 2 groups of ``group_size`` samples exist.
    """
    shared = getattr(est, "distributed", False)
    parts: list[tuple[torch.Tensor, ...]] = []
    n = 0
    blocks = V.split(_probes_per_call(est, group_size))
    for block in track(blocks, "noise probes", progress=progress, callback=callback):
        U = _group_products(est, block, group_size)
        k = block.shape[0]
        head = torch.cat([U.sum(1), U.new_full((k, 1), U.shape[1])], dim=1)
        if shared:
            head = dist.all_reduce_sum(head)
        n = round(float(head[0, -1]))
        if n < 2:
            raise InvalidInputError(
                f"only {n} group(s) of {group_size} samples: the variance needs at least 2; "
                "use a smaller group_size or more data"
            )
        mean = head[:, :-1] / n
        U.sub_(mean[:, None])  # in place: U is this call's own [k, G, P] block
        d = (torch.linalg.vector_norm(U, dim=2) ** 2).to(torch.float64)  # [k, G]
        centred = _all_reduced(d.sum(1), shared)
        spread = _all_reduced(((d - (centred / n)[:, None]) ** 2).sum(1), shared)
        parts.append(
            (
                centred,
                spread,
                (mean * mean).sum(1).to(torch.float64).cpu(),
                (block * mean).sum(1).to(torch.float64).cpu(),
            )
        )
    centred, spread, mean_sq, vu = (torch.cat(t) for t in zip(*parts))
    return ProbeStatistics(centred, spread, mean_sq, vu, n)


def _all_reduced(t: torch.Tensor, shared: bool) -> torch.Tensor:
    """A small float64 tensor summed over ranks (two passes keep the spreads accurate)."""
    t = t.to(torch.float64).cpu()
    return torch.tensor(dist.all_reduce_scalars(*t.tolist()), dtype=torch.float64) if shared else t


def subsample_estimator(
    est: CurvatureEstimator,
    subsample: int | torch.Tensor,
    generator: torch.Generator | None = None,
) -> CurvatureEstimator:
    """``est.subset`` of the given global indices, or of a count drawn with ``generator``.

    Parameters
    ----------
    est : CurvatureEstimator
        The estimator to subsample.
    subsample : int or torch.Tensor
        A count of samples to draw at random (in random order), or 1-D global indices.
    generator : torch.Generator, optional
        The draw's generator (default: seeded with 0).

    Returns
    -------
    CurvatureEstimator
        A new estimator holding only those samples.

    Examples
    --------
    >>> import torch, curvlab
    >>> from curvlab.noise import subsample_estimator
    >>> est = curvlab.estimator("autograd", torch.nn.Linear(2, 1), torch.nn.MSELoss(),
    ...                         (torch.randn(20, 2), torch.randn(20, 1)))
    >>> subsample_estimator(est, 5).num_samples
    5
    """
    if isinstance(subsample, torch.Tensor):
        return est.subset(subsample)
    return est.subset(draw_subsample(est.num_samples, subsample, generator or make_generator(0)))


# ---------------------------------------------------------------------- diagonal source
def _diagonal_estimate(
    est: CurvatureEstimator, n_folds: int, factor: float, batch_size: int
) -> NoiseEstimate:
    """factor * sum_j Var_n(D_nj), with a delete-a-fold jackknife standard error (the
    ``per_probe`` field holds the K leave-one-fold-out values)."""
    values = _diagonal_folds(est, n_folds) * factor
    jack = values[1:]
    spread = ((jack - jack.mean()) ** 2).sum() * (n_folds - 1) / n_folds
    return NoiseEstimate(
        value=float(values[0]),
        stderr=float(spread.sqrt()),
        per_probe=jack,
        batch_size=batch_size,
        n_samples=est.num_samples,
        n_groups=est.num_samples,
        n_matvecs=0,
        method="unbiased",
        source="diagonal",
    )


def _diagonal_folds(est: CurvatureEstimator, n_folds: int) -> torch.Tensor:
    """[1 + K]: sum_j Var_n(D_nj) on all samples, then with each of K folds left out.

    Fold k holds the samples whose global index is k mod K; the sums are all-reduced.
    """
    per_sample = getattr(est, "per_sample_diagonal", None)
    if per_sample is None:
        raise UnsupportedCapabilityError(
            f"backend {est.backend!r} has no per-sample diagonal curvature: use "
            "source='matvec', or the 'backpack' backend for source='diagonal'"
        )
    if est.curvature == "ef":
        raise UnsupportedCapabilityError(
            "source='diagonal' covers the Hessian, GGN and Fisher; use source='matvec' for 'ef'"
        )
    kind = {"hessian": "hessian", "ggn": "ggn", "fisher": "ggn"}[est.curvature]
    if getattr(est, "fisher_type", None) == "mc":
        kind = "ggn_mc"
    D = per_sample(kind).to(torch.float64)
    n_local = D.shape[0]
    total_sum = D.sum(0)
    if est.distributed:
        total_sum = dist.all_reduce_sum(total_sum)
    n_total = est.num_samples
    if n_total < n_folds + 2:
        raise InvalidInputError(
            f"{n_total} samples are too few for {n_folds} jackknife folds; lower n_probes"
        )
    C = D - total_sum / n_total  # centred at the global mean
    offset = 0
    if est.distributed:
        offset = int(shard_layout(n_local, True)[0][dist.rank()])
    folds = (torch.arange(n_local) + offset) % n_folds
    folds = folds.to(C.device)
    stats = C.new_zeros(n_folds, 2 * C.shape[1] + 1)
    stats[:, : C.shape[1]].index_add_(0, folds, C)
    stats[:, C.shape[1] : -1].index_add_(0, folds, C**2)
    stats[:, -1] = torch.bincount(folds, minlength=n_folds).to(C.dtype)
    if est.distributed:
        stats = dist.all_reduce_sum(stats)
    stats = stats.cpu()
    p = C.shape[1]
    s1, s2, counts = stats[:, :p], stats[:, p:-1], stats[:, -1]

    def total_variance(a1, a2, n):
        return float(((a2 - a1**2 / n) / (n - 1)).sum())

    full = total_variance(s1.sum(0), s2.sum(0), float(counts.sum()))
    left_out = [
        total_variance(s1.sum(0) - s1[k], s2.sum(0) - s2[k], float(counts.sum() - counts[k]))
        for k in range(n_folds)
    ]
    return torch.tensor([full, *left_out], dtype=torch.float64)
