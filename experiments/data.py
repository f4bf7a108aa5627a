"""Data for the experiments: scikit-learn's shipped sets, synthetic models, torchvision sets.

Nothing here downloads. scikit-learn's ``digits``, ``breast_cancer``, ``iris`` and ``wine``
ship inside the package; the synthetic teacher-student and spiked models are generated from
a seed; MNIST, FashionMNIST, CIFAR-10 and CIFAR-100 are read from local files in
torchvision's on-disk layout (``download=False`` always) under ``root`` or the environment
variable ``CURVLAB_DATA``, and a missing set raises :class:`DataNotFoundError` naming what
to download and where to put it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from curvlab._random import make_generator
from curvlab.errors import BackendUnavailableError, CurvlabError, InvalidInputError

__all__ = [
    "SKLEARN_SETS",
    "TORCHVISION_SETS",
    "DataNotFoundError",
    "Dataset",
    "data_root",
    "load_sklearn",
    "load_torchvision",
    "spiked_model",
    "teacher_student",
]

ENV_VAR = "CURVLAB_DATA"
SKLEARN_SETS = ("digits", "breast_cancer", "iris", "wine")


class DataNotFoundError(CurvlabError, FileNotFoundError):
    """A torchvision data set is not on disk; the message says what to fetch and where."""


@dataclass(frozen=True)
class Dataset:
    """A train/validation split as tensors (x float, y int64 class labels or float targets)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int  # 0 for regression targets

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.x_val.shape[0])

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_val, self.y_val


def _split(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    n_train: int | None,
    n_classes: int,
    seed: int,
    device,
) -> Dataset:
    """A seeded random permutation; the first ``n_train`` samples train, the rest validate."""
    n = int(x.shape[0])
    n_train = round(0.75 * n) if n_train is None else int(n_train)
    if not 1 <= n_train < n:
        raise InvalidInputError(
            f"n_train must be in [1, {n - 1}] for {name} (N={n}), got {n_train}"
        )
    order = torch.randperm(n, generator=make_generator(seed, "cpu"))
    x, y = x[order].to(device), y[order].to(device)
    return Dataset(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_classes)


