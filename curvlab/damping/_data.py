"""The samples of one damping update: read the batch, check it, choose the samples.

Everything here is rank-local and raises nothing the damper does not catch before the
ranks agree (see :mod:`curvlab.damping.sync`); choosing samples from global indices is a
pure function of the agreed per-rank counts, so it needs no collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvlab._params import as_batches, check_input_dtypes
from curvlab.errors import InvalidInputError
from curvlab.validation import check_int

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Subsample:
    """Estimate on ``size`` samples drawn from the data passed to ``step`` (e.g. the
    training set), instead of on all of it.

    Attributes
    ----------
    size : int
        Samples drawn (over all ranks), at least 2.
    fresh : bool, default False
        Draw new samples at every update; otherwise the first draw is reused, and the same
        data must be passed at every update (the paper's fixed subsample).

    Examples
    --------
    >>> Subsample(1024)
    Subsample(size=1024, fresh=False)
    """

    size: int
    fresh: bool = False

    def __post_init__(self) -> None:
        check_int("subsample", self.size, minimum=2)


def as_subsample(spec: Any) -> Subsample | None:
    """``subsample=``: None, an int (a fixed draw of that many samples) or a Subsample."""
    if spec is None or isinstance(spec, Subsample):
        return spec
    return Subsample(spec)


def batch_size_of(data: Any) -> int:
    """Samples in ``data`` if it is one (x, y) batch of tensors, else 0 (not counted)."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x = data[0]
        if isinstance(x, torch.Tensor) and x.ndim > 0:
            return int(x.shape[0])
    return 0


def read_batch(data: Any, params: Sequence[torch.Tensor]) -> Batch:
    """One (x, y) pair from one batch or an iterable of batches, checked against the
    parameters (device, floating dtype, matching sample counts) as estimators check theirs;
    a DataLoader leaves the global RNG as found."""
    if data is None:
        raise InvalidInputError(
            "this step re-estimates the damping: pass the data, damper.step(model, loss_fn, "
            "(x, y))"
        )
    batches = as_batches(data, params[0].device)
    check_input_dtypes(batches, params[0].dtype)
    if len(batches) == 1:
        return batches[0]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every floating entry of ``tensors`` is finite (integer tensors always are)."""
    for t in tensors:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return False
    return True


def global_indices(
    total: int,
    subsample: Subsample | None,
    shuffle: bool,
    kept: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(global sample indices to estimate on, in order; the subsample to keep for later).

    None: all samples as given. A subsample is drawn (or ``kept`` reused); without one, a
    rule that groups samples gets a fresh random order of all of them.
    """
    if subsample is not None:
        if kept is not None and not subsample.fresh:
            if int(kept.max()) >= total:
                raise InvalidInputError(
                    f"the fixed subsample was drawn from more samples than the {total} passed "
                    "now; pass the same data at every update, or Subsample(size, fresh=True)"
                )
            return kept, kept
        drawn = torch.randperm(total, generator=generator)[: min(subsample.size, total)]
        return drawn, drawn
    if shuffle:
        return torch.randperm(total, generator=generator), kept
    return None, kept


def local_positions(
    indices: torch.Tensor, counts: Sequence[int], rank: int
) -> tuple[torch.Tensor | None, list[int], str | None]:
    """(positions in this rank's samples of the global ``indices`` it holds, in order; how
    many of them each rank holds; the reason some rank holds none, or None). Rank r holds
    the global samples sum(counts[:r]) .. sum(counts[:r + 1]) - 1."""
    starts = [sum(counts[:r]) for r in range(len(counts))]
    held = [int(((indices >= s) & (indices < s + n)).sum()) for s, n in zip(starts, counts)]
    if min(held) == 0:
        why = f"the subsample leaves rank {held.index(0)} without samples (per rank: {held})"
        return None, held, why
    start = starts[rank]
    mine = indices[(indices >= start) & (indices < start + counts[rank])]
    return mine - start, held, None
