"""Reductions of curvature statistics through ``torch.distributed`` collectives.

Every function is a no-op on one process, so core code calls them unconditionally.
Data is sharded across ranks; sums are all-reduced, so every rank sees the numbers a
single process would compute on the union of the shards (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is running.

    Returns
    -------
    bool
        False on one process, also when a group of size 1 is initialised.

    Examples
    --------
    >>> from curvlab import distributed
    >>> distributed.is_distributed(), distributed.world_size(), distributed.rank()
    (False, 1, 0)
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 when not distributed).

    Returns
    -------
    int
        ``dist.get_world_size()`` under :func:`is_distributed`, else 1.
    """
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 when not distributed).

    Returns
    -------
    int
        ``dist.get_rank()`` under :func:`is_distributed`, else 0.
    """
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks; the input is left unchanged.

    Parameters
    ----------
    tensor : torch.Tensor
        This rank's part, on a device the process group's backend supports.

    Returns
    -------
    torch.Tensor
        A new tensor holding the sum over ranks; on one process, ``tensor`` itself.

    Examples
    --------
    >>> import torch
    >>> from curvlab.distributed import all_reduce_sum
    >>> all_reduce_sum(torch.tensor([1.0, 2.0]))  # one process: unchanged
    tensor([1., 2.])
    """
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_scalars(*values: float, dtype=torch.float64, device="cpu") -> list[float]:
    """Sum a few Python numbers over ranks in one collective.

    Parameters
    ----------
    *values : float
        This rank's numbers.
    dtype : torch.dtype, default torch.float64
        The dtype they travel in.
    device : str or torch.device, default "cpu"
        The device they travel on (the current CUDA device under the NCCL backend).

    Returns
    -------
    list of float
        The sums over ranks, in order; on one process, the values as floats.

    Examples
    --------
    >>> from curvlab.distributed import all_reduce_scalars
    >>> all_reduce_scalars(1, 2.5)
    [1.0, 2.5]
    """
    if not is_distributed():
        return [float(v) for v in values]
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]