def load_sklearn(
    name: str = "digits",
    *,
    n_train: int | None = None,
    image: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Dataset:
    """One of scikit-learn's shipped classification sets, split at random (seeded).

    ``digits`` (1797 8x8 images, 10 classes) is scaled to [0, 1] (pixels / 16) and with
    ``image=True`` shaped [N, 1, 8, 8] for convolutional models; the tabular sets
    (``breast_cancer``, ``iris``, ``wine``) are standardized with the training split's mean
    and standard deviation. ``n_train`` defaults to 75% of the samples.
    """
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - scikit-learn is an experiments extra
        raise BackendUnavailableError(
            "the experiments need scikit-learn: pip install 'curvlab[experiments]'"
        ) from exc
    if name not in SKLEARN_SETS:
        raise InvalidInputError(f"unknown data set {name!r}; choose one of {SKLEARN_SETS}")
    bunch = getattr(datasets, f"load_{name}")()
    x = torch.tensor(bunch.data, dtype=dtype)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    n_classes = int(y.max()) + 1
    if name == "digits":
        x = x / 16.0
        if image:
            x = x.reshape(-1, 1, 8, 8)
    elif image:
        raise InvalidInputError(f"image=True applies to 'digits' only, not {name!r}")
    data = _split(name, x, y, n_train, n_classes, seed, device)
    if name != "digits":
        mean = data.x_train.mean(0)
        std = data.x_train.std(0).clamp_min(1e-12)
        data = Dataset(
            name,
            (data.x_train - mean) / std,
            data.y_train,
            (data.x_val - mean) / std,
            data.y_val,
            n_classes,
        )
    return data


def teacher_student(
    n: int = 2000,
    d: int = 20,
    *,
    hidden: int = 16,
    n_classes: int = 0,
    noise: float = 0.1,
    n_train: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Dataset:
    """Gaussian inputs x ~ N(0, I_d) labelled by a random one-hidden-layer tanh teacher.

    Teacher f(x) = W2 tanh(W1 x / sqrt(d)) / sqrt(hidden) with standard normal W1, W2. With
    ``n_classes=0`` the targets are f(x) + noise * N(0, 1) (one output, regression); with
    ``n_classes >= 2`` the teacher has that many outputs and the label is the argmax of
    f(x) + noise * Gumbel (a softmax teacher at temperature ``noise``).
    """
    if n < 2 or d < 1 or hidden < 1 or n_classes < 0 or n_classes == 1 or noise < 0:
        raise InvalidInputError(
            "need n >= 2, d >= 1, hidden >= 1, n_classes = 0 or >= 2, noise >= 0; got "
            f"n={n}, d={d}, hidden={hidden}, n_classes={n_classes}, noise={noise}"
        )
    gen = make_generator(seed, "cpu")
    out = max(n_classes, 1)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w1 = torch.randn(hidden, d, generator=gen, dtype=torch.float64)
    w2 = torch.randn(out, hidden, generator=gen, dtype=torch.float64)
    f = torch.tanh(x @ w1.T / d**0.5) @ w2.T / hidden**0.5
    if n_classes:
        u = torch.rand(n, out, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        y = (f - noise * torch.log(-torch.log(u))).argmax(1)
    else:
        y = (f + noise * torch.randn(n, 1, generator=gen, dtype=torch.float64)).to(dtype)
    return _split("teacher_student", x.to(dtype), y, n_train, n_classes, seed, device)


def spiked_model(
    size: int,
    spikes,
    sigma: float = 1.0,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's additive spiked model M = sum_i nu_i theta_i theta_i^T + X, X Wigner with
    semicircle on [-2 sigma, 2 sigma] (section 4): ``curvlab.rmt.spiked_wigner``.
    Returns (M [P, P], theta [P, r])."""
    from curvlab.rmt import spiked_wigner

    return spiked_wigner(size, spikes, sigma=sigma, seed=seed, dtype=dtype, device=device)


# --------------------------------------------------------------------------- torchvision

#: name -> (torchvision class, files expected under root, where to get them)
TORCHVISION_SETS: dict[str, tuple[str, str, str]] = {
    "mnist": (
        "MNIST",
        "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four *-ubyte.gz files, gunzipped)",
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the four *-ubyte.gz "
        "files, gunzipped)",
    ),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it in the root)",
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python/ (train, test, meta)",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it in the root)",
    ),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$CURVLAB_DATA``, else ``~/.cache/curvlab/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/curvlab/data").expanduser()


def _not_found(name: str, root: Path) -> DataNotFoundError:
    cls_name, layout, source = TORCHVISION_SETS[name]
    return DataNotFoundError(
        f"{cls_name} is not in {root}: curvlab never downloads. Download it from {source} "
        f"so that {root}/{layout} exist, or let torchvision fetch it once with "
        f"`python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', "
        f'download=True)"`; then pass root= (or set {ENV_VAR}) to that folder'
    )


def load_torchvision(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    train: bool = True,
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [N, C, H, W] scaled to [0, 1], y [N] int64) of a torchvision set read from disk.

    ``name`` is one of ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``; ``limit``
    keeps the first samples. Reads the raw arrays (``.data``/``.targets``) without
    transforms. Raises :class:`DataNotFoundError` when the files are missing (see module).
    """
    if name not in TORCHVISION_SETS:
        raise InvalidInputError(
            f"unknown data set {name!r}; choose one of {tuple(TORCHVISION_SETS)}"
        )
    try:
        import torchvision
    except ImportError as exc:
        raise BackendUnavailableError(
            f"loading {name} needs torchvision: pip install torchvision"
        ) from exc
    path = data_root(root)
    cls = getattr(torchvision.datasets, TORCHVISION_SETS[name][0])
    try:
        dataset = cls(str(path), train=train, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found ..." / "... or corrupted"
        raise _not_found(name, path) from exc
    data = torch.as_tensor(dataset.data)
    targets = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if data.ndim == 3:  # MNIST-like [N, H, W]
        data = data[:, None]
    else:  # CIFAR [N, H, W, C]
        data = data.permute(0, 3, 1, 2)
    if limit is not None:
        data, targets = data[:limit], targets[:limit]
    x = (data.to(dtype) / 255.0).contiguous()
    return x.to(device), targets.to(device)
