"""Shared helpers for the benchmarks: timing, tables, a trained digits MLP."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def cpu_time(fn: Callable[[], object]) -> float:
    """CPU seconds of one call (process time: steadier than wall time on a shared machine)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 30
) -> dict[str, float]:
    """Median seconds per call, alternating the candidates so drift hits all equally."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(cell):
        if isinstance(cell, float):
            return f"{cell:.3g}"
        return str(cell)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def digits(n: int | None = None, dtype=torch.float64):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=dtype)
    y = torch.tensor(data.target)
    return (x[:n], y[:n]) if n else (x, y)


def train_on_digits(model: nn.Module, steps: int = 200, dtype=torch.float64,
                    seed: int = 0) -> nn.Module:
    """``model`` (on flat [N, 64] digits) after ``steps`` Adam steps (lr 1e-2, batches of
    128) with cross-entropy."""
    x, y = digits(dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def trained_mlp(hidden: int = 128, steps: int = 200, dtype=torch.float64, seed: int = 0):
    """A 64-hidden-10 tanh MLP trained briefly with Adam on digits."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)
    return train_on_digits(model, steps, dtype, seed), nn.CrossEntropyLoss()


def digits_cnn() -> nn.Sequential:
    """Conv 1-8 (tanh), conv 8-16 stride 2 (tanh), linear to 10 classes, for [N, 1, 8, 8]
    digits; weights from torch.manual_seed(0)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
