"""Reductions of curvature statistics through ``torch.distributed`` collectives.

Every function is a no-op on one process, so core code calls them unconditionally.
Data is sharded across ranks; sums are all-reduced, so every rank sees the numbers a
single process would compute on the union of the shards (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (returns a new tensor; the input is left unchanged)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_scalars(*values: float, dtype=torch.float64, device="cpu") -> list[float]:
    """Sum a few Python numbers over ranks in one collective."""
    if not is_distributed():
        return [float(v) for v in values]
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]
