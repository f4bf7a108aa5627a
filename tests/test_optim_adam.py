"""Adam/AdamW with eps learned by the LinearShrinkageDamper: torch's update, the damper's eps,
param groups in a documented relation, learning-rate compensation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.damping import LinearShrinkageDamper, PaperUpdate
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


def train(opt, model, data, damper=None, eps_schedule=None, lr_scale=None):
    """One pass; returns the eps each step used and the losses."""
    used, losses = [], []
    for t, (xb, yb) in enumerate(data):
        if eps_schedule is not None:
            for group in opt.param_groups:
                group["eps"] = eps_schedule[t]
                if lr_scale is not None:
                    group["lr"] = lr_scale[t]
        opt.zero_grad()
        loss = CE(model(xb), yb)
        loss.backward()
        used.append(opt.param_groups[0]["eps"])
        losses.append(loss.item())
        opt.step()
        if damper is not None:
            damper.step(model, CE, (xb, yb), loss=loss)
    return used, losses


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("compensate", [False, True])
def test_eps_follows_the_damper_in_training(decoupled, compensate):
    x, y = digits()
    data = batches(x, y)
    model = make_model()
    damper = LinearShrinkageDamper(init=1e-6, update_every=3)
    opt = adam_with_learned_eps(model.parameters(), damper, lr=0.05, weight_decay=1e-2,
                                decoupled=decoupled, compensate=compensate)
    assert type(opt) is (torch.optim.AdamW if decoupled else torch.optim.Adam)  # no fork
    assert opt.param_groups[0]["eps"] == damper.damping == 1e-6
    used, losses = train(opt, model, data, damper)
    updates = [r for r in damper.history if r.accepted]
    assert [r.step for r in updates] == [3, 6, 9] and {r.batch_size for r in updates} == {32}
    # step t (0-based) ran with the damping of the latest update after t optimizer steps
    for t, eps in enumerate(used):
        before = [r.damping for r in updates if r.step <= t]
        assert eps == (before[-1] if before else 1e-6)
    assert len(set(used)) == 4  # the damping actually moved
    assert all(group["eps"] == damper.damping for group in opt.param_groups)
    assert opt.param_groups[0]["lr"] == 0.05  # compensation never stays in the group
    assert losses[-1] < losses[0]

    # the same run with plain torch Adam, eps (and lr x (1 + eps)) set by hand, lands
    # bitwise on the same weights
    reference = make_model()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref_opt = cls(reference.parameters(), lr=0.05, weight_decay=1e-2, eps=1e-6)
    scale = [0.05 * (1 + eps) if compensate else 0.05 for eps in used]
    train(ref_opt, reference, data, eps_schedule=used, lr_scale=scale)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_param_groups_with_their_own_eps_keep_their_ratio():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    damper = LinearShrinkageDamper(init=1e-3, guard=False, update_rule=PaperUpdate(ema=0.0))
    groups = [{"params": model[0].parameters(), "eps": 1e-8},
              {"params": model[1].parameters(), "eps": 1e-7}]
    with pytest.raises(InvalidInputError, match="different 'eps'"):
        adam_with_learned_eps(groups, damper)
    groups = [{"params": model[0].parameters(), "eps": 1e-8},
              {"params": model[1].parameters(), "eps": 1e-7}]
    opt = adam_with_learned_eps(groups, damper, groups="scaled")
    damper.update(0, 2e-3)
    assert [g["eps"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-2], rel=1e-14)


def test_state_dict_keeps_eps_and_bad_input():
    model = make_model()
    damper = LinearShrinkageDamper(init=2e-3, update_every=5, guard=False,
                                   update_rule=PaperUpdate())
    opt = adam_with_learned_eps(model.parameters(), damper, lr=1e-3)
    damper.update(0, 0.5)  # a scripted estimate: 0.7 * 2e-3 + 0.3 * 0.5
    assert opt.param_groups[0]["eps"] == pytest.approx(0.7 * 2e-3 + 0.3 * 0.5)
    state = opt.state_dict()
    assert state["param_groups"][0]["eps"] == damper.damping
    with pytest.raises(InvalidInputError, match="eps is set by the damper"):
        adam_with_learned_eps(model.parameters(), damper, eps=1e-8)
    with pytest.raises(InvalidInputError, match="attach"):
        adam_with_learned_eps(model.parameters(), 1e-3)
