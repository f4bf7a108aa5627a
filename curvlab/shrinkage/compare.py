"""Side-by-side comparison of shrinkage estimators against a known truth, and a held-out score.

``compare`` draws batches of each size from a ground truth, fits every estimator on the
same batch and records, per (batch size, repeat, estimator): the per-dimension squared
Frobenius error ||H_hat - H||_F^2 / P (the paper's objective; DESIGN.md section 4), the
relative Frobenius error, the spectral-norm error, the overlaps |<u_i, u_hat_i>|^2 of the
truth's top eigenvectors with the estimate's, and the implied damping/shrinkage. The
truth is

- a curvature estimator holding all the data: H = ``to_dense()`` (small models), batches are
  estimators of the same class on B samples drawn without replacement;
- a ``SpikedModel``: H = its matrix, batches its per-sample matrices [B, P, P];
- or a dense [P, P] tensor with ``sampler(batch_size, seed)`` returning a fit input.

``heldout_score`` needs no truth: -(1/P) E_v ||(H_hat - H') v||^2 with an independent batch's
H' (E v v^T = I). Since E||H_hat - H'||^2 = ||H_hat - H||^2 + E||H' - H||^2 for independent
H', it ranks estimators like the truth's Frobenius error, shifted by a constant.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from curvlab._random import Seed, make_generator, rademacher
from curvlab.errors import BackendUnavailableError, InvalidInputError
from curvlab.results import Estimate
from curvlab.shrinkage._validation import as_samples
from curvlab.shrinkage.base import LinearShrinkage, is_operator
from curvlab.shrinkage.synthetic import SpikedModel


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


def _truth_and_sampler(truth: Any, sampler: Callable | None):
    if isinstance(truth, SpikedModel):
        return truth.matrix, sampler or truth.sample
    if is_operator(truth) and hasattr(truth, "batches"):
        dense = truth.to_dense()
        return dense, sampler or _subset_sampler(truth)
    if isinstance(truth, torch.Tensor) and sampler is not None:
        return truth, sampler
    raise InvalidInputError(
        "truth must be a curvature estimator holding all the data, a SpikedModel, or a dense "
        "[P, P] tensor together with sampler(batch_size, seed)"
    )


def _subset_sampler(est: Any) -> Callable:
    total = int(est.num_samples)

    def sample(batch_size: int, seed: Seed):
        if not 1 <= batch_size <= total:
            raise InvalidInputError(f"batch_size must lie in [1, {total}], got {batch_size}")
        return est.subset(torch.randperm(total, generator=make_generator(seed))[:batch_size])

    return sample


def _raw(batch: Any) -> tuple[Any, torch.Tensor]:
    """(the input to fit, the raw dense batch estimate)."""
    if is_operator(batch):
        dense = batch.to_dense()
        return _CachedBatch(batch, dense), dense
    T, _ = as_samples(batch, allow_nd=True)
    return batch, T.mean(dim=0) if T.ndim == 3 else T


def _dense_estimate(est: Any, raw: torch.Tensor) -> torch.Tensor:
    if hasattr(est, "covariance_"):
        return torch.as_tensor(est.covariance_, dtype=raw.dtype)
    if isinstance(est, LinearShrinkage):
        out = (1.0 - est.shrinkage_) * raw
        out.diagonal().add_(est.shrinkage_ * est.target_scale_)
        return out
    return torch.as_tensor(est.matvec(torch.eye(raw.shape[0], dtype=raw.dtype)), dtype=raw.dtype)


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
    n_repeats: int = 1,
    seed: int = 0,
    n_overlaps: int = 3,
    sampler: Callable | None = None,
    csv_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> list[dict]:
    """Records comparing ``estimators`` (name -> unfitted estimator) on batches from ``truth``.

    The raw batch estimate appears as estimator "raw". Batch r of size B uses seed
    ``seed + 1000 * r + B``; every estimator sees the same batch. Writes the records to
    ``csv_path`` and a plot of the Frobenius error against the batch size to ``plot_path``
    (matplotlib) when given.
    """
    if not isinstance(estimators, Mapping):
        estimators = {type(e).__name__: e for e in estimators}
    matrix, sample = _truth_and_sampler(truth, sampler)
    matrix = matrix.detach()
    _, vecs = torch.linalg.eigh(matrix)
    top = vecs.flip(1)[:, :n_overlaps]
    records = []
    for batch_size in batch_sizes:
        for repeat in range(n_repeats):
            batch, raw = _raw(sample(batch_size, seed + 1000 * repeat + batch_size))
            base = {"batch_size": batch_size, "repeat": repeat}
            records.append({**base, "estimator": "raw", **_metrics(raw, matrix, top),
                            "shrinkage": 0.0, "damping": 0.0, "noise_variance": None,
                            "seconds": 0.0})
            for name, est in estimators.items():
                start = time.perf_counter()
                est.fit(batch)
                seconds = time.perf_counter() - start
                records.append({
                    **base, "estimator": name,
                    **_metrics(_dense_estimate(est, raw), matrix, top),
                    "shrinkage": getattr(est, "shrinkage_", None),
                    "damping": getattr(est, "damping_", None),
                    "noise_variance": getattr(est, "noise_variance_", None),
                    "seconds": seconds,
                })
    if csv_path is not None:
        write_csv(records, csv_path)
    if plot_path is not None:
        plot(records, plot_path)
    return records


def write_csv(records: list[dict], path: str | Path) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def plot(records: list[dict], path: str | Path, metric: str = "frobenius") -> None:
    """Mean ``metric`` over repeats against the batch size, one line per estimator."""
    try:  # a Figure on its own canvas leaves the user's pyplot backend alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting needs matplotlib: pip install 'curvlab[experiments]'"
        ) from exc

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name in dict.fromkeys(r["estimator"] for r in records):
        rows = [r for r in records if r["estimator"] == name]
        sizes = sorted({r["batch_size"] for r in rows})
        means = [
            sum(r[metric] for r in rows if r["batch_size"] == b)
            / sum(1 for r in rows if r["batch_size"] == b)
            for b in sizes
        ]
        ax.plot(sizes, means, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("||H_hat - H||_F^2 / P" if metric == "frobenius" else metric)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def heldout_score(estimate: Any, other: Any, n_probes: int = 10, seed: Seed = 0) -> Estimate:
    """-(1/P) E||(H_hat - H') v||^2 with Rademacher probes (higher is better).

    ``estimate``: a fitted estimator (or anything with ``matvec``, or a callable v -> H_hat v);
    ``other``: an operator for an independent batch's curvature H'. The standard error is
    the spread over probes.
    """
    apply = estimate if callable(estimate) and not hasattr(estimate, "matvec") else estimate.matvec
    if not is_operator(other):
        raise InvalidInputError("other must be an operator (num_params, dtype, device, matvec)")
    if n_probes < 2:
        raise InvalidInputError(f"n_probes must be >= 2, got {n_probes}")
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
