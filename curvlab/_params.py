"""Parameters, data batches and flat vectors: the shared plumbing of every backend."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from curvlab import distributed as dist
from curvlab.errors import InvalidInputError
from curvlab.validation import check_int

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_params(model: nn.Module, params: Iterable[torch.Tensor] | None):
    """The parameters to differentiate and their names in ``model``.

    Defaults to the parameters with ``requires_grad``; explicit ones must belong to ``model``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
    else:
        by_id = {id(p): name for name, p in named}
        chosen, seen = [], set()
        for p in params:
            if not isinstance(p, torch.Tensor) or id(p) not in by_id:
                raise InvalidInputError(
                    "params must be parameters of the model (model.parameters())"
                )
            if id(p) not in seen:
                seen.add(id(p))
                chosen.append((by_id[id(p)], p))
    if not chosen:
        raise InvalidInputError(
            "the model has no trainable parameters: set requires_grad=True on the ones to "
            "analyse, or pass params=[...] explicitly"
        )
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise InvalidInputError(
            f"all parameters must share one dtype and device, found {dtypes} on {devices}"
        )
    return [p for _, p in chosen], [name for name, _ in chosen]


def as_batches(data, device: torch.device) -> list[Batch]:
    """One (x, y) batch or an iterable of batches -> a list of (x, y) batches on ``device``.

    Raises on a Dataset passed where batches are expected, empty data, mismatched sample
    counts and data on another device.
    """
    if _is_batch(data):
        batches = [tuple(data)]
    else:
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(
            data, torch.utils.data.IterableDataset
        ):
            raise InvalidInputError(
                f"data is a {type(data).__name__} (a Dataset of single samples), not batches: "
                "pass torch.utils.data.DataLoader(dataset, batch_size=...) or one (x, y) batch"
            )
        try:
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed
                batches = [tuple(b) if isinstance(b, (tuple, list)) else b for b in data]
        except TypeError as exc:
            raise InvalidInputError(
                "data must be one (x, y) batch or an iterable of (x, y) batches"
            ) from exc
    if not batches:
        raise InvalidInputError("data is empty: pass at least one (x, y) batch")
    for i, batch in enumerate(batches):
        if not _is_batch(batch):
            got = type(batch).__name__ if not isinstance(batch, tuple) else f"{len(batch)}-tuple"
            raise InvalidInputError(
                f"batch {i} is not an (x, y) pair of tensors (got a {got}); data must be one "
                "(x, y) batch or an iterable of them"
            )
        x, y = batch
        if x.ndim == 0 or x.shape[0] == 0:
            raise InvalidInputError(f"batch {i} is empty")
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise InvalidInputError(
                f"batch {i}: x has {x.shape[0]} samples but y has "
                f"{'no batch dimension' if y.ndim == 0 else y.shape[0]}"
            )
        for name, t in (("x", x), ("y", y)):
            if t.device != device:
                raise InvalidInputError(
                    f"batch {i}: {name} is on {t.device} but the parameters are on {device}; "
                    f"move the data with .to({str(device)!r})"
                )
    return batches


def check_input_dtypes(batches: Sequence[Batch], dtype: torch.dtype) -> None:
    """Floating inputs must have the parameters' dtype (integer inputs, e.g. token ids for
    an embedding, are left alone)."""
    for i, (x, _) in enumerate(batches):
        if (x.is_floating_point() or x.is_complex()) and x.dtype != dtype:
            raise InvalidInputError(
                f"batch {i}: inputs x have dtype {x.dtype} but the parameters {dtype}; pass "
                f"x.to({dtype}) (or convert the model with model.to({x.dtype}))"
            )


def data_key(batches: Sequence[Batch]) -> tuple:
    """Identifies the data tensors' state: identity, storage and version counter."""
    return tuple((id(t), t.data_ptr(), t._version) for batch in batches for t in batch)


def shard_layout(local_n: int, distributed: bool) -> tuple[torch.Tensor, int]:
    """(offsets of every rank's first sample, total count): global sample indices.

    Rank r holds global samples offsets[r] .. offsets[r] + n_r - 1 (rank order).
    """
    if not distributed:
        return torch.tensor([0, int(local_n)]), int(local_n)
    mine = [0.0] * dist.world_size()
    mine[dist.rank()] = float(local_n)
    counts = torch.tensor(dist.all_reduce_scalars(*mine)).round().long()
    offsets = torch.cumsum(counts, 0) - counts
    return torch.cat([offsets, counts.sum()[None]]), int(counts.sum())


def local_selection(indices: torch.Tensor, local_n: int, distributed: bool) -> torch.Tensor:
    """The local positions of the global ``indices`` that this rank holds, in their order.

    Raises (on every rank alike) when some rank would hold none of them.
    """
    if (not isinstance(indices, torch.Tensor) or indices.is_floating_point()
            or indices.is_complex() or indices.dtype == torch.bool):
        raise InvalidInputError(
            "subsample indices must be an integer tensor of sample indices (for a boolean "
            "mask pass mask.nonzero().squeeze(1)), got "
            + (str(indices.dtype) if isinstance(indices, torch.Tensor) else type(indices).__name__)
        )
    bounds, total = shard_layout(local_n, distributed)
    indices = indices.to("cpu", torch.long)
    if indices.ndim != 1 or indices.numel() == 0:
        raise InvalidInputError("subsample indices must be a non-empty 1-D tensor")
    if int(indices.min()) < 0 or int(indices.max()) >= total:
        raise InvalidInputError(f"subsample indices must lie in [0, {total}), the samples held")
    if indices.unique().numel() != indices.numel():
        raise InvalidInputError("subsample indices must be distinct")
    rank = dist.rank() if distributed else 0
    n_ranks = bounds.numel() - 1
    starts, ends = bounds[:-1], bounds[1:]
    held = [int(((indices >= starts[r]) & (indices < ends[r])).sum()) for r in range(n_ranks)]
    if min(held) == 0:
        raise InvalidInputError(
            f"the subsample leaves a rank without samples (per rank: {held}); subsample more"
        )
    mine = indices[(indices >= starts[rank]) & (indices < ends[rank])]
    return mine - starts[rank]


def draw_subsample(total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct global sample indices out of ``total``, in random order."""
    n = check_int("subsample", n, minimum=2, fix="or pass a 1-D tensor of sample indices")
    perm = torch.randperm(total, generator=generator, device=generator.device)
    return perm[: min(n, total)].cpu()


def _is_batch(obj) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
    )


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat [P] vector (or [P, k] block, giving [k, *shape]) into parameter shapes."""
    out, start = [], 0
    for p in like:
        n = p.numel()
        chunk = vec[start : start + n]
        out.append(chunk.reshape(p.shape) if vec.ndim == 1 else chunk.T.reshape(-1, *p.shape))
        start += n
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """torch.device from "cpu" / "cuda" / "cuda:N"; a CUDA request without CUDA raises."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                "device 'cuda' requested but torch sees no CUDA device "
                f"(torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    return dev
