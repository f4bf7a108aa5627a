"""The README's kfac-pytorch recipe against the real kfac-pytorch 0.4.2 (issue 12, item 2).

``KFACPreconditioner(model, damping=damping_schedule(damper))``, then ``damper.step`` after
each optimizer step:

- it runs for hundreds of steps, and at every step the damping kfac-pytorch folds into its
  inverse is the damper's value at that step (its ``dgda = 1 / (dg da^T + delta)``), and the
  gradient it hands the optimizer is the exactly damped (G (x) A + delta I)^-1 g of its own
  factors, scaled by its KL clip;
- a damper update, taken in train mode at a factor-update step (where kfac-pytorch's hooks
  fire on any training forward and backward), leaves kfac-pytorch's factors, accumulators
  (``_a_batch``, ``_g_batch`` and their counts), mini-step and step counters, and
  eigendecompositions bitwise as they were;
- saving the preconditioner's and the damper's state_dicts halfway and resuming in a fresh
  process gives the uninterrupted run's result bitwise.

CI installs kfac-pytorch from the wheel in ../shared/wheels (see .ci/run); elsewhere these
tests skip unless ``pip install 'curvlab[kfac-pytorch]'``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab
from curvlab.adapters.kfac_pytorch import damping_schedule

pytest.importorskip(
    "kfac",
    reason="kfac-pytorch is not installed: pip install 'curvlab[kfac-pytorch]' "
    "(CI installs the wheel from ../shared/wheels)",
)
from kfac.preconditioner import KFACPreconditioner

# torch's note on kfac-pytorch's full backward hook of the first layer (its input needs no grad)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
ROOT = Path(__file__).resolve().parent.parent
LR = 0.1
STATE = ("a_factor", "g_factor", "_a_batch", "_g_batch", "_a_count", "_g_count",
         "qa", "qg", "da", "dg", "dgda", "grad")


def setup(update_every, accumulation_steps=1, n=256, batch=32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3  # learnable labels
    batches = list(zip(x.split(batch), y.split(batch)))
    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=update_every)
    preconditioner = KFACPreconditioner(
        model, damping=damping_schedule(damper), lr=LR, accumulation_steps=accumulation_steps
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return model, nn.CrossEntropyLoss(), batches, damper, preconditioner, optimizer


def kfac_layers(preconditioner):
    return [(module, layer) for module, (_, layer) in preconditioner._layers.items()]


def inverse_eigenvalues(layer, delta):
    """kfac-pytorch's dgda for damping delta, recomputed from its own factors as it does."""
    da = torch.linalg.eigh(layer.a_factor.to(torch.float32))[0].clamp(min=0.0)
    dg = torch.linalg.eigh(layer.g_factor.to(torch.float32))[0].clamp(min=0.0)
    return 1 / (torch.outer(dg, da) + delta)


def dense_directions(preconditioner, raw, delta):
    """(G (x) A + delta I)^-1 g per layer in float64, times kfac-pytorch's KL-clip scale."""
    out, vg = [], 0.0
    for module, layer in kfac_layers(preconditioner):
        g = torch.cat([raw[module.weight], raw[module.bias][:, None]], dim=1).double()
        A, G = layer.a_factor.double(), layer.g_factor.double()
        K = torch.kron(G, A) + delta * torch.eye(g.numel(), dtype=torch.float64)
        v = torch.linalg.solve(K, g.reshape(-1)).reshape(g.shape)
        vg += float((v * g).sum()) * LR**2
        out.append((module, v))
    scale = min(1.0, math.sqrt(preconditioner.kl_clip / abs(vg)))
    return [(module, scale * v) for module, v in out]


