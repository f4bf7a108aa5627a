"""LinearShrinkageDamper: update rules, estimate rules as objects, the batch, estimator reuse,
history, the pre-issue-13 keywords."""

import math
import warnings

import pytest
import torch
from torch import nn

import curvlab
from curvlab.damping import (
    AuthorsUpdate,
    Bounded,
    CurvlabUpdate,
    DampingRecord,
    LinearShrinkageDamper,
    PaperUpdate,
    RawEstimate,
    RMTNoise,
    ShrinkageRule,
    Subsample,
    plot_damping_history,
    write_history_csv,
)
from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.noise import noise_variance
from curvlab.shrinkage import OAS, LedoitWolf, RMTLinear, shrinkage_to_damping

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:256] / 16.0, dtype=torch.float64)
    return x, torch.tensor(data.target[:256])


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).to(torch.float64)


def scripted(**kwargs):
    """A damper fed numbers through update() with the guard off."""
    return LinearShrinkageDamper(guard=False, **kwargs)


def draws(seed, total, n):
    """The permutation and probe seed a damper with ``seed`` draws at each of n updates on
    ``total`` samples (rule "rmt", groups of 8: a fresh order, then the seed)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        order = torch.randperm(total, generator=gen)
        out.append((order, int(torch.randint(0, 2**62, (1,), generator=gen))))
    return out


# ---------------------------------------------------------------------- update rules
def test_the_three_update_rules_against_their_formulas():
    script = [4e-3, 1e-4, 2e-2, 0.0]
    rules = {
        "paper": PaperUpdate(),
        "authors": AuthorsUpdate(floor=1e-3),
        "curvlab": CurvlabUpdate(floor=1e-3),
    }
    for name, rule in rules.items():
        damper = scripted(init=1e-2, update_rule=rule)
        got = [damper.update(i, v) for i, v in enumerate(script)]
        delta, expected = 1e-2, []
        for i, s2 in enumerate(script):
            if name == "paper":
                delta = 0.7 * delta + 0.3 * s2
            elif name == "authors":  # additive floor, the first estimate at full weight
                delta = 1e-3 + s2 if i == 0 else 0.7 * delta + 0.3 * (1e-3 + s2)
            else:
                delta = 0.7 * delta + 0.3 * max(1e-3, s2)
            expected.append(delta)
        assert got == pytest.approx(expected, rel=1e-14), name
    assert scripted(init=3e-3, update_rule="authors").update_rule.floor == 3e-3


def test_bounded_clamps_the_rule_and_the_start():
    damper = scripted(init=1e-3, update_rule=Bounded(PaperUpdate(ema=0.0), low=2e-3, high=4e-3))
    assert damper.damping == 2e-3  # init clamped
    assert [damper.update(i, v) for i, v in enumerate([1e-2, 1e-5, 3e-3])] == [4e-3, 2e-3, 3e-3]
    with pytest.raises(InvalidInputError, match="exceeds"):
        Bounded(PaperUpdate(), low=1.0, high=0.5)


def test_a_custom_update_rule_is_any_callable():
    seen = []

    def halfway(current, value, first):
        seen.append(first)
        return 0.5 * (current + value)

    damper = scripted(init=1.0, update_rule=halfway)
    assert damper.update(0, 3.0) == 2.0 and damper.update(1, 0.0) == 1.0
    assert seen == [True, False]


def test_floor_and_init_are_separate_and_the_default_floor_shows_learning():
    """Estimates far below delta*: the default additive floor (delta*) moves with them
    (delta* + s2); a floor of its own lets the damping fall below delta*; the old max-floor
    (curvlab's rule with floor delta*) stays flat at delta*: the learner is hidden."""
    estimates = [1e-5, 2e-5, 1e-5, 3e-5] * 5
    runs = {
        "default": scripted(init=1e-3),
        "own floor": scripted(init=1e-3, update_rule=AuthorsUpdate(floor=1e-6)),
        "old": scripted(init=1e-3, update_rule=CurvlabUpdate()),
    }
    for damper in runs.values():
        for i, value in enumerate(estimates):
            damper.update(i, value)
    smoothed = estimates[0]
    for value in estimates[1:]:
        smoothed = 0.7 * smoothed + 0.3 * value
    assert runs["default"].floor == 1e-3 == runs["old"].floor
    assert runs["default"].damping == pytest.approx(1e-3 + smoothed, rel=1e-12)
    assert runs["own floor"].damping == pytest.approx(1e-6 + smoothed, rel=1e-12)
    assert runs["own floor"].damping < 1e-4
    assert {r.damping for r in runs["old"].history} == {1e-3}
    assert len({r.damping for r in runs["default"].history}) == len(estimates)


def test_an_unbound_floor_refuses_to_guess():
    with pytest.raises(InvalidInputError, match="with_init"):
        AuthorsUpdate()(1e-3, 1e-4, first=True)
    assert AuthorsUpdate().with_init(2e-3).floor == 2e-3
    assert Bounded(CurvlabUpdate(), high=1.0).with_init(2e-3).floor == 2e-3


def test_unusable_estimates_are_rejected_recorded_and_warned_once_per_kind():
    damper = scripted(init=1e-3, update_rule=PaperUpdate())
    with pytest.warns(CurvlabWarning, match="warned once per kind") as record:
        for i, value in enumerate([2e-3, math.nan, math.inf, -1.0, 5e-3]):
            damper.update(10 * i, value)
    assert len(record) == 1  # nan, inf and -1 are one kind
    decisions = [(r.step, r.decision) for r in damper.history]
    assert decisions == [(0, "accept"), (10, "reject"), (20, "reject"), (30, "reject"),
                         (40, "accept")]
    assert "not finite" in damper.history[1].reason and "negative" in damper.history[3].reason
    assert damper.n_rejected == 3
    assert damper.damping == pytest.approx(0.7 * (0.7e-3 + 0.6e-3) + 1.5e-3)
    assert math.isnan(damper.history[0].stderr)  # a bare number has no standard error
    assert damper.history[0].folded == 2e-3 and math.isnan(damper.history[1].folded)


def test_an_update_rule_giving_an_invalid_damping_is_rejected():
    damper = scripted(init=1e-3, update_rule=lambda current, value, first: value - 1.0)
    with pytest.warns(CurvlabWarning, match="update rule gave"):
        damper.update(0, 0.5)
    assert damper.damping == 1e-3 and damper.history[0].decision == "reject"


# ---------------------------------------------------------------------- the schedule
def test_updates_run_every_k_steps_after_the_first_k(digits):
    x, y = digits
    model = make_mlp()
    damper = LinearShrinkageDamper(init=1e-3, update_every=3)
    values = [damper.step(model, CE, (x[:32], y[:32])) for _ in range(8)]
    assert [r.step for r in damper.history] == [3, 6]
    assert values[:2] == [1e-3, 1e-3] and values[2] != 1e-3  # delta* until the first update
    assert damper.steps == 8
    with pytest.raises(InvalidInputError, match="pass model, loss_fn and data"):
        damper.step()  # step 9 re-estimates


def test_fixed_rule_never_estimates():
    damper = LinearShrinkageDamper(rule="fixed", init=0.03, update_every=1)
    assert [damper.step() for _ in range(4)] == [0.03] * 4
    assert damper.history == []
    with pytest.raises(InvalidInputError, match="no updates"):
        damper.update(0, 1.0)


# ---------------------------------------------------------------------- estimate rules
def test_rmt_rule_is_the_noise_variance_of_the_inferred_batch(digits):
    """B is the size of the batch passed; by default one probe and 4 groups (of 12 here)
    from a fresh random order."""
    x, y = digits
    model = make_mlp()
    damper = LinearShrinkageDamper(update_every=1, seed=3)
    for _ in range(2):
        damper.step(model, CE, (x[:48], y[:48]))
    for record, (order, seed) in zip(damper.history, draws(3, 48, 2)):
        est = curvlab.estimator("autograd", model, CE, (x[:48][order], y[:48][order]))
        ref = noise_variance(est, batch_size=48, n_probes=1, group_size=12,
                             population=math.inf, seed=seed)
        assert record.batch_size == 48
        assert record.estimate == pytest.approx(ref.value, rel=1e-12)
        assert record.stderr == pytest.approx(ref.stderr, rel=1e-10)


def test_per_sample_rule_object_with_method_and_population(digits):
    x, y = digits
    model = make_mlp()
    rule = RMTNoise(n_probes=3, group_size=1, method="paper", population=256)
    damper = LinearShrinkageDamper(rule=rule, update_every=1, batch_size=32, seed=1)
    with pytest.warns(CurvlabWarning, match="batch_size=32 but the batch passed"):
        damper.step(model, CE, (x[:64], y[:64]))
    gen = torch.Generator().manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))  # no reordering for g = 1
    est = curvlab.estimator("autograd", model, CE, (x[:64], y[:64]))
    ref = noise_variance(est, batch_size=32, n_probes=3, method="paper", population=256,
                         seed=seed)
    assert damper.history[0].estimate == ref.value and damper.history[0].batch_size == 32


