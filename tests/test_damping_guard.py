"""Outlier safety: estimates far outside the recent ones are capped or rejected, updates during
a loss spike or on non-finite data, parameters or loss are skipped, and every decision is
recorded with its reason."""

import math
import statistics

import pytest
import torch
from torch import nn

from curvlab.damping import LinearShrinkageDamper, OutlierGuard, PaperUpdate
from curvlab.errors import CurvlabWarning, InvalidInputError

CE = nn.CrossEntropyLoss()


def fed(values, guard=True, **kwargs):
    """A damper with a pure moving average (ema 0.5) fed ``values`` through update()."""
    damper = LinearShrinkageDamper(init=1e-2, guard=guard, update_rule=PaperUpdate(ema=0.5),
                                   **kwargs)
    for i, value in enumerate(values):
        damper.update(100 * (i + 1), value)
    return damper


def band(history, z=4.0, min_ratio=3.0, rel=0.0):
    logs = [math.log(v) for v in history]
    center = statistics.median(logs)
    spread = 1.4826 * statistics.median(abs(v - center) for v in logs)
    width = max(math.log(min_ratio), z * math.hypot(spread, rel))
    return math.exp(center - width), math.exp(center + width)


def test_an_outlier_is_capped_to_the_band_of_the_recent_values():
    steady = [1.0e-2, 1.3e-2, 0.8e-2, 1.1e-2]
    with pytest.warns(CurvlabWarning, match="cap at step 500"):
        damper = fed([*steady, 2e2])
    record = damper.history[-1]
    high = band(steady)[1]
    assert (record.decision, record.estimate) == ("cap", 2e2)
    assert record.folded == pytest.approx(high, rel=1e-12)
    assert "above the band" in record.reason
    before = damper.history[-2].damping
    assert record.damping == pytest.approx(0.5 * before + 0.5 * high, rel=1e-12)
    unguarded = fed([*steady, 2e2], guard=False)
    assert unguarded.damping == pytest.approx(0.5 * before + 1e2, rel=1e-12)


def test_an_estimate_far_below_is_capped_and_reject_drops_it():
    steady = [1.0e-2, 1.3e-2, 0.8e-2]
    damper = fed([*steady, 1e-9])
    assert damper.history[-1].decision == "cap"
    assert damper.history[-1].folded == pytest.approx(band(steady)[0], rel=1e-12)
    with pytest.warns(CurvlabWarning, match="reject"):
        strict = fed([*steady, 1e-9], guard=OutlierGuard(action="reject"))
    assert strict.history[-1].decision == "reject"
    assert strict.damping == strict.history[-2].damping


def test_within_the_band_and_before_min_history_estimates_are_accepted():
    damper = fed([1e-2, 5e-1, 1e-2, 2.5e-2])  # 50x jump with only 1 value before it
    assert [r.decision for r in damper.history] == ["accept"] * 4
    wide = [1e-3, 1e-1, 1e-2, 3e-3, 3e-2]  # a wide spread widens the band
    assert fed([*wide, 1.0]).history[-1].decision == "accept"
    assert fed([*[1e-2] * 5, 1.0]).history[-1].decision == "cap"


def test_the_stderr_widens_the_band():
    steady = [1.0e-2, 1.1e-2, 0.9e-2]
    x = 2.5e-1  # 25x the median: beyond min_ratio = 3 and the spread alone
    sure = LinearShrinkageDamper(init=1e-2, update_rule=PaperUpdate(ema=0.5))
    unsure = LinearShrinkageDamper(init=1e-2, update_rule=PaperUpdate(ema=0.5))
    for damper in (sure, unsure):
        for i, v in enumerate(steady):
            damper.update(i, v)
    from curvlab.damping import RawEstimate

    sure.update(9, RawEstimate(x, 1e-3))
    unsure.update(9, RawEstimate(x, 2.0))  # relative stderr 8, counted as at most 1
    assert sure.history[-1].decision == "cap"
    assert unsure.history[-1].folded == pytest.approx(min(x, band(steady, rel=1.0)[1]))
    assert band(steady, rel=1.0)[1] > band(steady)[1]


def test_bad_guard_options_raise():
    for kwargs, match in (
        ({"window": 0}, "window"),
        ({"min_history": 6}, "exceeds"),
        ({"z": -1.0}, "z"),
        ({"min_ratio": 0.5}, "min_ratio"),
        ({"action": "drop"}, "action"),
        ({"loss_window": 2}, "loss_window"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            OutlierGuard(**kwargs)


# ---------------------------------------------------------------------- in training
@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (64,), generator=gen)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)


def test_an_update_during_a_loss_spike_is_skipped(data):
    x, y = data
    model = make_model()
    damper = LinearShrinkageDamper(init=1e-3, update_every=10)
    losses = [1.0, 0.9, 1.1, 0.95, 1.05, 1.0, 0.9, 1.0, 1.1, 9.0] + [1.0] * 10
    with pytest.warns(CurvlabWarning, match="spikes"):
        for loss in losses:
            damper.step(model, CE, (x, y), loss=torch.tensor(loss))
    first, second = damper.history
    assert (first.decision, first.step, first.loss) == ("skip", 10, 9.0)
    assert "9 spikes to 9 x the median 1" in first.reason and math.isnan(first.estimate)
    assert first.damping == 1e-3
    assert second.decision == "accept" and second.loss == 1.0  # the spike is in the window
    off = LinearShrinkageDamper(init=1e-3, update_every=10, guard=False)
    for loss in losses[:10]:
        off.step(model, CE, (x, y), loss=loss)
    assert off.history[0].decision == "accept"


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("fault", ["data", "parameters", "loss"])
def test_non_finite_data_parameters_or_loss_skip_the_update(data, fault, guard):
    x, y = data
    model = make_model()
    loss = torch.tensor(0.7)
    if fault == "data":
        x = x.clone()
        x[3, 1] = math.nan
    elif fault == "parameters":
        with torch.no_grad():
            model[0].weight[0, 0] = math.inf
    else:
        loss = torch.tensor(math.nan)
    damper = LinearShrinkageDamper(init=2e-3, update_every=1, guard=guard)
    with pytest.warns(CurvlabWarning, match="not finite"):
        damper.step(model, CE, (x, y), loss=loss)
    record = damper.history[0]
    assert record.decision == "skip" and record.reason == {
        "data": "the data is not finite",
        "parameters": "the parameters are not finite",
        "loss": "the loss is not finite",
    }[fault]
    assert damper.damping == 2e-3 and damper.n_rejected == 1


def test_a_numerical_error_inside_the_estimate_is_rejected_not_raised(data):
    """Finite data, parameters and loss, but the estimate itself fails numerically (the
    rule raises NumericalError, as the estimator does on a non-finite product)."""
    from curvlab.errors import NumericalError

    x, y = data
    model = make_model()

    def diverging(est):
        raise NumericalError("the hessian product is not finite")

    damper = LinearShrinkageDamper(init=2e-3, update_every=1, rule=diverging)
    with pytest.warns(CurvlabWarning, match="estimation failed"):
        damper.step(model, CE, (x, y))
    record = damper.history[0]
    assert (record.decision, damper.damping) == ("reject", 2e-3)
    assert "product is not finite" in record.reason
