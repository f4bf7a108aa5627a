"""The case zoo: small real-world model/loss/data problems shared by the contract tests.

Each :class:`Case` builds a :class:`Problem` (model, loss, data as curvlab receives it,
explicit ``params=``) for a dtype, a seed and the model's own train/eval mode, and says
which (backend, curvature, operation) combinations must be refused, with which
:class:`curvlab.errors.CurvlabError` subclass. Everything else must equal the dense
reference of tests/references.py. Models are tiny (at most a few hundred parameters).

Builders leave the global RNG as they found it (weights come from a forked, seeded RNG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlab.errors import (
    CurvlabError,
    InvalidInputError,
    UnsupportedCapabilityError,
    UnsupportedModelError,
)

#: backend name in the zoo -> (curvlab backend, its options, curvatures it declares)
BACKENDS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "autograd": ("autograd", {}, ("hessian", "ggn", "fisher", "ef")),
    "backpack": ("backpack", {}, ("hessian", "ggn", "fisher", "ef")),
    "pyhessian": ("pyhessian", {}, ("hessian",)),
    "kfac": ("kfac", {"approximation": "kfac"}, ("ggn", "fisher", "ef")),
    "ekfac": ("kfac", {"approximation": "ekfac"}, ("ggn", "fisher", "ef")),
}


@dataclass
class Problem:
    """What a user passes to ``curvlab.estimator`` (plus the batches, materialised)."""

    model: nn.Module
    loss_fn: Callable
    data: object
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    params: list[nn.Parameter] | None = None

    @property
    def names(self) -> list[str]:
        """Names of the differentiated parameters, in the order of the flat vectors."""
        if self.params is None:
            return [n for n, p in self.model.named_parameters() if p.requires_grad]
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        return [by_id[id(p)] for p in self.params]

    @property
    def num_params(self) -> int:
        return sum(self.model.get_parameter(n).numel() for n in self.names)


@dataclass(frozen=True)
class Case:
    """One zoo entry.

    Attributes
    ----------
    name : str
    make : callable(dtype, generator) -> (model, loss_fn, data, params)
        Builds the problem in the model's default (train) mode; the Case sets the mode.
    modes : tuple of {"train", "eval"}
        The model modes the case runs in (both where a layer depends on the mode).
    likelihood : bool
        The loss has a likelihood and counts every sample once (Fisher, BackPACK, KFAC).
    kfac : bool
        Every trainable parameter sits in one Linear/Conv2d layer.
    backpack_loss : bool
        BackPACK accepts the loss (a likelihood loss with [N, C] outputs, one BCE output).
    backpack_extensions : bool
        BackPACK's extensions can run on the model in eval mode.
    batchnorm : bool
        Train-mode BatchNorm couples the samples of a batch.
    refused : exception class, optional
        Refused by every backend at construction.
    """

    name: str
    make: Callable
    modes: tuple[str, ...] = ("train",)
    likelihood: bool = True
    kfac: bool = True
    backpack_loss: bool = True
    backpack_extensions: bool = True
    batchnorm: bool = False
    refused: type[CurvlabError] | None = None
    notes: str = field(default="", compare=False)

    def build(self, dtype: torch.dtype = torch.float64, mode: str = "train", seed: int = 0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed + 1000)
            model, loss_fn, data, params = self.make(dtype, gen)
            # iterating a DataLoader draws its base seed from the global RNG
            batches = [data] if isinstance(data, tuple) else [tuple(b) for b in data]
        model.train(mode == "train")
        return Problem(model, loss_fn, data, batches, params)

    def expect(
        self, backend: str, curvature: str, op: str, mode: str, group_size: int = 1,
        multi_batch: bool = False,
    ) -> type[CurvlabError] | None:
        """The error a (backend, curvature, op) combination must raise, None to match.

        ``op`` is "matvec" (construction and products) or "group" (group_matvecs).
        """
        if self.refused is not None:
            return self.refused
        coupled = self.batchnorm and mode == "train"
        if backend in ("kfac", "ekfac"):
            if not (self.likelihood and self.kfac):
                return UnsupportedModelError
            if op == "group":
                return UnsupportedCapabilityError
            return UnsupportedModelError if coupled and multi_batch else None
        if backend == "backpack" and not (self.likelihood and self.backpack_loss):
            return UnsupportedModelError
        if backend == "autograd" and curvature == "fisher" and not self.likelihood:
            return UnsupportedModelError
        extensions_ok = self.backpack_extensions and not coupled
        if op == "matvec":
            if coupled and multi_batch:
                return UnsupportedModelError
            if backend == "backpack" and curvature == "ef" and not extensions_ok:
                return UnsupportedModelError  # the empirical Fisher needs BatchGrad
            return None
        if backend == "pyhessian":
            return UnsupportedCapabilityError
        if coupled and group_size == 1:
            return UnsupportedModelError
        if backend == "backpack":
            if curvature == "hessian":
                return UnsupportedCapabilityError
            if not extensions_ok:
                return UnsupportedModelError
        return None


# ---------------------------------------------------------------------- data
def _x(gen, n, *shape, dtype):
    return torch.randn(n, *shape, generator=gen, dtype=dtype)


def _labels(gen, n, classes, *shape):
    return torch.randint(0, classes, (n, *shape), generator=gen)


def _split(x, y, sizes):
    """List of (x, y) batches of the given sizes."""
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def _mlp(d_in=4, hidden=6, d_out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


# ---------------------------------------------------------------------- models
class SequenceTagger(nn.Module):
    """[N, T, d] -> [N, C, T] logits (CrossEntropyLoss over positions)."""

    def __init__(self, d=4, hidden=5, classes=3):
        super().__init__()
        self.body = _mlp(d, hidden, classes)

    def forward(self, x):
        return self.body(x).transpose(1, 2)


def tied_sequential() -> nn.Sequential:
    """Two Linear layers share one weight (tied), then a head: a plain Sequential, so
    BackPACK's extensions see every operation."""
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 4)
    dec.weight = enc.weight
    return nn.Sequential(enc, nn.Tanh(), dec, nn.Tanh(), nn.Linear(4, 3))