def test_the_batch_size_is_the_largest_since_the_last_update(digits):
    """A short last batch of an epoch at the update does not set B."""
    x, y = digits
    model = make_mlp()
    damper = LinearShrinkageDamper(update_every=3, rule=lambda est: est.num_samples / 1e3)
    for n in (32, 32, 20, 24, 24, 24):
        damper.step(model, CE, (x[:n], y[:n]))
    assert [(r.batch_size, r.estimate) for r in damper.history] == [(32, 0.02), (24, 0.024)]


def test_explicit_batch_size_is_used_and_a_disagreement_warned_once(digits):
    x, y = digits
    model = make_mlp()
    damper = LinearShrinkageDamper(update_every=1, batch_size=128)
    with pytest.warns(CurvlabWarning, match="holds 32 samples") as record:
        for _ in range(3):
            damper.step(model, CE, (x[:32], y[:32]))
    assert len(record) == 1
    assert {r.batch_size for r in damper.history} == {128}
    agreeing = LinearShrinkageDamper(update_every=1, batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agreeing.step(model, CE, (x[:32], y[:32]))
    # same seed, data and order: (1/32) / (1/128) exactly
    assert agreeing.history[0].estimate == pytest.approx(damper.history[0].estimate * 4,
                                                          rel=1e-12)


def test_a_batch_too_small_is_skipped_with_a_warning_not_raised(digits):
    x, y = digits
    model = make_mlp()
    damper = LinearShrinkageDamper(init=2e-3, update_every=1)
    with pytest.warns(CurvlabWarning, match="too few samples"):
        damper.step(model, CE, (x[:1], y[:1]))  # 1 group of 1: the variance needs 2
    record = damper.history[0]
    assert (record.decision, record.damping) == ("skip", 2e-3) and "2 samples" in record.reason
    damper.step(model, CE, (x[:32], y[:32]))
    assert damper.history[1].decision == "accept"


def test_a_batch_too_small_for_groups_of_two_under_train_batchnorm_is_skipped(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Tanh(),
                          nn.Linear(8, 10)).to(torch.float64).train()
    damper = LinearShrinkageDamper(init=2e-3, update_every=1)
    with pytest.warns(CurvlabWarning, match="too few samples"):  # warned once
        for n in (2, 3):  # one group of 2: BatchNorm needs 2 per group, the variance 2 groups
            damper.step(model, CE, (x[:n], y[:n]))
    assert [r.decision for r in damper.history] == ["skip", "skip"]
    assert "1 group(s) of 2" in damper.history[0].reason
    damper.step(model, CE, (x[:16], y[:16]))
    assert damper.history[-1].decision == "accept"


def test_a_dataloader_passed_to_step_leaves_the_global_rng_as_found(digits):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits
    model = make_mlp()
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32, shuffle=True)
    damper = LinearShrinkageDamper(update_every=1)
    state = torch.random.get_rng_state()
    damper.step(model, CE, loader)
    assert damper.history[0].decision == "accept"
    assert torch.equal(state, torch.random.get_rng_state())


