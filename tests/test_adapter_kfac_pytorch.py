"""The kfac-pytorch integration works without kfac-pytorch and says how to get it."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from helpers import make_data, make_model
from torch import nn

import curvlab
from curvlab.adapters.kfac_pytorch import damping_schedule
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError

HAS_KFAC_PYTORCH = importlib.util.find_spec("kfac") is not None


def test_schedule_reads_the_damper_at_each_call():
    damper = curvlab.LinearShrinkageDamper(init=1e-3, ema=0.0)
    schedule = damping_schedule(damper)
    assert schedule(0) == 1e-3 and isinstance(schedule(0), float)
    damper.update(0, 0.05)  # a new estimate: the schedule follows without rebuilding
    assert schedule(1) == pytest.approx(0.05)
    assert schedule(1) == schedule(1)  # repeated calls in one step do not advance anything


def test_schedule_from_numbers_callables_and_damping_attributes():
    assert damping_schedule(0.01)(7) == 0.01
    assert damping_schedule(lambda step: 1.0 / (step + 1))(3) == 0.25

    class Holder:
        damping = torch.tensor(0.2)

    assert damping_schedule(Holder())(0) == pytest.approx(0.2)


@pytest.mark.parametrize("bad", ["1e-3", True, None])
def test_schedule_refuses_non_dampers(bad):
    with pytest.raises(InvalidInputError):
        damping_schedule(bad)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_schedule_refuses_invalid_values(value):
    with pytest.raises(InvalidInputError, match="non-negative"):
        damping_schedule(lambda step: value)(0)


@pytest.mark.skipif(HAS_KFAC_PYTORCH, reason="kfac-pytorch is installed here")
def test_absent_kfac_pytorch_is_reported_not_fatal():
    assert "kfac" not in sys.modules  # nothing above imported it
    info = curvlab.backends()["kfac-pytorch"]
    assert not info.available
    assert "gpauloski/kfac-pytorch" in info.install_hint
    assert "damping_callable" in info.capabilities
    model = make_model("tanh_mlp")
    with pytest.raises(UnsupportedCapabilityError, match="integration, not an estimator"):
        curvlab.estimator("kfac-pytorch", model, nn.CrossEntropyLoss(), make_data("tanh_mlp"))
