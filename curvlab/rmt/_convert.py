"""Inputs in, results out for the vectorized random-matrix formulas: they accept floats, numpy
arrays or torch tensors and broadcast; they return a torch tensor when any array argument is a
tensor (its dtype and device when floating), else a numpy array (a Python number when 0-d)."""

from __future__ import annotations

import numpy as np
import torch

from curvlab.errors import InvalidInputError


class _Out:
    """Remembers the kind of the inputs so results come back as tensor, array or number."""

    def __init__(self, values: tuple):
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        self.torch = bool(tensors)
        floating = [t for t in tensors if t.is_floating_point() or t.is_complex()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        real = torch.float64
        if floating and all(t.dtype in (torch.float32, torch.complex64) for t in floating):
            real = torch.float32
        self.dtype = real
        self.cdtype = torch.complex64 if real == torch.float32 else torch.complex128

    def tensor(self, value, *, complex_: bool = False) -> torch.Tensor:
        dtype = self.cdtype if complex_ else self.dtype
        if isinstance(value, torch.Tensor):
            return value.to(device=self.device, dtype=dtype)
        return torch.as_tensor(np.asarray(value), device=self.device).to(dtype)

    def out(self, result: torch.Tensor):
        if self.torch:
            return result
        array = result.cpu().numpy()
        if array.ndim == 0:
            return complex(array) if np.iscomplexobj(array) else float(array)
        return array


def _positive(name: str, value: torch.Tensor, *, allow_zero: bool = False) -> None:
    bad = (value < 0) if allow_zero else (value <= 0)
    if bool(torch.any(bad | ~torch.isfinite(value))):
        rel = ">= 0" if allow_zero else "> 0"
        raise InvalidInputError(f"{name} must be finite and {rel}; got {value.tolist()}")