def test_the_target_scale_is_smoothed_with_the_update_rules_weight():
    for rule, expected in ((PaperUpdate(ema=0.0), 4.0), (PaperUpdate(ema=0.5), 3.0),
                           (Bounded(PaperUpdate(ema=0.0), high=1.0), 4.0)):
        damper = scripted(update_rule=rule)
        damper.update(0, RawEstimate(1e-2, target_scale=2.0))
        damper.update(1, RawEstimate(1e-2, target_scale=4.0))
        assert damper.tau == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("kind", ["ledoit_wolf", "oas", "rmt_linear"])
def test_shrinkage_estimators_as_rules(digits, kind):
    x, y = digits
    model = make_mlp()
    est = curvlab.estimator("autograd", model, CE, (x[:100], y[:100]), curvature="ggn")
    make = {
        "ledoit_wolf": lambda: LedoitWolf(n_probes=4, store_precision=False),
        "oas": lambda: OAS(n_probes=4, store_precision=False),
        "rmt_linear": lambda: RMTLinear(n_probes=4, store_precision=False),
    }[kind]
    damper = LinearShrinkageDamper(rule=make(), update_every=1, guard=False,
                                   update_rule=PaperUpdate(ema=0.0))
    damper.update(0, est)
    gen = torch.Generator().manual_seed(0)
    fit = make()
    fit.seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    fit.fit(est)
    expected = shrinkage_to_damping(fit.shrinkage_, fit.target_scale_)
    assert damper.history[0].estimate == pytest.approx(expected, rel=1e-12)
    assert damper.damping == pytest.approx(expected, rel=1e-12)
    assert damper.tau == pytest.approx(fit.target_scale_)
    se = fit.shrinkage_stderr_ * fit.target_scale_ / (1 - fit.shrinkage_) ** 2
    assert damper.history[0].stderr == pytest.approx(se, rel=1e-9)


