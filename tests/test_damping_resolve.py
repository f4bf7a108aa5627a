"""One damping resolver for the whole library: the same sources, order and rule (0 refused)
in LanczosOPT, KFAC and kfac-pytorch's damping_schedule."""

import math

import pytest
import torch
from torch import nn

import curvlab
from curvlab.adapters.kfac_pytorch import damping_schedule
from curvlab.damping import LinearShrinkageDamper, resolve_damping
from curvlab.errors import InvalidInputError


class Both:
    """A cached attribute and a callable that disagree: the attribute wins."""

    damping = 0.25

    def __call__(self, step):
        return 1.0 + step


def test_the_order_is_number_then_attribute_then_callable():
    assert resolve_damping(3) == 3.0 and isinstance(resolve_damping(3), float)
    assert resolve_damping(Both(), step=5) == 0.25
    assert resolve_damping(lambda step: 1.0 + step, step=5) == 6.0
    holder = type("Holder", (), {"damping": torch.tensor(0.2)})()
    assert resolve_damping(holder) == pytest.approx(0.2)
    damper = LinearShrinkageDamper(init=0.03)
    assert resolve_damping(damper, step=7) == 0.03


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.nan, math.inf, True, None, "1e-3", object()])
def test_zero_negative_non_finite_and_non_dampers_are_refused_everywhere(bad):
    sources = [bad]
    if isinstance(bad, float):  # a bad value, given directly, by a holder or by a schedule
        sources += [lambda step: bad, type("H", (), {"damping": bad})()]
    for source in sources:
        with pytest.raises(InvalidInputError, match="damping"):
            resolve_damping(source)
        with pytest.raises(InvalidInputError, match="damping"):
            damping_schedule(source)(0)


def test_every_consumer_uses_this_resolver():
    from curvlab.optim import kfac, lanczos_opt

    assert lanczos_opt.resolve_damping is resolve_damping
    assert kfac.resolve_damping is resolve_damping
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    ce = nn.CrossEntropyLoss()
    message = "finite positive number, got 0.0"
    with pytest.raises(InvalidInputError, match=message):
        est = curvlab.estimator("autograd", model, ce, (x, y))
        curvlab.optim.LanczosOPT(model.parameters(), est, damping=0.0)
    with pytest.raises(InvalidInputError, match=message):
        curvlab.optim.KFAC(model, ce, damping=0.0)
    with pytest.raises(InvalidInputError, match=message):
        damping_schedule(0.0)
    schedule = damping_schedule(Both())
    assert schedule(3) == schedule(4) == 0.25
