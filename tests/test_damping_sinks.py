"""Where the damping goes: param groups in a documented relation, mappings, attributes,
curvlab's LanczosOPT and KFAC, and the learning-rate compensation of eq. 13 composed with the
optimizer's lr and a real torch LR scheduler, resuming exactly from a checkpoint."""

import io

import pytest
import torch
from torch import nn

import curvlab
from curvlab.damping import LinearShrinkageDamper, PaperUpdate
from curvlab.errors import InvalidInputError

CE = nn.CrossEntropyLoss()


def problem(seed=0, n=96):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)
    return model, x, y


def scripted(init=1e-3):
    return LinearShrinkageDamper(init=init, guard=False, update_rule=PaperUpdate(ema=0.0))


# ---------------------------------------------------------------------- param groups
def two_group_adam(model, eps=(1e-8, 1e-6)):
    return torch.optim.Adam(
        [
            {"params": model[0].parameters(), "eps": eps[0]},
            {"params": model[2].parameters(), "eps": eps[1], "lr": 3e-3},
        ],
        lr=1e-2,
    )


def test_groups_with_different_eps_are_never_silently_flattened():
    model, _, _ = problem()
    damper = scripted()
    opt = two_group_adam(model)
    with pytest.raises(InvalidInputError, match=r"groups='shared'.*groups='scaled'"):
        damper.attach(opt, key="eps")
    assert [g["eps"] for g in opt.param_groups] == [1e-8, 1e-6]  # left as found

    shared = damper.attach(two_group_adam(model), key="eps", groups="shared")
    scaled = damper.attach(two_group_adam(model), key="eps", groups="scaled")
    damper.update(0, 5e-3)
    assert [g["eps"] for g in shared.param_groups] == [5e-3, 5e-3]
    assert [g["eps"] for g in scaled.param_groups] == pytest.approx([5e-3, 5e-1], rel=1e-14)
    assert [g["lr"] for g in scaled.param_groups] == [1e-2, 3e-3]  # lr untouched