def test_string_aliases_build_the_same_rules_as_the_objects(digits):
    x, y = digits
    model = make_mlp()
    batch = (x[:100], y[:100])
    for alias, obj in (("ledoit_wolf", LedoitWolf), ("oas", OAS)):
        by_name = LinearShrinkageDamper(rule=alias, update_every=1, curvature="ggn")
        by_object = LinearShrinkageDamper(
            rule=obj(n_probes=2, store_precision=False), update_every=1, curvature="ggn"
        )
        by_name.step(model, CE, batch)
        by_object.step(model, CE, batch)
        assert isinstance(by_name.rule, ShrinkageRule)
        assert by_name.history[0].estimate == by_object.history[0].estimate


def test_a_new_rule_needs_no_edit_to_the_damper(digits):
    """Any object with estimate(est, batch_size=, seed=) is a rule: here the mean diagonal
    curvature over B, with the batch read from the estimator."""
    x, y = digits
    model = make_mlp()

    class MeanDiagonal:
        def estimate(self, est, *, batch_size, seed):
            return RawEstimate(float(est.diagonal().mean()) / batch_size, 0.0)

    damper = LinearShrinkageDamper(rule=MeanDiagonal(), update_every=1)
    damper.step(model, CE, (x[:16], y[:16]))
    est = curvlab.estimator("autograd", model, CE, (x[:16], y[:16]))
    assert damper.history[0].estimate == pytest.approx(float(est.diagonal().mean()) / 16)
    plain = LinearShrinkageDamper(rule=lambda est: est.num_params * 1e-6, update_every=1)
    plain.step(model, CE, (x[:16], y[:16]))
    assert plain.history[0].estimate == pytest.approx(est.num_params * 1e-6)


