"""LinearShrinkageDamper: EMA/floor/schedule arithmetic, optimizers, checkpoints, failures."""

import io
import math
import warnings

import pytest
import torch
from conftest import dense_ggn
from torch import nn

import curvlab
from curvlab.damping import LinearShrinkageDamper
from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.noise import noise_variance
from curvlab.shrinkage import OAS, LedoitWolf, shrinkage_to_damping


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:256] / 16.0, dtype=torch.float64)
    return x, torch.tensor(data.target[:256])


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).to(torch.float64)


def batches(x, y, size=32, seed=0):
    """An endless stream of random training batches (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(x.shape[0], generator=gen)[:size]
        yield x[idx], y[idx]


def damper_seeds(seed, n):
    """The probe seeds a damper with ``seed`` draws for its first n updates (no subsample)."""
    gen = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(n)]


# ---------------------------------------------------------------------- arithmetic
def test_scripted_estimates_ema_floor_clamp_and_rejections():
    damper = LinearShrinkageDamper(init=1e-3, ema=0.7, update_every=3, max=4e-3)
    script = [0.0, 5e-3, math.nan, 2e-3, math.inf, -1.0, 1e-4, 2e-2]
    expected, delta = [], 1e-3
    for value in script:
        if math.isfinite(value) and value >= 0:
            delta = min(0.7 * delta + 0.3 * max(1e-3, value), 4e-3)
        expected.append(delta)
    with pytest.warns(CurvlabWarning, match="warned once") as record:
        got = [damper.update(3 * i, value) for i, value in enumerate(script)]
    assert len(record) == 1
    assert got == pytest.approx(expected, rel=1e-15)
    assert damper.n_rejected == 3
    assert [r.accepted for r in damper.history] == [math.isfinite(v) and v >= 0 for v in script]
    assert [r.step for r in damper.history] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert damper.history[2].estimate != damper.history[2].estimate  # the NaN is recorded
    first = damper.history[0]
    assert (first.step, first.estimate, first.damping, first.accepted) == (0, 0.0, 1e-3, True)
    assert math.isnan(first.stderr)  # a bare number has no standard error
    assert damper.damping == 4e-3  # the clamp at max


def test_zero_variance_falls_back_to_the_floor_and_min_clamps():
    damper = LinearShrinkageDamper(init=1e-3, floor=5e-3, min=2e-3)
    assert damper.damping == 2e-3  # init clamped to min
    damper.update(0, 0.0)
    assert damper.damping == pytest.approx(0.7 * 2e-3 + 0.3 * 5e-3)


def test_zero_noise_model_gives_the_floor():
    """Identical samples: every per-sample Hessian is the same, the noise is exactly 0."""
    x = torch.ones(20, 3, dtype=torch.float64)
    y = torch.zeros(20, 1, dtype=torch.float64)
    model = nn.Linear(3, 1).to(torch.float64)
    damper = LinearShrinkageDamper(init=1e-2, update_every=1, batch_size=4)
    damper.step(model, nn.MSELoss(), (x, y))
    assert damper.history[0].estimate == pytest.approx(0.0, abs=1e-20)
    assert damper.damping == pytest.approx(1e-2)


def test_schedule_updates_every_k_steps(digits):
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    damper = LinearShrinkageDamper(update_every=3, n_probes=2, batch_size=32)
    stream = batches(x, y)
    for _ in range(8):
        damper.step(model, loss_fn, next(stream))
    assert damper.steps == 8
    assert [r.step for r in damper.history] == [0, 3, 6]
    assert [damper.due(s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert not damper.maybe_update(4, model, loss_fn, next(stream))
    with pytest.raises(InvalidInputError, match="pass model, loss_fn and data"):
        damper.maybe_update(9)


def test_readouts_for_identity_and_trace_targets(digits):
    x, y = digits
    damper = LinearShrinkageDamper(init=0.5)
    assert damper.shrinkage == damper.lr_scale == pytest.approx(1 / 1.5)
    assert damper.rho == pytest.approx(0.5 / 1.5)
    assert damper(123) == damper.damping == 0.5

    model = make_mlp()
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y), curvature="ggn")
    traced = LinearShrinkageDamper(target="trace", n_probes=20, ema=0.0, update_every=1)
    traced.update(0, est)
    exact = float(torch.trace(dense_ggn(model, nn.CrossEntropyLoss(), x, y))) / est.num_params
    assert traced.tau == pytest.approx(exact, rel=0.15)
    delta = traced.damping
    assert traced.shrinkage == pytest.approx(traced.tau / (traced.tau + delta))
    assert traced.rho == pytest.approx(1 - traced.shrinkage)


# ---------------------------------------------------------------------- estimates
def test_rmt_estimate_is_the_noise_variance_of_the_batch(digits):
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    damper = LinearShrinkageDamper(
        update_every=1, n_probes=3, batch_size=32, group_size=1, method="paper"
    )
    damper.step(model, loss_fn, (x[:64], y[:64]))
    est = curvlab.estimator("autograd", model, loss_fn, (x[:64], y[:64]))
    (seed,) = damper_seeds(0, 1)
    ref = noise_variance(
        est, batch_size=32, n_probes=3, method="paper", population=math.inf, seed=seed
    )
    assert damper.history[0].estimate == ref.value
    assert damper.history[0].stderr == ref.stderr


def test_groups_are_formed_from_a_fresh_random_order(digits):
    """Default groups of 8: the damper permutes the samples, then groups consecutive ones."""
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    damper = LinearShrinkageDamper(update_every=1, batch_size=32, seed=3)
    assert (damper.group_size, damper.n_probes) == (8, 2)
    for _ in range(2):
        damper.step(model, loss_fn, (x[:64], y[:64]))
    gen = torch.Generator().manual_seed(3)
    for record in damper.history:
        order = torch.randperm(64, generator=gen)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        est = curvlab.estimator("autograd", model, loss_fn, (x[order], y[order]))
        ref = noise_variance(
            est, batch_size=32, n_probes=2, group_size=8, population=math.inf, seed=seed
        )
        assert record.estimate == pytest.approx(ref.value, rel=1e-13)


def test_subsample_of_an_estimator_fixed_and_fresh(digits):
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    damper = LinearShrinkageDamper(
        update_every=1, n_probes=2, subsample=50, population=256, group_size=1
    )
    damper.update(0, est)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(256, generator=gen)[:50]
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    ref = noise_variance(est, batch_size=128, n_probes=2, subsample=idx, population=256, seed=seed)
    assert damper.history[0].estimate == ref.value
    first = damper.state_dict()["indices"]
    damper.update(1, est)
    assert torch.equal(damper.state_dict()["indices"], first)

    fresh = LinearShrinkageDamper(update_every=1, n_probes=2, subsample=50, fresh_subsample=True)
    fresh.update(0, est)
    a = fresh.state_dict()["indices"]
    fresh.update(1, est)
    assert not torch.equal(fresh.state_dict()["indices"], a)


@pytest.mark.parametrize("rule, cls", [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_ledoit_wolf_and_oas_rules(digits, rule, cls):
    x, y = digits
    model = make_mlp()
    est = curvlab.estimator(
        "autograd", model, nn.CrossEntropyLoss(), (x[:100], y[:100]), curvature="ggn"
    )
    damper = LinearShrinkageDamper(rule=rule, n_probes=4, update_every=1, ema=0.0, floor=0.0)
    damper.update(0, est)
    (seed,) = damper_seeds(0, 1)
    fit = cls(n_probes=4, seed=seed).fit(est)
    expected = shrinkage_to_damping(fit.shrinkage_, fit.target_scale_)
    assert damper.history[0].estimate == pytest.approx(expected, rel=1e-12)
    assert damper.damping == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(damper.history[0].stderr)
    # the training-loop path builds the same estimator from (model, loss, data)
    stepped = LinearShrinkageDamper(
        rule=rule, n_probes=4, update_every=1, ema=0.0, floor=0.0, curvature="ggn"
    )
    stepped.step(model, nn.CrossEntropyLoss(), (x[:100], y[:100]))
    assert stepped.history[0].estimate == pytest.approx(expected, rel=1e-12)


def test_fixed_rule_never_estimates():
    damper = LinearShrinkageDamper(rule="fixed", init=0.03, update_every=1)
    for _ in range(5):
        assert damper.step() == 0.03
    assert damper.history == []
    with pytest.raises(InvalidInputError, match="fixed"):
        damper.update(0, 1.0)


# ---------------------------------------------------------------------- failures
def test_diverging_loss_is_caught_counted_and_warned_once(digits):
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    damper = LinearShrinkageDamper(init=2e-3, update_every=1)
    with pytest.warns(CurvlabWarning, match="estimation failed"):
        damper.step(model, loss_fn, (x[:32], y[:32]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        damper.step(model, loss_fn, (x[:32], y[:32]))
    assert damper.n_rejected == 2
    assert damper.damping == 2e-3
    assert [r.accepted for r in damper.history] == [False, False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "lw"}, "rule"),
        ({"target": "mean"}, "target"),
        ({"ema": 1.0}, "ema"),
        ({"update_every": 0}, "update_every"),
        ({"init": -1.0}, "init"),
        ({"init": math.nan}, "init"),
        ({"min": 2.0, "max": 1.0}, "exceeds"),
        ({"subsample": 1}, "subsample"),
        ({"batch_size": 256, "population": 100}, "population"),
        ({"curvature": "gauss"}, "curvature"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        LinearShrinkageDamper(**kwargs)


def test_bad_estimate_and_state_raise():
    damper = LinearShrinkageDamper()
    with pytest.raises(InvalidInputError, match="NoiseEstimate"):
        damper.update(0, "large")
    with pytest.raises(InvalidInputError, match="state_dict"):
        damper.load_state_dict({"damping": 1.0})


# ---------------------------------------------------------------------- consumers
def test_adam_eps_follows_the_damping_while_training(digits):
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    damper = LinearShrinkageDamper(init=1e-4, update_every=5, n_probes=2, batch_size=32)
    opt = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
        lr=1e-2,
        eps=1.0,
    )
    damper.attach(opt, key="eps")
    assert all(g["eps"] == 1e-4 for g in opt.param_groups)
    stream, values = batches(x, y), set()
    for _ in range(21):
        xb, yb = next(stream)
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        damper.step(model, loss_fn, (xb, yb))
        assert all(g["eps"] == damper.damping for g in opt.param_groups)
        values.add(damper.damping)
    assert len(damper.history) == 5 and len(values) == 5
    assert all(p.grad is not None for p in model.parameters())  # training untouched


class PreconditionerLike:
    """Stands for a KFAC preconditioner: a plain object with a ``damping`` attribute."""

    def __init__(self):
        self.damping = 0.1


def test_attach_to_a_preconditioner_a_mapping_and_lanczos_opt(digits):
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    damper = LinearShrinkageDamper(init=5e-3, update_every=1, n_probes=2, batch_size=32)
    pre, config = PreconditionerLike(), {"damping": 1.0, "other": 2}
    lopt = curvlab.optim.LanczosOPT(
        model.parameters(), model=model, loss_fn=loss_fn, data=(x[:32], y[:32]), k=2, damping=1.0
    )
    assert damper.attach(pre, key="damping") is pre
    damper.attach(config, key="damping")
    damper.attach(lopt, key="damping")
    for step in range(3):
        damper.step(model, loss_fn, (x[:64], y[:64]))
        assert pre.damping == config["damping"] == damper.damping == damper(step)
        assert all(g["damping"] == damper.damping for g in lopt.param_groups)
    assert config["other"] == 2
    with pytest.raises(InvalidInputError, match="no attribute 'eps'"):
        damper.attach(pre)
    with pytest.raises(InvalidInputError, match="no key"):
        damper.attach({}, key="damping")
    with pytest.raises(InvalidInputError, match="have no 'eps'"):
        damper.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_curvlab_kfac_damping_follows_the_damper(digits):
    kfac = getattr(curvlab.optim, "KFAC", None)
    if kfac is None:
        pytest.skip("curvlab.optim.KFAC is not available")
    x, y = digits
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    damper = LinearShrinkageDamper(init=1e-3, update_every=2, n_probes=2, batch_size=32)
    opt = kfac(model, loss_fn, lr=0.05, damping=1.0)
    damper.attach(opt, key="damping")
    stream = batches(x, y)
    for _ in range(5):
        xb, yb = next(stream)
        loss = opt.step((xb, yb))
        assert math.isfinite(float(loss))
        damper.step(model, loss_fn, (xb, yb))
        assert opt.param_groups[0]["damping"] == damper.damping
    assert len(damper.history) == 3 and damper.damping > 1e-3


# ---------------------------------------------------------------------- checkpoints
def _train(model, opt, damper, stream, loss_fn, steps, data=None):
    trace = []
    for _ in range(steps):
        xb, yb = next(stream)
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        damper.step(model, loss_fn, data if data is not None else (xb, yb))
        trace.append(damper.damping)
    return trace


@pytest.mark.parametrize("fresh", [False, True])
def test_checkpoint_and_resume_equal_the_uninterrupted_run(digits, fresh):
    x, y = digits
    loss_fn = nn.CrossEntropyLoss()

    def setup():
        model = make_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        damper = LinearShrinkageDamper(
            init=1e-3,
            update_every=3,
            n_probes=2,
            batch_size=32,
            subsample=48,
            fresh_subsample=fresh,
            seed=7,
        )
        damper.attach(opt, key="eps")
        return model, opt, damper

    model, opt, damper = setup()
    full = _train(model, opt, damper, batches(x, y), loss_fn, 14, data=(x, y))

    model, opt, damper = setup()
    stream = batches(x, y)
    first = _train(model, opt, damper, stream, loss_fn, 7, data=(x, y))
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "damper": damper.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    model, opt, damper = setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    damper.load_state_dict(saved["damper"])
    assert all(g["eps"] == damper.damping for g in opt.param_groups)
    rest = _train(model, opt, damper, stream, loss_fn, 7, data=(x, y))
    assert first + rest == full
    assert damper.steps == 14 and len(damper.history) == 5


def test_state_dict_is_a_snapshot():
    damper = LinearShrinkageDamper(update_every=1)
    damper.update(0, 2e-3)
    state = damper.state_dict()
    damper.update(1, 5e-3)
    assert len(state["history"]) == 1 and state["damping"] == pytest.approx(1.3e-3)
    other = LinearShrinkageDamper(update_every=1)
    other.load_state_dict(state)
    assert other.damping == pytest.approx(0.7e-3 + 0.3 * 2e-3)
    assert other.history == damper.history[:1]
