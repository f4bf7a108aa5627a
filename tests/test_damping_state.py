"""The damper's checkpoint: versioned, validated, loaded all or nothing; resuming equals the
uninterrupted run."""

import io
import math

import pytest
import torch
from torch import nn

from curvlab.damping import LinearShrinkageDamper, PaperUpdate, Subsample
from curvlab.errors import InvalidInputError

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:256] / 16.0, dtype=torch.float64)
    return x, torch.tensor(data.target[:256])


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).to(torch.float64)


def batches(x, y, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(x.shape[0], generator=gen)[:size]
        yield x[idx], y[idx]


def _train(model, opt, damper, stream, steps, pool=None):
    trace = []
    for _ in range(steps):
        xb, yb = next(stream)
        opt.zero_grad()
        loss = CE(model(xb), yb)
        loss.backward()
        opt.step()
        damper.step(model, CE, pool if pool is not None else (xb, yb), loss=loss)
        trace.append(damper.damping)
    return trace


@pytest.mark.parametrize("subsample", [None, Subsample(48), Subsample(48, fresh=True)])
def test_resume_equals_the_uninterrupted_run(digits, subsample):
    x, y = digits
    pool = None if subsample is None else (x, y)

    def setup():
        model = make_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        damper = LinearShrinkageDamper(init=1e-3, update_every=3, seed=7, subsample=subsample,
                                       batch_size=None if subsample is None else 32)
        damper.attach(opt, key="eps", compensate=True)
        return model, opt, damper

    model, opt, damper = setup()
    full = _train(model, opt, damper, batches(x, y), 14, pool)
    full_history = damper.history

    model, opt, damper = setup()
    stream = batches(x, y)
    first = _train(model, opt, damper, stream, 7, pool)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "damper": damper.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved["damper"]["version"] == 2

    model, opt, damper = setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    damper.load_state_dict(saved["damper"])
    assert all(g["eps"] == damper.damping for g in opt.param_groups)
    rest = _train(model, opt, damper, stream, 7, pool)
    assert first + rest == full
    assert damper.steps == 14 and damper.history == full_history
    assert [r.step for r in full_history] == [3, 6, 9, 12]


def test_state_dict_is_a_snapshot():
    damper = LinearShrinkageDamper(update_every=1, guard=False, update_rule=PaperUpdate())
    damper.update(0, 2e-3)
    state = damper.state_dict()
    damper.update(1, 5e-3)
    assert len(state["history"]) == 1 and state["damping"] == pytest.approx(1.3e-3)
    other = LinearShrinkageDamper(update_every=1)
    other.load_state_dict(state)
    assert other.damping == pytest.approx(1.3e-3) and other.history == damper.history[:1]


def _corrupt(key, value):
    damper = LinearShrinkageDamper(guard=False)
    damper.update(0, 2e-3)
    state = damper.state_dict()
    if value is KeyError:
        del state[key]
    elif key == "history":
        state["history"][0].update(value)
    else:
        state[key] = value
    return state


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("damping", math.nan, "finite number > 0"),
        ("damping", -1.0, "finite number > 0"),
        ("damping", 0.0, "finite number > 0"),
        ("damping", math.inf, "finite number > 0"),
        ("damping", "1e-3", "number"),
        ("version", 3, "version"),
        ("steps", -2, "steps"),
        ("tau", -1.0, "tau"),
        ("rng_state", torch.zeros(3, dtype=torch.uint8), "rng_state"),
        ("indices", torch.tensor([0.5]), "indices"),
        ("history", {"decision": "maybe"}, "decision"),
        ("history", {"damping": math.nan}, "damping"),
        ("losses", KeyError, "missing"),
        ("surplus", 1, "unexpected"),
    ],
)
def test_a_bad_state_is_refused_and_leaves_the_damper_unchanged(key, value, match):
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    damper = LinearShrinkageDamper(init=5e-3, guard=False)
    damper.attach(opt, key="eps")
    damper.update(0, 1e-2)
    damper.steps = 4
    before = damper.state_dict()
    with pytest.raises(InvalidInputError, match=match):
        damper.load_state_dict(_corrupt(key, value))
    after = damper.state_dict()
    assert torch.equal(after.pop("rng_state"), before.pop("rng_state"))
    assert after == before
    assert opt.param_groups[0]["eps"] == damper.damping


def test_not_a_dict_is_refused():
    with pytest.raises(InvalidInputError, match="dict"):
        LinearShrinkageDamper().load_state_dict([1, 2])


def test_a_version_1_checkpoint_is_migrated():
    gen = torch.Generator().manual_seed(0)
    old = {
        "damping": 1.3e-3,
        "tau": None,
        "steps": 5,
        "n_rejected": 1,
        "warned": ["rejected"],
        "history": [
            {"step": 0, "estimate": 2e-3, "stderr": math.nan, "damping": 1.3e-3,
             "accepted": True},
            {"step": 3, "estimate": math.nan, "stderr": math.nan, "damping": 1.3e-3,
             "accepted": False},
        ],
        "rng_state": gen.get_state(),
        "indices": None,
    }
    damper = LinearShrinkageDamper()
    damper.load_state_dict(old)
    assert damper.damping == 1.3e-3 and damper.steps == 5
    assert [r.decision for r in damper.history] == ["accept", "reject"]
    assert damper.history[0].folded == 2e-3
    old["damping"] = -1.0
    with pytest.raises(InvalidInputError, match="finite number > 0"):
        LinearShrinkageDamper().load_state_dict(old)