# ---------------------------------------------------------------------- estimator reuse
def test_one_estimator_is_built_and_reused_through_with_data(digits, monkeypatch):
    x, y = digits
    model = make_mlp()
    built = []

    def factory(model, loss_fn, data, curvature):
        built.append(curvlab.estimator("autograd", model, loss_fn, data, curvature=curvature))
        return built[-1]

    calls = []
    original = curvlab.CurvatureEstimator.with_data

    def spy(self, data):
        calls.append(self)
        return original(self, data)

    monkeypatch.setattr(curvlab.CurvatureEstimator, "with_data", spy)
    damper = LinearShrinkageDamper(update_every=1, estimator=factory)
    for i in range(3):
        damper.step(model, CE, (x[32 * i : 32 * i + 32], y[32 * i : 32 * i + 32]))
    assert len(built) == 1 and len(calls) == 2
    assert calls[0] is built[0]
    assert all(r.decision == "accept" for r in damper.history)


def test_an_injected_estimator_is_used_with_new_data(digits):
    x, y = digits
    model = make_mlp()
    est = curvlab.estimator("autograd", model, CE, (x[:8], y[:8]))
    rule = RMTNoise(group_size=1)
    injected = LinearShrinkageDamper(rule=rule, update_every=1, estimator=est)
    injected.step(data=(x[:40], y[:40]))
    named = LinearShrinkageDamper(rule=rule, update_every=1)
    named.step(model, CE, (x[:40], y[:40]))
    assert injected.history[0].estimate == named.history[0].estimate
    with pytest.raises(InvalidInputError, match="given an estimator"):
        injected.step(make_mlp(1), CE, (x[:40], y[:40]))


def test_subsample_needs_batch_size_and_draws_once_or_fresh(digits):
    x, y = digits
    model = make_mlp()
    with pytest.raises(InvalidInputError, match="pass batch_size"):
        LinearShrinkageDamper(subsample=50)
    fixed = LinearShrinkageDamper(update_every=1, batch_size=32, subsample=50)
    fresh = LinearShrinkageDamper(update_every=1, batch_size=32,
                                  subsample=Subsample(50, fresh=True))
    for damper in (fixed, fresh):
        damper.step(model, CE, (x, y))
        first = damper.state_dict()["indices"]
        damper.step(model, CE, (x, y))
        assert first.shape == (50,)
        assert torch.equal(damper.state_dict()["indices"], first) == (damper is fixed)
    with pytest.raises(InvalidInputError, match="same data"):
        fixed.step(model, CE, (x[:20], y[:20]))


# ---------------------------------------------------------------------- history
def _records():
    return [
        DampingRecord(100, 4e-3, 1e-3, "accept", "", 4e-3, 64, 0.3, 4e-3),
        DampingRecord(200, 9.0, 2.0, "cap", "the estimate 9 is above the band", 5e-3, 64, 2.0,
                      1e-2),
        DampingRecord(300, math.nan, math.nan, "skip", "the data is not finite", 5e-3, 0,
                      math.nan),
        DampingRecord(400, -1.0, math.nan, "reject", "negative", 5e-3, 64, 0.2),
    ]