def applied(module):
    return torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1).double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_readme_recipe_applies_the_damper_value_at_every_step():
    model, loss_fn, batches, damper, preconditioner, optimizer = setup(update_every=20)
    used, errors, gaps = [], [], []
    for step in range(300):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        raw = {p: p.grad.clone() for p in model.parameters()}
        delta = damper.damping
        preconditioner.step()                 # reads the damper's current delta
        for _, layer in kfac_layers(preconditioner):
            assert torch.equal(layer.dgda, inverse_eigenvalues(layer, delta))
        if step % 25 == 0 or (used and delta != used[-1]):
            for module, expected in dense_directions(preconditioner, raw, delta):
                errors.append(rel(applied(module), expected))
                # a damping of 100 delta gives a direction outside the tolerance
                other = dict(dense_directions(preconditioner, raw, 100 * delta))[module]
                gaps.append(rel(other, expected))
        used.append(delta)
        optimizer.step()
        damper.step(model, loss_fn, (x, y))   # re-estimates delta every update_every steps
    assert max(errors) < 1e-5 and min(gaps) > 1e-2  # float32 round-off vs. a 100x damping
    assert len(damper.history) == 15
    assert len(set(used)) >= 10  # the damping moved with the estimates, and kfac followed
    assert preconditioner.steps == 300
    assert loss.item() < 0.5 * loss_fn(setup(20)[0](batches[0][0]), batches[0][1]).item()


def snapshot(model, preconditioner) -> dict:
    layers = {
        name: {k: _copy(getattr(layer, k)) for k in STATE}
        for module, (name, layer) in preconditioner._layers.items()
    }
    return {
        "layers": layers,
        "steps": preconditioner._steps,
        "mini_steps": dict(preconditioner._mini_steps),
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def assert_bitwise(before, after, where=""):
    if isinstance(before, dict):
        assert before.keys() == after.keys(), where
        for key in before:
            assert_bitwise(before[key], after[key], f"{where}.{key}")
    elif isinstance(before, list):
        assert len(before) == len(after), where
        for i, (a, b) in enumerate(zip(before, after)):
            assert_bitwise(a, b, f"{where}[{i}]")
    elif isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and torch.equal(before, after), where
    else:
        assert before == after, where


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_damper_update_leaves_kfac_pytorch_state_bitwise(accumulation_steps):
    model, loss_fn, batches, damper, preconditioner, optimizer = setup(
        update_every=1, accumulation_steps=accumulation_steps
    )
    for step in range(5):  # the recipe
        optimizer.zero_grad()
        for i in range(accumulation_steps):
            x, y = batches[(2 * step + i) % len(batches)]
            loss_fn(model(x), y).backward()
        preconditioner.step()
        optimizer.step()
        damper.step(model, loss_fn, (x, y))
    x, y = batches[-1]
    if accumulation_steps == 2:  # stop in the middle of an accumulation: live accumulators
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        assert all(layer._a_batch is not None for _, layer in kfac_layers(preconditioner))
        assert set(preconditioner._mini_steps.values()) == {1}
    assert model.training
    assert preconditioner.steps % preconditioner.factor_update_steps == 0  # hooks are live
    before = snapshot(model, preconditioner)
    updates = len(damper.history)
    damper.step(model, loss_fn, (x, y))
    assert len(damper.history) == updates + 1  # the damper re-estimated here
    assert_bitwise(before, snapshot(model, preconditioner))
    # the same moment with a plain training forward and backward: kfac-pytorch's hooks fire
    # and its accumulators change, so the comparison above can fail
    loss_fn(model(x), y).backward()
    with pytest.raises(AssertionError):
        assert_bitwise(before, snapshot(model, preconditioner))


def run_example(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kfac_pytorch_damping.py"), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_same(a, b, where=""):
    """Bitwise equality of nested checkpoints (NaN equals NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def test_checkpoint_halfway_resumes_bitwise_in_a_fresh_process(tmp_path):
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    common = ("--steps", 60, "--update-every", 10)
    run_example(tmp_path, *common, "--save-at", 30, "--checkpoint", "half.pt",
                "--out", "full.pt")
    run_example(tmp_path, *common, "--resume", "half.pt", "--out", "resumed.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    half = torch.load(tmp_path / "half.pt", weights_only=False)
    assert half["step"] == 30 and full["step"] == resumed["step"] == 60
    dampings, resumed_dampings = full.pop("dampings"), resumed.pop("dampings")
    assert_same(full, resumed)
    assert resumed_dampings == dampings[30:]
    # the damper updated on both sides of the checkpoint, and training moved after it
    assert len(set(dampings[:30])) > 1 and len(set(dampings[30:])) > 1
    assert not torch.equal(half["model"]["0.weight"], full["model"]["0.weight"])
