"""Memory and time budgets of the spectral methods: predictions and the warnings they give.

- Memory: a Lanczos or SLQ basis is P x steps numbers. Before allocating one, a method warns
  (:class:`~curvlab.errors.CurvlabWarning`) when it needs more than the memory available on
  the device now (CPU: ``MemAvailable`` of /proc/meminfo or the free physical pages; CUDA:
  ``torch.cuda.mem_get_info``). Unknown availability (other platforms) gives no warning.
- Size rules (float64 Lanczos bases for float32 products, SLQ probes run together) compare
  against a fixed fraction of the device's *total* memory, so the same machine always takes
  the same route and the same seed gives the same numbers.
- Time: after the first product a method predicts its run time as (seconds of that product)
  x (products planned) and warns when the prediction exceeds :data:`LONG_CALL_SECONDS`.
  The first product can include one-time work (building a graph), so the prediction errs
  long.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

import torch

from curvlab.errors import CurvlabWarning

#: A call predicted to run longer than this (seconds) warns after its first product.
LONG_CALL_SECONDS = 60.0
#: Size rules allow a basis up to this fraction of the device's total memory.
BASIS_MEMORY_FRACTION = 0.25

_GIB = 2**30


def element_size(dtype: torch.dtype) -> int:
    """Bytes per number of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def total_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (CPU: physical RAM), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return None


def available_memory(device: torch.device) -> int | None:
    """Memory of ``device`` available now in bytes, or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def fits_budget(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` is within :data:`BASIS_MEMORY_FRACTION` of the device's total
    memory (False when the total is unknown)."""
    total = total_memory(device)
    return total is not None and nbytes <= BASIS_MEMORY_FRACTION * total


def warn(message: str) -> None:
    """A :class:`CurvlabWarning` attributed to the first caller outside curvlab."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(CurvlabWarning(message), stacklevel=level)


def warn_if_over_memory(what: str, nbytes: int, device: torch.device, fix: str) -> None:
    """Warn when ``what`` needs more than the memory available on ``device`` now."""
    available = available_memory(device)
    if available is not None and nbytes > available:
        warn(
            f"{what} needs about {nbytes / _GIB:.2f} GiB but only "
            f"{available / _GIB:.2f} GiB is available on {torch.device(device)}; {fix}"
        )


class TimedProducts:
    """Wrap a product function: time its first call and warn when the planned number of
    products is predicted to take longer than :data:`LONG_CALL_SECONDS`.

    Parameters
    ----------
    product : callable
        The product (a [P] or [P, b] tensor to a tensor of the same shape).
    what : str
        The operation, for the warning (e.g. ``"spectral_density"``).
    planned : int
        Products (matvecs) the operation expects to compute in all.
    fix : str
        How to make the call cheaper, for the warning.
    """

    def __init__(self, product: Callable, what: str, planned: int, fix: str):
        self.product, self.what, self.planned, self.fix = product, what, planned, fix
        self.checked = False

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.product(v)
        start = time.perf_counter()
        out = self.product(v)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        per_matvec = (time.perf_counter() - start) / (v.shape[1] if v.ndim == 2 else 1)
        self.checked = True
        predicted = per_matvec * self.planned
        if predicted > LONG_CALL_SECONDS:
            warn(
                f"{self.what} is predicted to take about {predicted:.0f} s "
                f"({self.planned} products at {per_matvec:.3g} s each, from the first); "
                f"{self.fix}"
            )
        return out