def test_history_csv_round_trips(tmp_path):
    import csv

    path = write_history_csv(_records(), tmp_path / "sub" / "history.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["decision"] for r in rows] == ["accept", "cap", "skip", "reject"]
    assert float(rows[1]["folded"]) == 1e-2 and rows[1]["reason"].startswith("the estimate 9")
    assert math.isnan(float(rows[2]["estimate"]))


def test_plot_draws_on_the_given_axes_and_writes_only_with_a_path(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    monkeypatch.chdir(tmp_path)
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert plot_damping_history(_records(), init=1e-3, ax=right) is fig
    labels = right.get_legend_handles_labels()[1]
    assert {"damping", "estimate (accepted)", "estimate (capped)", "skipped"} <= set(labels)
    steps, values = right.lines[0].get_data()
    assert list(steps) == [0, 100, 200, 300, 400] and values[0] == 1e-3
    assert not left.lines and list(tmp_path.iterdir()) == []
    own = plot_damping_history(_records(), path=tmp_path / "d.png")
    assert isinstance(own, Figure) and (tmp_path / "d.png").stat().st_size > 0
    with pytest.raises(InvalidInputError, match="DampingRecord"):
        plot_damping_history([1, 2])


def test_the_damper_plots_its_own_trajectory_from_init():
    damper = scripted(init=2e-3)
    damper.update(10, 1e-3)
    fig = plot_damping_history(damper)
    steps, values = fig.axes[0].lines[0].get_data()
    assert list(steps) == [0, 10] and list(values) == [2e-3, damper.damping]


# ---------------------------------------------------------------------- configuration
def test_pre_issue_13_keywords_still_work_with_a_deprecation_warning(digits):
    with pytest.warns(DeprecationWarning, match="ema= is deprecated"):
        damper = LinearShrinkageDamper(init=0.5, floor=0.0, ema=0.5)
    assert isinstance(damper.update_rule, CurvlabUpdate) and damper.floor == 0.0
    assert damper.update(0, 0.1) == pytest.approx(0.3)
    with pytest.warns(DeprecationWarning):
        old = LinearShrinkageDamper(init=1e-3, ema=0.0, min=2e-3, max=4e-3, n_probes=3,
                                    group_size=1, population=100)
    assert old.damping == 2e-3 and old.floor == 1e-3  # the old default floor: init
    assert (old.rule.n_probes, old.rule.group_size, old.rule.population) == (3, 1, 100.0)
    with pytest.warns(DeprecationWarning):
        lw = LinearShrinkageDamper(rule="ledoit_wolf", n_probes=5)
    assert lw.rule.estimator.n_probes == 5
    with pytest.warns(DeprecationWarning):
        fresh = LinearShrinkageDamper(subsample=40, fresh_subsample=True, batch_size=8)
    assert fresh.subsample == Subsample(40, fresh=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rule": "lw"}, InvalidInputError, "rule must be one of"),
        ({"rule": 3}, InvalidInputError, "rule must be one of"),
        ({"update_rule": "ema"}, InvalidInputError, "update_rule"),
        ({"guard": "on"}, InvalidInputError, "guard"),
        ({"init": 0.0}, InvalidInputError, "init"),
        ({"init": -1.0}, InvalidInputError, "init"),
        ({"init": math.nan}, InvalidInputError, "init"),
        ({"update_every": 0}, InvalidInputError, "update_every"),
        ({"batch_size": 0}, InvalidInputError, "batch_size"),
        ({"subsample": 1, "batch_size": 8}, InvalidInputError, "subsample"),
        ({"curvature": "gauss"}, InvalidInputError, "curvature"),
        ({"estimator": "nope"}, InvalidInputError, "nope"),
        ({"estimator": 3}, InvalidInputError, "estimator"),
        ({"timeout": 0}, InvalidInputError, "timeout"),
        ({"emma": 0.5}, TypeError, "emma"),
    ],
)
def test_bad_configuration_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        LinearShrinkageDamper(**kwargs)


def test_bad_rule_options_raise():
    for kwargs, match in (({"group_size": 0}, "group_size"), ({"n_probes": 0}, "n_probes"),
                          ({"method": "biased"}, "method"), ({"target": "mean"}, "target"),
                          ({"population": 1}, "population")):
        with pytest.raises(InvalidInputError, match=match):
            RMTNoise(**kwargs)


def test_bad_estimates_raise():
    damper = scripted()
    with pytest.raises(InvalidInputError, match="NoiseEstimate"):
        damper.update(0, "large")
    with pytest.raises(InvalidInputError, match="bool"):
        damper.update(0, True)


@pytest.mark.parametrize(
    "module",
    [
        "curvlab.damping.damper",
        "curvlab.damping.estimates",
        "curvlab.damping.updates",
        "curvlab.damping.guard",
        "curvlab.damping.sinks",
        "curvlab.damping.history",
        "curvlab.damping.resolve",
        "curvlab.damping._data",
        "curvlab.optim.adam",
        "curvlab.adapters.kfac_pytorch",
    ],
)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    import doctest
    import importlib

    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng():
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
