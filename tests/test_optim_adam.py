"""Adam/AdamW with eps learned by the LinearShrinkageDamper: torch's update, the damper's eps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.damping import LinearShrinkageDamper
from curvlab.errors import InvalidInputError
from curvlab.optim import adam_with_learned_eps

CE = nn.CrossEntropyLoss()


def digits(n=320):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float64), torch.tensor(y[:n])


def make_model():
    torch.manual_seed(0)
    return nn.Linear(64, 10).double()


def batches(x, y, size=32):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def train(opt, model, data, damper=None, eps_schedule=None):
    """One pass; returns the eps each step used and the losses."""
    used, losses = [], []
    for t, (xb, yb) in enumerate(data):
        if eps_schedule is not None:
            for group in opt.param_groups:
                group["eps"] = eps_schedule[t]
        opt.zero_grad()
        loss = CE(model(xb), yb)
        loss.backward()
        used.append(opt.param_groups[0]["eps"])
        losses.append(loss.item())
        opt.step()
        if damper is not None:
            damper.step(model, CE, (xb, yb))
    return used, losses


@pytest.mark.parametrize("decoupled", [False, True])
def test_eps_follows_the_damper_in_training(decoupled):
    x, y = digits()
    data = batches(x, y)
    model = make_model()
    damper = LinearShrinkageDamper(init=1e-6, update_every=3, batch_size=32, n_probes=2)
    opt = adam_with_learned_eps(model.parameters(), damper, lr=0.05, weight_decay=1e-2,
                                decoupled=decoupled)
    assert type(opt) is (torch.optim.AdamW if decoupled else torch.optim.Adam)  # no fork
    assert opt.param_groups[0]["eps"] == damper.damping == 1e-6
    used, losses = train(opt, model, data, damper)
    updates = [r for r in damper.history if r.accepted]
    assert len(updates) == 4  # steps 0, 3, 6, 9 of 10
    # each step ran with the damping of the latest update before it
    for t, eps in enumerate(used):
        before = [r.damping for r in updates if r.step < t]
        assert eps == (before[-1] if before else 1e-6)
    assert len(set(used)) >= 3  # the damping actually moved
    assert all(group["eps"] == damper.damping for group in opt.param_groups)
    assert losses[-1] < losses[0]

    # the same run with plain torch Adam and eps set by hand lands bitwise on the same weights
    reference = make_model()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref_opt = cls(reference.parameters(), lr=0.05, weight_decay=1e-2, eps=1e-6)
    train(ref_opt, reference, data, eps_schedule=used)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_state_dict_keeps_eps_and_bad_input():
    model = make_model()
    damper = LinearShrinkageDamper(init=2e-3, update_every=5)
    opt = adam_with_learned_eps(model.parameters(), damper, lr=1e-3)
    damper.update(0, 0.5)  # a scripted estimate: 0.7 * 2e-3 + 0.3 * 0.5
    assert opt.param_groups[0]["eps"] == pytest.approx(0.7 * 2e-3 + 0.3 * 0.5)
    state = opt.state_dict()
    assert state["param_groups"][0]["eps"] == damper.damping
    with pytest.raises(InvalidInputError, match="eps is set by the damper"):
        adam_with_learned_eps(model.parameters(), damper, eps=1e-8)
    with pytest.raises(InvalidInputError, match="attach"):
        adam_with_learned_eps(model.parameters(), 1e-3)
