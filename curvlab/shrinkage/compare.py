"""Side-by-side comparison of shrinkage estimators against a known truth, and a held-out score.

``compare`` draws batches of each size from a ground truth, fits every estimator on the
same batch and records, per (batch size, repeat, estimator): the per-dimension squared
Frobenius error ||H_hat - H||_F^2 / P (the paper's objective; DESIGN.md section 4), the
relative Frobenius error, the spectral-norm error, the overlaps |<u_i, u_hat_i>|^2 of the
truth's top eigenvectors with the estimate's, and the implied damping/shrinkage. The
truth is

- a curvature estimator holding all the data: H = ``to_dense()`` (small models); a batch
  is ``est.subset(indices)`` on B samples drawn without replacement;
- a ``SpikedModel``: H = its matrix, batches its per-sample matrices [B, P, P];
- or a [P, P] array (numpy or torch) with ``samples`` (an [n, P] pool of vector samples,
  numpy or torch; a batch is B rows drawn without replacement) or ``sampler(batch_size,
  seed)`` returning vector samples [B, P], per-sample matrices [B, P, P] or an operator.

The raw estimate is the batch's own matrix: the operator's, the mean of per-sample
matrices, or for vector samples the empirical covariance (centred). Vector samples go to
the linear rules and ``LedoitWolf2020`` as samples, and to the eigenvalue cleaners
(``EigenvalueClipping``, ``RotationInvariant``) as that covariance matrix.

``heldout_score`` needs no truth: -(1/P) E_v ||(H_hat - H') v||^2 with an independent batch's
H' (E v v^T = I). Since E||H_hat - H'||^2 = ||H_hat - H||^2 + E||H' - H||^2 for independent
H', it ranks estimators like the truth's Frobenius error, shifted by a constant.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from curvlab._random import Seed, make_generator, rademacher
from curvlab.errors import InvalidInputError
from curvlab.progress import Callback, Progress
from curvlab.results import Estimate
from curvlab.shrinkage._validation import as_samples
from curvlab.shrinkage.base import is_operator
from curvlab.shrinkage.nonlinear import _SpectralCleaning
from curvlab.shrinkage.registry import make_rule
from curvlab.shrinkage.synthetic import SpikedModel
from curvlab.shrinkage.table import Comparison
from curvlab.validation import check_int

F64 = torch.float64


class _CachedBatch:
    """A batch estimator whose dense matrix is formed once; products reuse it."""

    def __init__(self, est: Any, dense: torch.Tensor):
        self._est, self._dense = est, dense

    def __getattr__(self, name: str) -> Any:
        return getattr(self._est, name)

    def to_dense(self) -> torch.Tensor:
        return self._dense

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._dense @ v


def _truth_and_sampler(truth: Any, sampler: Callable | None, samples: Any):
    if isinstance(truth, SpikedModel):
        return truth.matrix, sampler or truth.sample
    if is_operator(truth) and hasattr(truth, "subset"):
        return truth.to_dense(), sampler or _subset_sampler(truth)
    if truth is None or is_operator(truth):
        raise InvalidInputError(
            "truth must be a curvature estimator holding all the data, a SpikedModel, or a "
            "[P, P] array together with samples= ([n, P]) or sampler(batch_size, seed)"
        )
    matrix = as_samples(truth, estimator="compare")[0].to(F64)
    if matrix.shape[0] != matrix.shape[1]:
        raise InvalidInputError(f"truth must be a square [P, P] matrix, got {tuple(matrix.shape)}")
    if (samples is None) == (sampler is None):
        raise InvalidInputError(
            "with a [P, P] truth pass exactly one of samples= (an [n, P] pool of vector "
            "samples) or sampler= (batch_size, seed) -> a batch"
        )
    if sampler is None:
        pool, _ = as_samples(samples, estimator="compare")
        if pool.shape[1] != matrix.shape[0]:
            raise InvalidInputError(
                f"samples have {pool.shape[1]} features but the truth is "
                f"{matrix.shape[0]} x {matrix.shape[0]}"
            )
        sampler = _row_sampler(pool)
    return matrix, sampler


def _draw(total: int, batch_size: int, seed: Seed) -> torch.Tensor:
    batch_size = check_int("batch_size", batch_size, minimum=1, maximum=total)
    return torch.randperm(total, generator=make_generator(seed))[:batch_size]


def _subset_sampler(est: Any) -> Callable:
    return lambda batch_size, seed: est.subset(_draw(int(est.num_samples), batch_size, seed))


def _row_sampler(pool: torch.Tensor) -> Callable:
    def sample(batch_size: int, seed: Seed) -> torch.Tensor:
        return pool[_draw(pool.shape[0], batch_size, seed).to(pool.device)]

    return sample


def _raw(batch: Any) -> tuple[Any, torch.Tensor, bool]:
    """(the input to fit, the raw dense batch estimate in float64, whether vector samples)."""
    if is_operator(batch):
        dense = batch.to_dense()
        return _CachedBatch(batch, dense), dense.to(F64), False
    T, _ = as_samples(batch, estimator="compare", allow_nd=True)
    if T.ndim == 3:
        return batch, T.to(F64).mean(dim=0), False
    X = T.to(F64)
    X = X - X.mean(dim=0)
    return batch, X.T @ X / X.shape[0], True


def _fit(est: Any, batch: Any, raw: torch.Tensor, vectors: bool) -> None:
    if vectors and isinstance(est, _SpectralCleaning):
        est.fit(raw)  # eigenvalue cleaners take the sample covariance itself
    else:
        est.fit(batch)


def _dense_estimate(est: Any, raw: torch.Tensor) -> torch.Tensor:
    cov = getattr(est, "covariance_", None)
    if cov is not None:
        return torch.as_tensor(cov).to(F64).cpu()
    eye = torch.eye(raw.shape[0], dtype=est.dtype, device=est.device)
    return est.matvec(eye).to(F64).cpu()


def _metrics(estimate: torch.Tensor, truth: torch.Tensor, top: torch.Tensor) -> dict:
    diff = estimate - truth
    p = truth.shape[0]
    frob2 = float((diff * diff).sum())
    record = {
        "frobenius": frob2 / p,
        "relative_frobenius": (frob2 / float((truth * truth).sum())) ** 0.5,
        "spectral": float(torch.linalg.eigvalsh(diff).abs().max()),
    }
    _, vecs = torch.linalg.eigh(estimate)
    est_top = vecs.flip(1)[:, : top.shape[1]]
    overlaps = ((top * est_top).sum(dim=0)) ** 2
    record.update({f"overlap_{i + 1}": float(o) for i, o in enumerate(overlaps)})
    return record


def compare(
    truth: Any,
    estimators: Mapping[str, Any] | Iterable[Any],
    batch_sizes: Iterable[int],
    *,
    samples: Any = None,
    n_repeats: int = 1,
    seed: int = 0,
    n_overlaps: int = 3,
    sampler: Callable | None = None,
    csv_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> Comparison:
    """Compare ``estimators`` on batches of each size drawn from a known ``truth``.

    Parameters
    ----------
    truth : CurvatureEstimator, SpikedModel or array-like [P, P]
        The ground truth and, for the first two, the source of batches (module docstring).
    estimators : mapping of name -> estimator, or iterable of estimators
        Unfitted estimators (named by class when not a mapping), or names of registered
        rules (:func:`curvlab.shrinkage.register_rule`; ``"ledoit_wolf"``, ``"oas"``, ...),
        built with their defaults and named by that name; the raw batch estimate is added
        as "raw".
    batch_sizes : iterable of int
        The batch sizes B to draw.
    samples : array-like or torch.Tensor [n, P], optional
        A pool of vector samples of a [P, P] truth (its population covariance).
    n_repeats : int, default 1
        Independent batches per size; ``summary()`` gives mean ± standard error over them.
    seed : int, default 0
        Batch r of size B uses seed ``seed + 1000 r + B``; every estimator sees that batch.
    n_overlaps : int, default 3
        Top eigenvectors of the truth whose overlaps are recorded.
    sampler : callable, optional
        ``sampler(batch_size, seed)`` -> a batch, instead of the truth's own.
    csv_path : str or Path, optional
        Also write the records there as CSV.
    plot_path : str or Path, optional
        Also save the Frobenius error with error bars there as a plot.
    progress : bool or None, default None
        A bar on stderr (None: when stderr is a terminal).
    callback : callable, optional
        Called with a :class:`~curvlab.progress.ProgressEvent` after every fit.

    Returns
    -------
    Comparison
        The records (a list of dicts: ``batch_size``, ``repeat``, ``estimator``,
        ``frobenius``, ``relative_frobenius``, ``spectral``, ``overlap_i``, ``shrinkage``,
        ``damping``, ``noise_variance``, ``seconds``) with ``summary()``, ``to_csv()``,
        ``to_pandas()`` and ``plot(ax=...)``.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022) (the per-dimension Frobenius objective, eq. 15).
    O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance
    matrices", J. Multivariate Anal. 88(2) (2004).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlab.shrinkage import LedoitWolf
    >>> rng = np.random.default_rng(0)
    >>> table = compare(np.eye(20), {"LW": LedoitWolf()}, [10, 40], n_repeats=3,
    ...                 samples=rng.standard_normal((500, 20)), progress=False)
    >>> row = {(r["estimator"], r["batch_size"]): r for r in table.summary(["frobenius"])}
    >>> bool(row["LW", 10]["mean"] < row["raw", 10]["mean"])
    True
    """
    if not isinstance(estimators, Mapping):
        estimators = {e if isinstance(e, str) else type(e).__name__: e for e in estimators}
    estimators = {name: make_rule(e) for name, e in estimators.items()}
    n_repeats = check_int("n_repeats", n_repeats, minimum=1)
    batch_sizes = list(batch_sizes)
    matrix, sample = _truth_and_sampler(truth, sampler, samples)
    matrix = matrix.detach().to(F64).cpu()
    _, vecs = torch.linalg.eigh(matrix)
    top = vecs.flip(1)[:, :n_overlaps]
    records = Comparison()
    total = len(batch_sizes) * n_repeats * (1 + len(estimators))
    with Progress("compare", total, progress=progress, callback=callback) as bar:
        for batch_size in batch_sizes:
            for repeat in range(n_repeats):
                batch, raw, vectors = _raw(sample(batch_size, seed + 1000 * repeat + batch_size))
                raw = raw.cpu()
                base = {"batch_size": batch_size, "repeat": repeat}
                records.append({**base, "estimator": "raw", **_metrics(raw, matrix, top),
                                "shrinkage": 0.0, "damping": 0.0, "noise_variance": None,
                                "seconds": 0.0})
                bar.update(batch_size=batch_size)
                for name, est in estimators.items():
                    start = time.perf_counter()
                    _fit(est, batch, raw, vectors)
                    seconds = time.perf_counter() - start
                    records.append({
                        **base, "estimator": name,
                        **_metrics(_dense_estimate(est, raw), matrix, top),
                        "shrinkage": getattr(est, "shrinkage_", None),
                        "damping": getattr(est, "damping_", None),
                        "noise_variance": getattr(est, "noise_variance_", None),
                        "seconds": seconds,
                    })
                    bar.update(batch_size=batch_size)
    if csv_path is not None:
        records.to_csv(csv_path)
    if plot_path is not None:
        records.plot(path=plot_path)
    return records


def heldout_score(estimate: Any, other: Any, n_probes: int = 10, seed: Seed = 0) -> Estimate:
    """-(1/P) E||(H_hat - H') v||^2 with Rademacher probes (higher is better).

    Parameters
    ----------
    estimate : fitted estimator, operator or callable
        Anything with ``matvec``, or a callable v -> H_hat v.
    other : operator
        An independent batch's curvature H' (``num_params``, ``dtype``, ``device``,
        ``matvec``).
    n_probes : int, default 10
        Probes (>= 2); the standard error is their spread.
    seed : int or torch.Generator, default 0
        The probes.

    Returns
    -------
    Estimate
        ``value`` (the score), ``stderr`` (the probes' spread / sqrt(n_probes)) and
        ``n_matvecs``.

    References
    ----------
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18 (1989) (E v v^T = I).

    Examples
    --------
    >>> from curvlab.shrinkage import PerSampleMatrices, RotationInvariant, SpikedModel
    >>> model = SpikedModel(200, spikes=(10.0,), noise=2.0)
    >>> batch, other = model.sample(4, seed=1), PerSampleMatrices(model.sample(4, seed=2))
    >>> cleaned = heldout_score(RotationInvariant().fit(batch), other, n_probes=50)
    >>> raw = heldout_score(lambda v: batch.mean(0) @ v, other, n_probes=50)
    >>> bool(cleaned.value > raw.value)
    True
    """
    apply = estimate if callable(estimate) and not hasattr(estimate, "matvec") else estimate.matvec
    if not is_operator(other):
        raise InvalidInputError("other must be an operator (num_params, dtype, device, matvec)")
    n_probes = check_int("n_probes", n_probes, minimum=2, fix="two probes give a standard error")
    p = int(other.num_params)
    gen = make_generator(seed, other.device)
    V = rademacher((p, n_probes), generator=gen, dtype=other.dtype, device=other.device)
    D = torch.as_tensor(apply(V), dtype=other.dtype) - other.matvec(V)
    per_probe = -(D * D).sum(dim=0) / p
    return Estimate(
        value=float(per_probe.mean()),
        stderr=float(per_probe.std() / n_probes**0.5),
        n_matvecs=n_probes,
        samples=per_probe,
    )