def test_equal_groups_share_the_value_and_added_groups_are_noticed():
    model, _, _ = problem()
    damper = scripted()
    opt = two_group_adam(model, eps=(1.0, 1.0))
    damper.attach(opt, key="eps")
    assert [g["eps"] for g in opt.param_groups] == [1e-3, 1e-3]
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    with pytest.raises(InvalidInputError, match="attach it again"):
        damper.update(0, 2e-3)
    with pytest.raises(InvalidInputError, match="scaled"):
        damper.attach(two_group_adam(model, eps=(0.0, 1e-6)), groups="scaled")
    with pytest.raises(InvalidInputError, match="have no 'eps'"):
        damper.attach(torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------- other sinks
class PreconditionerLike:
    def __init__(self):
        self.damping = 0.1


class ReadOnly:
    @property
    def damping(self):
        return 0.1


def test_mappings_attributes_and_curvlab_optimizers():
    model, x, y = problem()
    damper = scripted(init=5e-3)
    pre, config = PreconditionerLike(), {"damping": 1.0, "other": 2}
    est = curvlab.estimator("autograd", model, CE, (x, y))
    lopt = curvlab.optim.LanczosOPT(model.parameters(), est, k=2, damping=1.0)
    kfac = curvlab.optim.KFAC(model, CE, lr=0.05, damping=1.0)
    assert damper.attach(pre, key="damping") is pre
    damper.attach(config, key="damping")
    damper.attach(lopt, key="damping")
    damper.attach(kfac, key="damping")
    for value in (2e-3, 7e-3):
        damper.update(0, value)
        assert pre.damping == config["damping"] == value == damper(3)
        assert lopt.param_groups[0]["damping"] == kfac.param_groups[0]["damping"] == value
    assert config["other"] == 2
    damper.detach(pre)
    damper.update(1, 4e-3)
    assert pre.damping == 7e-3 and config["damping"] == 4e-3
    with pytest.raises(InvalidInputError, match="no attribute 'eps'"):
        damper.attach(pre)
    with pytest.raises(InvalidInputError, match="no key"):
        damper.attach({}, key="damping")
    with pytest.raises(InvalidInputError, match=r"read-only.*damping_schedule"):
        damper.attach(ReadOnly(), key="damping")
    with pytest.raises(InvalidInputError, match="torch optimizers"):
        damper.attach(pre, key="damping", compensate=True)


# ---------------------------------------------------------------------- compensation
def train(model, opt, scheduler, damper, x, y, steps, start=0):
    """Full-batch Adam steps; the damper gets a scripted estimate every 3 steps. Returns the
    lr each step ran at, read inside the step."""
    used = []
    for t in range(start, start + steps):
        opt.zero_grad()
        CE(model(x), y).backward()
        captured = {}  # pre-hooks run in order: the compensation's first, then this reader
        handle = opt.register_step_pre_hook(
            lambda o, a, k, c=captured: c.update(lr=[g["lr"] for g in o.param_groups])
        )
        opt.step()
        handle.remove()
        used.append(captured["lr"])
        scheduler.step()
        if (t + 1) % 3 == 0:
            damper.update(t + 1, 1e-2 * (1 + t % 5))
    return used


def setup(compensate=True):
    model, x, y = problem()
    opt = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
        lr=1e-2,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    damper = scripted(init=0.1)
    damper.attach(opt, key="eps", compensate=compensate)
    return model, opt, scheduler, damper, x, y


def test_compensation_is_the_scheduler_value_times_one_plus_delta():
    model, opt, scheduler, damper, x, y = setup()
    used = train(model, opt, scheduler, damper, x, y, 10)
    delta = 0.1
    for t, lrs in enumerate(used):
        if t >= 3 and t % 3 == 0:
            delta = 1e-2 * (1 + (t - 1) % 5)
        sched = [1e-2 * 0.5 ** (t // 4), 3e-3 * 0.5 ** (t // 4)]
        assert lrs == pytest.approx([s * (1 + delta) for s in sched], rel=1e-14), t
    # outside the step the groups hold the scheduler's own value (a chained scheduler
    # multiplies it, never the compensated one)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 / 4, 3e-3 / 4])
    assert damper.lr_compensation == pytest.approx(1 + damper.damping)


def test_compensation_and_scheduler_resume_exactly_from_a_checkpoint():
    model, opt, scheduler, damper, x, y = setup()
    full_lrs = train(model, opt, scheduler, damper, x, y, 12)
    full = [p.detach().clone() for p in model.parameters()]

    model, opt, scheduler, damper, x, y = setup()
    first = train(model, opt, scheduler, damper, x, y, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": scheduler.state_dict(), "damper": damper.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert [g["lr"] for g in saved["opt"]["param_groups"]] == pytest.approx([5e-3, 1.5e-3])

    model, opt, scheduler, damper, x, y = setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["sched"])
    damper.load_state_dict(saved["damper"])
    rest = train(model, opt, scheduler, damper, x, y, 5, start=7)
    assert first + rest == full_lrs
    for p, q in zip(model.parameters(), full):
        assert torch.equal(p, q)


def test_compensation_only_for_an_optimizer_under_a_preconditioner():
    model, x, y = problem()
    damper = scripted(init=0.5)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    damper.attach(sgd, key=None, compensate=True)
    assert "eps" not in sgd.param_groups[0]
    before = [p.detach().clone() for p in model.parameters()]
    CE(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    sgd.step()
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * 1.5 * g, rtol=0, atol=1e-15)
    assert sgd.param_groups[0]["lr"] == 0.1
    damper.detach(sgd)
    sgd.step()
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * 2.5 * g, rtol=0, atol=1e-15)
    with pytest.raises(InvalidInputError, match="writes no damping"):
        damper.attach(sgd, key=None)


def test_a_step_that_raises_does_not_compound_the_compensation():
    model = problem()[0]
    damper = scripted(init=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    damper.attach(opt, key=None, compensate=True)

    def boom():
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(boom)
    assert opt.param_groups[0]["lr"] == 0.2  # left behind by the failed step
    seen = []
    handle = opt.register_step_pre_hook(
        lambda o, a, k: seen.extend([o.param_groups[0]["lr"]])
    )
    opt.step()
    handle.remove()
    assert seen == [0.2] and opt.param_groups[0]["lr"] == 0.1
