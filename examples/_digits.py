"""The examples' data: scikit-learn's 8x8 digits (bundled with scikit-learn, no download)."""

from __future__ import annotations

import argparse

import torch


def digits_batches(
    batch_size: int = 64, *, images: bool = False, limit: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Digits as float32 batches in a fixed order: x [B, 64] (or [B, 1, 8, 8]), y [B].

    Parameters
    ----------
    batch_size : int, default 64
    images : bool, default False
        Shape the inputs as one-channel images (for a CNN).
    limit : int, optional
        Use only the first ``limit`` samples (small runs).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:limit] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:limit])
    if images:
        x = x.reshape(-1, 1, 8, 8)
    n = x.shape[0] // batch_size
    return [(x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
            for i in range(n)]


def arguments(description: str, steps: int, update_every: int) -> argparse.ArgumentParser:
    """The flags every example takes: ``--steps``, ``--update-every`` and ``--tiny``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="training steps")
    parser.add_argument(
        "--update-every", type=int, default=update_every, help="steps between damper updates"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a few seconds' run: 40 steps, updates every 10"
    )
    return parser


def tiny(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--tiny``."""
    if args.tiny:
        args.steps, args.update_every = 40, 10
    return args
