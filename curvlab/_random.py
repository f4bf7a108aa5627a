"""Seeded random probes: every randomized routine takes ``seed`` (int or Generator)."""

from __future__ import annotations

import torch

Seed = int | torch.Generator | None


def make_generator(seed: Seed, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device``; an int seeds a fresh one, a Generator is used as is."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def seed_int(seed: Seed) -> int:
    """An int seed: the int itself (None -> 0), or one drawn from a Generator."""
    if isinstance(seed, torch.Generator):
        return int(torch.randint(2**62, (1,), generator=seed, device=seed.device))
    return 0 if seed is None else int(seed)


def rademacher(shape, *, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """Entries +-1 with equal probability."""
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def gaussian(shape, *, generator: torch.Generator, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def unit_sphere(shape, *, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """Columns drawn uniformly from the unit sphere (shape [P] or [P, k])."""
    v = gaussian(shape, generator=generator, dtype=dtype, device=device)
    return v / v.norm(dim=0, keepdim=True)
