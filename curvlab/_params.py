"""Parameters, data batches and flat vectors: the shared plumbing of every backend."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from curvlab.errors import InvalidInputError

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

    Raises on empty data, mismatched sample counts and data on another device.
    """
    if _is_batch(data):
        batches = [tuple(data)]
    else:
        try:
            batches = [tuple(b) for b in data]
        except TypeError as exc:
            raise InvalidInputError(
                "data must be one (x, y) batch or an iterable of (x, y) batches"
            ) from exc
    if not batches:
        raise InvalidInputError("data is empty: pass at least one (x, y) batch")
    for i, batch in enumerate(batches):
        if not _is_batch(batch):
            raise InvalidInputError(f"batch {i} is not an (x, y) pair of tensors")
        x, y = batch
        if x.shape[0] == 0:
            raise InvalidInputError(f"batch {i} is empty")
        if y.shape[0] != x.shape[0]:
            raise InvalidInputError(f"batch {i}: x has {x.shape[0]} samples but y has {y.shape[0]}")
        for name, t in (("x", x), ("y", y)):
            if t.device != device:
                raise InvalidInputError(
                    f"batch {i}: {name} is on {t.device} but the parameters are on {device}; "
                    f"move the data with .to({str(device)!r})"
                )
    return batches


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
