"""The networks and data the experiments train: a small CNN on digits (CPU scales) and the
paper's VGG-16 on CIFAR-100 (``--scale paper``, for a GPU).

The paper's deep-network experiments (sections 6-8) train VGG-16 without batch
normalisation or weight decay on CIFAR-100 with batches of 128. ``--scale paper`` runs the
same: :func:`vgg16_cifar100` reads CIFAR-100 from local files only (torchvision's
``cifar-100-python`` folder under ``root`` or ``$CURVLAB_DATA``; nothing is downloaded,
and a missing folder raises :class:`~curvlab.experiments.data.DataNotFoundError` naming
what to fetch). The CPU scales use :func:`digits_cnn`, a 2k-parameter CNN on
scikit-learn's 8x8 digits, which keeps the paper's ingredients (convolutions and ReLU, no
normalisation, cross-entropy, KFAC-compatible layers) at a size a CPU trains in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import _common as C
from .data import Dataset, load_sklearn, load_torchvision

#: VGG-16's convolution widths ("M": 2x2 max-pooling), configuration D of Simonyan and
#: Zisserman (2014).
VGG16_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16(nn.Sequential):
    """VGG-16 for 32x32 images without batch normalisation or dropout (the paper's section
    6.2 "laboratory"): 13 3x3 convolutions with ReLU and 5 max-poolings, then a 512-512-512
    classifier with ReLU. 15.3M parameters for 100 classes.

    Parameters
    ----------
    n_classes : int, default 100
    in_channels : int, default 3

    Examples
    --------
    >>> model = VGG16(n_classes=100)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """

    def __init__(self, n_classes: int = 100, in_channels: int = 3):
        layers: list[nn.Module] = []
        channels = in_channels
        for width in VGG16_LAYERS:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        layers += [
            nn.Flatten(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, n_classes),
        ]
        super().__init__(*layers)


@dataclass(frozen=True)
class Workload:
    """A data split, a seeded model factory and the training batch size."""

    name: str
    data: Dataset
    model_factory: Callable[[], nn.Module]
    batch_size: int
    description: str


def digits_cnn(seed: int, device: torch.device, batch_size: int = 64) -> Workload:
    """:class:`~curvlab.experiments._common.DigitsCNN` (float32) on digits split by ``seed``
    (1347 train, 450 validation); the model is initialised from ``seed``."""
    data = load_sklearn("digits", image=True, dtype=torch.float32, device=device, seed=seed)
    return Workload(
        "digits_cnn",
        data,
        lambda: C.seeded(seed, lambda: C.DigitsCNN().to(device)),
        batch_size,
        describe_workload("fast", batch_size),
    )


def cifar100(device: torch.device, root=None, limit: int | None = None) -> Dataset:
    """CIFAR-100 read from local files: the 50000 training images train, the 10000 test
    images validate; channels standardised with the training set's mean and std."""
    x_train, y_train = load_torchvision("cifar100", root=root, train=True, limit=limit)
    x_val, y_val = load_torchvision("cifar100", root=root, train=False, limit=limit)
    mean = x_train.mean((0, 2, 3), keepdim=True)
    std = x_train.std((0, 2, 3), keepdim=True)
    return Dataset(
        "cifar100",
        ((x_train - mean) / std).to(device),
        y_train.to(device),
        ((x_val - mean) / std).to(device),
        y_val.to(device),
        100,
    )


def vgg16_cifar100(seed: int, device: torch.device, root=None) -> Workload:
    """The paper's VGG-16 (no batch norm, no weight decay) on CIFAR-100, batch 128."""
    data = cifar100(device, root=root)
    return Workload(
        "vgg16_cifar100",
        data,
        lambda: C.seeded(seed, lambda: VGG16(100).to(device)),
        128,
        DESCRIPTIONS["vgg16_cifar100"],
    )


DESCRIPTIONS = {
    "digits_cnn": "CNN conv8-conv16-linear (1.9k parameters) on digits 8x8, batch 64",
    "vgg16_cifar100": "VGG-16 without batch norm (15.3M parameters) on CIFAR-100, batch 128",
}


def describe_workload(scale: str, batch_size: int | None = None) -> str:
    """What :func:`image_workload` trains at ``scale`` (with another batch size if given)."""
    name = "vgg16_cifar100" if scale == "paper" else "digits_cnn"
    text = DESCRIPTIONS[name]
    if batch_size is not None:
        text = text.rsplit("batch ", 1)[0] + f"batch {batch_size}"
    return text


def image_workload(scale: str, seed: int, device: torch.device) -> Workload:
    """VGG-16 on CIFAR-100 at ``scale="paper"``, the digits CNN otherwise."""
    if scale == "paper":
        return vgg16_cifar100(seed, device)
    return digits_cnn(seed, device)


__all__ = [
    "DESCRIPTIONS",
    "VGG16",
    "VGG16_LAYERS",
    "Workload",
    "cifar100",
    "describe_workload",
    "digits_cnn",
    "image_workload",
    "vgg16_cifar100",
]
