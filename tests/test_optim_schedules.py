"""The paper's schedules (eq. 12 and eq. 16) hit their breakpoints and resume from state_dict."""

from __future__ import annotations

import pytest
import torch

from curvlab.errors import InvalidInputError
from curvlab.optim import PaperSchedule, WarmupSchedule, paper_schedule, warmup_schedule

T = 100
ALPHA0 = 0.1


def make_optimizer(lr=ALPHA0):
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    return torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 2 * lr}], lr=lr)


def lrs_along(scheduler, n):
    """Learning rates of group 0 at t = 0..n (step the optimizer first, as torch expects)."""
    out = [scheduler.optimizer.param_groups[0]["lr"]]
    for _ in range(n):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.optimizer.param_groups[0]["lr"])
    return out


# (t/T, factor) read off eq. 12 with r = 0.01: midpoints of each piece included
PAPER_POINTS = [(0.0, 1.0), (0.1, 1.0), (0.3, 1.0), (0.5, 1.0), (0.7, 1 - 0.99 * 0.5),
                (0.9, 0.01), (0.95, 0.01), (1.0, 0.01)]
# eq. 16 with kappa = 5, r = 0.01
WARMUP_POINTS = [(0.0, 1.0), (0.05, 1.0), (0.1, 1.0), (0.2, 3.0), (0.3, 5.0),
                 (0.6, 5 - 4.99 * 0.5), (0.9, 0.01), (0.95, 0.01), (1.0, 0.01)]


@pytest.mark.parametrize(("make", "points"), [
    (lambda opt: paper_schedule(opt, T), PAPER_POINTS),
    (lambda opt: warmup_schedule(opt, T), WARMUP_POINTS),
])
def test_breakpoints_and_midpoints(make, points):
    scheduler = make(make_optimizer())
    lrs = lrs_along(scheduler, T + 10)
    for s, factor in points:
        assert lrs[round(s * T)] == pytest.approx(ALPHA0 * factor, rel=1e-12, abs=0), s
    # second group keeps its own base rate, scaled by the same factor
    assert scheduler.optimizer.param_groups[1]["lr"] == pytest.approx(2 * ALPHA0 * 0.01)
    assert lrs[-1] == pytest.approx(ALPHA0 * 0.01)  # after T: stays at r


def test_paper_schedule_piecewise_shape():
    lrs = lrs_along(paper_schedule(make_optimizer(), T), T)
    assert lrs[: T // 2 + 1] == [ALPHA0] * (T // 2 + 1)  # flat up to and including 50%
    assert lrs[T // 2 + 1] < ALPHA0  # decay starts right after
    decay = torch.tensor(lrs[T // 2 : 9 * T // 10 + 1], dtype=torch.float64)
    steps = decay.diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)  # linear
    assert lrs[9 * T // 10 :] == pytest.approx([ALPHA0 * 0.01] * (T // 10 + 1))


def test_warmup_custom_kappa_r_and_classes():
    scheduler = WarmupSchedule(make_optimizer(), 10, kappa=3.0, r=0.1)
    lrs = lrs_along(scheduler, 10)
    assert lrs[1] == pytest.approx(ALPHA0)
    assert lrs[2] == pytest.approx(ALPHA0 * 2.0)
    assert lrs[3] == pytest.approx(ALPHA0 * 3.0)
    assert lrs[9] == pytest.approx(ALPHA0 * 0.1)
    assert isinstance(paper_schedule(make_optimizer(), 10), PaperSchedule)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("cls", [PaperSchedule, WarmupSchedule])
def test_state_dict_resume_is_bitwise(cls):
    straight = lrs_along(cls(make_optimizer(), 40), 40)
    first = cls(make_optimizer(), 40)
    half = lrs_along(first, 20)
    opt_state, sched_state = first.optimizer.state_dict(), first.state_dict()
    optimizer = make_optimizer()
    resumed = cls(optimizer, 40)
    optimizer.load_state_dict(opt_state)
    resumed.load_state_dict(sched_state)
    rest = lrs_along(resumed, 20)
    assert half + rest[1:] == straight


@pytest.mark.parametrize("kwargs", [{"total_steps": 0}, {"total_steps": 2.5},
                                    {"total_steps": 10, "r": -0.1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(InvalidInputError):
        PaperSchedule(make_optimizer(), **kwargs)
    with pytest.raises(InvalidInputError):
        WarmupSchedule(make_optimizer(), **kwargs)


def test_bad_warmup_factor_raises():
    with pytest.raises(InvalidInputError):
        WarmupSchedule(make_optimizer(), total_steps=10, kappa=-1.0)