class Twice(nn.Module):
    """One layer called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _warm_batchnorm(model, d_in, gen, dtype):
    """Non-trivial running statistics, as after some training."""
    with torch.no_grad():
        for _ in range(3):
            model(2.0 * _x(gen, 16, d_in, dtype=dtype) + 0.5)


# ---------------------------------------------------------------------- builders
def _cnn(dtype, gen):
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 3)
    ).to(dtype)
    x = _x(gen, 12, 1, 8, 8, dtype=dtype)
    return model, nn.CrossEntropyLoss(), (x, _labels(gen, 12, 3)), None


def _frozen(dtype, gen):
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)
    model[0].requires_grad_(False)
    return model, nn.CrossEntropyLoss(), (_x(gen, 12, 4, dtype=dtype), _labels(gen, 12, 3)), None


def _bn_model(dtype, gen):
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)
    ).to(dtype)
    _warm_batchnorm(model, 4, gen, dtype)
    return model


def _batchnorm(dtype, gen):
    model = _bn_model(dtype, gen)
    return model, nn.CrossEntropyLoss(), (_x(gen, 12, 4, dtype=dtype), _labels(gen, 12, 3)), None


def _batchnorm_batches(dtype, gen):
    model = _bn_model(dtype, gen)
    x, y = _x(gen, 12, 4, dtype=dtype), _labels(gen, 12, 3)
    return model, nn.CrossEntropyLoss(), _split(x, y, [7, 5]), None


def _dropout(dtype, gen):
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).to(dtype)
    x, y = _x(gen, 14, 4, dtype=dtype), _labels(gen, 14, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)  # batches of 6, 6 and 2
    return model, nn.CrossEntropyLoss(), loader, None


def _mse(dtype, gen):
    x = _x(gen, 12, 4, dtype=dtype)
    return _mlp().to(dtype), nn.MSELoss(), (x, _x(gen, 12, 3, dtype=dtype)), None


def _ce_sequence(dtype, gen):
    x = _x(gen, 8, 5, 4, dtype=dtype)
    return SequenceTagger().to(dtype), nn.CrossEntropyLoss(), (x, _labels(gen, 8, 3, 5)), None


def _label_smoothing(dtype, gen):
    loss = nn.CrossEntropyLoss(label_smoothing=0.2)
    return _mlp().to(dtype), loss, (_x(gen, 12, 4, dtype=dtype), _labels(gen, 12, 3)), None


def _ignore_index(dtype, gen):
    x, y = _x(gen, 14, 4, dtype=dtype), _labels(gen, 14, 3)
    y[[1, 4, 5, 11]] = -1
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    return _mlp().to(dtype), loss, _split(x, y, [6, 5, 3]), None


def _class_weights(dtype, gen):
    x, y = _x(gen, 14, 4, dtype=dtype), _labels(gen, 14, 3)
    loss = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.25], dtype=dtype))
    return _mlp().to(dtype), loss, _split(x, y, [6, 5, 3]), None


def _bce_single(dtype, gen):
    x = _x(gen, 12, 4, dtype=dtype)
    y = torch.randint(0, 2, (12, 1), generator=gen).to(dtype)
    return _mlp(d_out=1).to(dtype), nn.BCEWithLogitsLoss(), (x, y), None


def _bce_multi(dtype, gen):
    x = _x(gen, 12, 4, dtype=dtype)
    y = torch.randint(0, 2, (12, 3), generator=gen).to(dtype)
    return _mlp().to(dtype), nn.BCEWithLogitsLoss(), (x, y), None


def _tied(dtype, gen):
    x = _x(gen, 12, 4, dtype=dtype)
    return tied_sequential().to(dtype), nn.CrossEntropyLoss(), (x, _labels(gen, 12, 3)), None


def _twice(dtype, gen):
    x = _x(gen, 12, 4, dtype=dtype)
    return Twice().to(dtype), nn.CrossEntropyLoss(), (x, _labels(gen, 12, 3)), None


def _params_subset(dtype, gen):
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)
    params = [model[4].weight, model[0].bias, model[0].weight]
    x = _x(gen, 12, 4, dtype=dtype)
    return model, nn.MSELoss(), (x, _x(gen, 12, 3, dtype=dtype)), params


def _frozen_explicit(dtype, gen):
    """Explicit params= listing a parameter with requires_grad=False."""
    model = _mlp().to(dtype)
    model[0].requires_grad_(False)
    params = [model[2].weight, model[0].weight, model[2].bias, model[0].bias]
    return model, nn.CrossEntropyLoss(), (_x(gen, 12, 4, dtype=dtype), _labels(gen, 12, 3)), params


def _unequal_batches(dtype, gen):
    x, y = _x(gen, 13, 4, dtype=dtype), _x(gen, 13, 3, dtype=dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # batches of 5, 5 and 3
    return _mlp().to(dtype), nn.MSELoss(), loader, None


def _reduction_sum(dtype, gen):
    loss = nn.CrossEntropyLoss(reduction="sum")
    return _mlp().to(dtype), loss, (_x(gen, 12, 4, dtype=dtype), _labels(gen, 12, 3)), None


CASES: list[Case] = [
    Case("cnn_maxpool", _cnn),
    Case("frozen_layer", _frozen),
    Case("batchnorm", _batchnorm, modes=("train", "eval"), kfac=False, batchnorm=True),
    Case(
        "batchnorm_batches", _batchnorm_batches, modes=("train", "eval"), kfac=False,
        batchnorm=True,
    ),
    Case("dropout", _dropout, modes=("train", "eval")),
    Case("mse_multi", _mse),
    Case("ce_sequence", _ce_sequence, likelihood=False),  # W = N T positions, not N
    Case("label_smoothing", _label_smoothing, likelihood=False),
    Case("ignore_index", _ignore_index, likelihood=False),
    Case("class_weights", _class_weights, likelihood=False),
    Case("bce_single", _bce_single),
    Case("bce_multi", _bce_multi, backpack_loss=False),
    Case("tied_weight", _tied, kfac=False, backpack_extensions=False),
    Case("module_twice", _twice, backpack_extensions=False),
    Case("params_subset", _params_subset),
    Case("frozen_explicit", _frozen_explicit),
    Case("unequal_batches", _unequal_batches),
    Case("reduction_sum", _reduction_sum, refused=InvalidInputError),
]
BY_NAME = {case.name: case for case in CASES}


def case_modes() -> list[tuple[Case, str]]:
    return [(case, mode) for case in CASES for mode in case.modes]
