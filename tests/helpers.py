"""Shared test helpers: small models and data, dense curvature references built without
curvlab, and a snapshot of everything a backend could leave changed on a model.

Test modules import them (``from helpers import make_model, dense_hessian``); fixtures stay in
conftest.py. The references use plain torch (``torch.func.functional_call`` on the model,
buffers cloned inside every call) so they are independent of curvlab's code paths.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class ScaledMLP(nn.Module):
    """An MLP with a buffer used in the forward pass and a frozen first layer."""

    def __init__(self, d_in=5, hidden=6, d_out=3):
        super().__init__()
        self.frozen = nn.Linear(d_in, hidden)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out)
        )
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d_in))

    def forward(self, x):
        return self.head(self.frozen(x * self.scale))


class SmallCNN(nn.Module):
    """Conv2d(1 -> 2, 3x3), tanh, Linear: inputs [N, 1, 6, 6]."""

    def __init__(self, d_out=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, d_out)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make_model(name: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """One of :data:`MODELS` (5 inputs, 3 outputs; the CNN takes [N, 1, 6, 6]), with weights
    from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if name == "tanh_mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    elif name == "relu_mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    elif name == "cnn":
        model = SmallCNN()
    elif name == "buffer_frozen":
        model = ScaledMLP()
    else:
        raise ValueError(name)
    return model.to(dtype)


def make_data(name: str, n: int = 24, dtype=torch.float64, seed: int = 1, target="ce"):
    """(x, y) for ``make_model(name)``: n samples from a seeded generator; ``target`` "ce"
    (class labels), "mse" (real targets) or "bce" (0/1 targets)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if name == "cnn" else (n, 5)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if target == "ce":
        y = torch.randint(0, 3, (n,), generator=gen)
    elif target == "mse":
        y = torch.randn(n, 3, generator=gen, dtype=dtype)
    else:  # bce
        y = torch.randint(0, 2, (n, 3), generator=gen).to(dtype)
    return x, y


LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
MODELS = ["tanh_mlp", "relu_mlp", "cnn", "buffer_frozen"]


def trainable(model):
    """(name, parameter) pairs of the parameters with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _flat_fn(model, fn):
    """Turn fn(outputs) of the model into a function of the flat trainable parameters."""
    named = trainable(model)
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    buffers = dict(model.named_buffers())

    def of_flat(theta, x):
        chunks = torch.split(theta, sizes)
        state = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        fresh = {n: b.clone() for n, b in buffers.items()}  # train-mode BatchNorm writes them
        return fn(functional_call(model, {**fresh, **state}, (x,)))

    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    return of_flat, theta0


def dense_hessian(model, loss_fn, x, y) -> torch.Tensor:
    """Row by row double backward of the functional loss. (torch.func.hessian and nested
    jacrev get LayerNorm's second derivatives wrong on torch 2.14: 0.2 relative error.)"""
    f, theta = _flat_fn(model, lambda out: out)
    theta = theta.clone().requires_grad_()
    g = torch.autograd.grad(loss_fn(f(theta, x), y), theta, create_graph=True)[0]
    rows = [
        torch.autograd.grad(g[i], theta, retain_graph=True, allow_unused=True,
                            materialize_grads=True)[0]
        for i in range(theta.numel())
    ]
    return torch.stack(rows)


def dense_ggn(model, loss_fn, x, y) -> torch.Tensor:
    """J^T (d^2 loss / d out^2) J over the trainable parameters."""
    f, theta = _flat_fn(model, lambda out: out)
    out = f(theta, x)
    jac = jacrev(lambda t: f(t, x))(theta).reshape(out.numel(), -1)
    h_out = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return jac.T @ h_out @ jac


def per_sample_grads(model, loss_fn, x, y) -> torch.Tensor:
    """[N, P]: the gradient of ``loss_fn`` on each sample alone."""
    f, theta = _flat_fn(model, lambda out: out)

    def loss_i(t, xi, yi):
        return loss_fn(f(t, xi[None]), yi[None])

    return vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(theta, x, y)


def dense_ef(model, loss_fn, x, y) -> torch.Tensor:
    """The empirical Fisher (1/N) sum_n g_n g_n^T."""
    g = per_sample_grads(model, loss_fn, x, y)
    return g.T @ g / x.shape[0]


def dense_curvature(kind: str, model, loss_fn, x, y) -> torch.Tensor:
    """The dense reference of ``kind`` ("hessian", "ggn", "fisher" = GGN, "ef")."""
    return {"hessian": dense_hessian, "ggn": dense_ggn, "fisher": dense_ggn, "ef": dense_ef}[kind](
        model, loss_fn, x, y
    )


def model_state(model: nn.Module) -> dict:
    """Everything a backend could leave changed on the user's model."""
    return {
        "training": [m.training for m in model.modules()],
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for m in model.modules()
        ],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_state_equal(before: dict, after: dict) -> None:
    """Two :func:`model_state` snapshots are identical (bitwise for tensors)."""
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["requires_grad"] == after["requires_grad"]
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    for a, b in zip(before["buffers"], after["buffers"]):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
