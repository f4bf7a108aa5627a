"""curvlab.optim.KFAC against exact damped natural-gradient steps and its own state."""

import copy
import math
import warnings

import pytest
import torch
from helpers import dense_ggn, make_data, make_model
from torch import nn

from curvlab.errors import CurvlabWarning, InvalidInputError, UnsupportedModelError

pytest.importorskip("curvlinops")
from curvlab.adapters.kfac import KFACEstimator, kronecker_factors
from curvlab.optim.kfac import KFAC
from curvlab.optim.kfac_factors import KFACFactors

TYPE2 = KFACFactors(fisher_type="type-2")  # the exact output Hessian

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # einops' torch.jit.script


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model, loss_fn, x, y):
    grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def linear_mse(n=20):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 4, generator=gen, dtype=torch.float64),
         torch.randn(n, 3, generator=gen, dtype=torch.float64))
        for _ in range(3)
    ]
    return model, nn.MSELoss(), batches


def natural_step(model, loss_fn, x, y, delta):
    """(F + delta I)^-1 g with the dense GGN (= Fisher for MSE)."""
    F = dense_ggn(model, loss_fn, x, y)
    g = flat_grad(model, loss_fn, x, y)
    return torch.linalg.solve(F + delta * torch.eye(F.shape[0], dtype=F.dtype), g)


def test_first_step_is_the_exact_damped_natural_gradient_step():
    # one Linear layer + MSE: KFAC (bias joined) is the exact GGN; the first step uses the
    # batch factors as they are (no decay applied yet)
    model, loss_fn, batches = linear_mse()
    x, y = batches[0]
    lr, delta = 0.5, 0.1
    expected = flat(model) - lr * natural_step(model, loss_fn, x, y, delta)
    opt = KFAC(model, loss_fn, lr=lr, damping=delta, factors=TYPE2)
    loss = opt.step((x, y))
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-13)
    assert loss.requires_grad is False and opt.steps == 1
    assert all(p.grad is None for p in model.parameters())


def test_an_injected_factor_source_in_closed_form():
    """Any callable computing {layer: (A, G)} replaces curvlinops: for one Linear layer and
    MSE, A = mean of [x, 1][x, 1]^T and G = (2 / C) I give the exact GGN, so the first step is
    the exact damped natural-gradient step, and the source sees the step's seed."""
    model, loss_fn, batches = linear_mse()
    x, y = batches[0]
    seeds = []

    def closed_form(module, loss, params, data, *, seed):
        seeds.append(seed)
        xs = torch.cat([b[0] for b in data])
        x1 = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], dim=1)
        C = data[0][1].shape[1]
        return {"": (x1.T @ x1 / xs.shape[0], 2.0 / C * torch.eye(C, dtype=xs.dtype))}

    expected = flat(model) - 0.5 * natural_step(model, loss_fn, x, y, 0.1)
    opt = KFAC(model, loss_fn, lr=0.5, damping=0.1, factors=closed_form, seed=3)
    opt.step((x, y))
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-13)
    assert seeds == [3] and opt.factor_source is closed_form


def test_deprecated_factor_keywords_equal_the_factor_object():
    trajectories = []
    for legacy in (False, True):
        torch.manual_seed(0)
        model = make_model("tanh_mlp")
        data = [make_data("tanh_mlp", seed=s) for s in range(3)]
        options = {"fisher_type": "mc", "mc_samples": 2, "kfac_approx": "reduce"}
        if legacy:
            with pytest.warns(DeprecationWarning, match=r"factors=KFACFactors\(fisher_type"):
                opt = KFAC(model, nn.CrossEntropyLoss(), lr=0.1, seed=4, **options)
        else:
            opt = KFAC(model, nn.CrossEntropyLoss(), lr=0.1, seed=4,
                       factors=KFACFactors(**options))
        for batch in data:
            opt.step(batch)
        trajectories.append(flat(model))
    assert torch.equal(*trajectories)


def test_damping_change_costs_no_factorization():
    # factors and eigendecompositions from step 0 only; the GGN of a linear model with MSE
    # does not depend on the weights, so every step is (F + delta_t I)^-1 g_t exactly
    model, loss_fn, batches = linear_mse()
    x, y = batches[0]
    schedule = [0.1, 0.02, 0.5]
    opt = KFAC(model, loss_fn, lr=0.3, damping=lambda t: schedule[t], factors=TYPE2,
               factor_update_every=10, inverse_update_every=10)
    for delta in schedule:
        expected = flat(model) - 0.3 * natural_step(model, loss_fn, x, y, delta)
        opt.step((x, y))
        assert torch.allclose(flat(model), expected, rtol=0, atol=1e-13)
        assert opt.param_groups[0]["damping"] == delta
        assert opt.n_factorizations == 2  # A and G, factorized once at step 0
    # a float damping set on the param group (what damper.attach does) is used likewise
    opt2 = KFAC(model, loss_fn, lr=0.3, damping=0.1, factors=TYPE2,
                inverse_update_every=10)
    opt2.step((x, y))
    opt2.param_groups[0]["damping"] = 0.7
    opt2.step((x, y))
    assert opt2.n_factorizations == 2


class Damper:
    """Duck-typed LinearShrinkageDamper: a cached ``damping`` and ``__call__(step)``."""

    def __init__(self):
        self.damping = 0.25
        self.calls = []

    def __call__(self, step):
        self.calls.append(step)
        return self.damping


def test_damper_object_is_read_every_step():
    model, loss_fn, batches = linear_mse()
    damper = Damper()
    opt = KFAC(model, loss_fn, lr=0.1, damping=damper, factors=TYPE2)
    opt.step(batches[0])
    damper.damping = 0.5
    before = flat(model)
    opt.step(batches[1])
    assert opt.param_groups[0]["damping"] == 0.5
    assert damper.calls == []  # the cached attribute is read; the callable is not needed
    # the update used damping 0.5: replay the same step with a float damping
    replay_model, _, _ = linear_mse()
    replay = KFAC(replay_model, loss_fn, lr=0.1, damping=0.25, factors=TYPE2)
    replay.step(batches[0])
    replay.param_groups[0]["damping"] = 0.5
    assert torch.equal(flat(replay_model), before)
    replay.step(batches[1])
    assert torch.equal(flat(replay_model), flat(model))


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_factor_averages_follow_the_decay(fisher_type):
    torch.manual_seed(0)
    model = make_model("tanh_mlp")
    loss_fn = nn.CrossEntropyLoss()
    data = [make_data("tanh_mlp", seed=s) for s in range(4)]
    decay, seed = 0.8, 5
    opt = KFAC(model, loss_fn, lr=0.1, damping=1e-2, factor_decay=decay, momentum=0.5,
               factors=fisher_type, seed=seed)  # a string: an alias of KFACFactors(...)
    expected = {}
    for t, (x, y) in enumerate(data):
        snapshot = copy.deepcopy(model)
        fresh = kronecker_factors(snapshot, loss_fn, list(snapshot.parameters()), [(x, y)],
                                  fisher_type=fisher_type, seed=seed + t).factors
        for layer, (A, G) in fresh.items():
            if layer in expected:
                A0, G0 = expected[layer]
                A, G = decay * A0 + (1 - decay) * A, decay * G0 + (1 - decay) * G
            expected[layer] = (A, G)
        opt.step((x, y))
    got = opt.factors()
    assert set(got) == {"0", "2"}
    for layer, (A, G) in expected.items():
        assert torch.allclose(got[layer][0], A, rtol=1e-13, atol=0)
        assert torch.allclose(got[layer][1], G, rtol=1e-13, atol=0)
    assert opt.n_factorizations == 4 * len(data)


def test_heuristic_damping_step_equals_the_adapter_formula():
    model = make_model("cnn")
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data("cnn")
    est = KFACEstimator(copy.deepcopy(model), loss_fn, (x, y), "ggn")
    g = flat_grad(model, loss_fn, x, y)
    expected = flat(model) - 0.2 * est.solve(g, 0.03, heuristic=True)
    opt = KFAC(model, loss_fn, lr=0.2, damping=0.03, heuristic_damping=True, factors=TYPE2)
    opt.step((x, y))
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-12)


def test_kl_clipping_scales_the_step():
    model, loss_fn, batches = linear_mse()
    x, y = batches[0]
    lr, delta, kl_clip = 0.5, 0.1, 1e-4
    d = natural_step(model, loss_fn, x, y, delta)
    g = flat_grad(model, loss_fn, x, y)
    nu = min(1.0, math.sqrt(kl_clip / abs(lr**2 * float(d @ g))))
    assert nu < 1
    expected = flat(model) - lr * nu * d
    opt = KFAC(model, loss_fn, lr=lr, damping=delta, kl_clip=kl_clip, factors=TYPE2)
    opt.step((x, y))
    assert torch.allclose(flat(model), expected, rtol=0, atol=1e-13)


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.scale * self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


def test_unsupported_parameters_get_sgd_and_one_warning():
    torch.manual_seed(0)
    model = ScaledNet().double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data("cnn")
    reference = copy.deepcopy(model)
    names = [n for n, _ in reference.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss_fn(reference(x), y),
                                                list(reference.parameters()))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = KFAC(model, loss_fn, lr=0.1, damping=1e-2, weight_decay=1e-2)
        opt.step((x, y))
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step((x, y))
    ours = [w for w in caught if issubclass(w.category, CurvlabWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    for name in ("scale (ScaledNet)", "norm.weight (BatchNorm2d)", "norm.bias (BatchNorm2d)"):
        assert name in message
    assert "conv" not in message and "fc" not in message
    # their first step is plain SGD with weight decay
    ref = dict(reference.named_parameters())
    for name in ("scale", "norm.weight", "norm.bias"):
        expected = ref[name] - 0.1 * (grads[name] + 1e-2 * ref[name])
        assert torch.allclose(params[name], expected, rtol=0, atol=1e-14)
    # BatchNorm saw one forward pass per step: the factor computation restores its statistics
    assert model.norm.num_batches_tracked.item() == 2


def make_run(state=None):
    torch.manual_seed(0)
    model = make_model("cnn")
    opt = KFAC(model, nn.CrossEntropyLoss(), lr=0.2, damping=lambda t: 1e-2 / (1 + t),
               momentum=0.9, weight_decay=1e-3, kl_clip=1e-2, factor_update_every=2,
               inverse_update_every=3, factors=KFACFactors(fisher_type="mc"), seed=7)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    return model, opt


def test_state_dict_round_trip_reproduces_training_bitwise():
    data = [make_data("cnn", seed=s % 3) for s in range(9)]
    model, opt = make_run()
    for batch in data[:4]:
        opt.step(batch)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    losses = [opt.step(batch).item() for batch in data[4:]]
    resumed_model, resumed = make_run(saved)
    assert resumed.steps == 4
    assert [resumed.step(batch).item() for batch in data[4:]] == losses
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for (a1, g1), (a2, g2) in zip(opt.factors().values(), resumed.factors().values()):
        assert torch.equal(a1, a2) and torch.equal(g1, g2)
    # a run without the round trip from a fresh start differs (the test can fail)
    other_model, other = make_run()
    for batch in data[4:]:
        other.step(batch)
    assert not torch.equal(flat(other_model), flat(model))


def test_non_finite_loss_leaves_everything_unchanged():
    model, loss_fn, batches = linear_mse()
    opt = KFAC(model, loss_fn, lr=0.1, damping=0.1, momentum=0.9)
    opt.step(batches[0])
    before = flat(model)
    state = copy.deepcopy(opt.state_dict())
    x, y = batches[1]
    bad = x.clone()
    bad[0, 0] = float("nan")
    for batch in ((bad, y), (x, torch.full_like(y, float("inf")))):
        with pytest.warns(CurvlabWarning, match="skipped a step"):
            loss = opt.step(batch)
        assert not torch.isfinite(loss)
        assert torch.equal(flat(model), before)
        assert opt.steps == 1
        after = opt.state_dict()
        for key, value in state["state"][0].items():
            got = after["state"][0][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


def test_skipped_step_leaves_batchnorm_statistics_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    with pytest.warns(CurvlabWarning, match="plain SGD"):
        opt = KFAC(model, nn.MSELoss(), lr=0.1, damping=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen)
    y = torch.randn(16, 2, dtype=torch.float64, generator=gen)
    opt.step((x, y))
    buffers = [b.clone() for b in model.buffers()]
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(CurvlabWarning, match="skipped a step"):
        opt.step((bad, y))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))


def test_invalid_arguments():
    model, loss_fn, _ = linear_mse()
    with pytest.raises(InvalidInputError):
        KFAC(model, nn.L1Loss())
    with pytest.raises(InvalidInputError):
        KFAC(model, loss_fn, damping=0.0)
    with pytest.raises(InvalidInputError):
        KFAC(model, loss_fn, factor_decay=1.0)
    with pytest.raises(InvalidInputError, match="fisher_type"):
        KFACFactors(fisher_type="kfac")
    with pytest.raises(InvalidInputError, match="factors"):
        KFAC(model, loss_fn, factors="kfac")
    with pytest.raises(InvalidInputError, match="factor source"):
        KFAC(model, loss_fn, factors=3)
    with pytest.raises(InvalidInputError, match="once"), pytest.warns(DeprecationWarning):
        KFAC(model, loss_fn, factors=TYPE2, mc_samples=2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        KFAC(model, loss_fn, fisher="mc")
    opt = KFAC(model, loss_fn)
    with pytest.raises(InvalidInputError, match=r"opt.step\(\(x, y\)\)"):
        opt.step()  # type: ignore[call-arg]


def test_works_with_lr_schedulers():
    model, loss_fn, batches = linear_mse()
    opt = KFAC(model, loss_fn, lr=0.2, damping=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in batches:
        opt.step(batch)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**3)


# ---------------------------------------------------------------------- the usual loop
HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hook_count(*modules):
    return sum(len(getattr(m, t)) for top in modules for m in top.modules() for t in HOOK_TABLES)


class DropoutCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.conv(x))).flatten(1))


def kfac_run(fisher_type):
    torch.manual_seed(0)
    model = DropoutCNN().double()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn, lr=0.2, damping=lambda t: 1e-2 / (1 + t), momentum=0.9,
               weight_decay=1e-3, kl_clip=1e-2, factor_update_every=2, inverse_update_every=3,
               factors=KFACFactors(fisher_type=fisher_type), seed=7)
    return model, loss_fn, opt


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_usual_loop_gives_the_batch_steps_trajectory_bitwise(fisher_type):
    data = [make_data("cnn", seed=s % 3) for s in range(7)]
    model_b, _, by_batch = kfac_run(fisher_type)
    model_u, loss_fn_u, usual = kfac_run(fisher_type)
    torch.manual_seed(11)  # dropout masks of the training forward passes: the same draws
    for batch in data:
        by_batch.step(batch)
    torch.manual_seed(11)
    for x, y in data:
        usual.zero_grad()
        loss_fn_u(model_u(x), y).backward()
        grads = [p.grad.clone() for p in model_u.parameters()]
        assert hook_count(model_u, loss_fn_u) == 2  # recording x and y until the step
        assert usual.step() is None
        assert hook_count(model_u, loss_fn_u) == 0  # removed by the step
        assert all(torch.equal(p.grad, g) for p, g in zip(model_u.parameters(), grads))
    for p, q in zip(model_b.parameters(), model_u.parameters()):
        assert torch.equal(p, q)
    for (a1, g1), (a2, g2) in zip(by_batch.factors().values(), usual.factors().values()):
        assert torch.equal(a1, a2) and torch.equal(g1, g2)
    assert usual.steps == by_batch.steps == len(data)
    assert hook_count(model_u, loss_fn_u) == 0
    # the factors' pass drew its dropout masks from seed + step, not from the global RNG:
    # the same seed reproduces the run, and the trajectory moved (the test can fail)
    model_r, _, rerun = kfac_run(fisher_type)
    torch.manual_seed(11)
    for batch in data:
        rerun.step(batch)
    assert all(torch.equal(p, q) for p, q in zip(model_r.parameters(), model_b.parameters()))
    assert not torch.equal(flat(model_b), flat(kfac_run(fisher_type)[0]))


def test_closure_and_gradient_accumulation():
    model, loss_fn, batches = linear_mse()
    x, y = batches[0]
    reference, _, _ = linear_mse()
    ref = KFAC(reference, loss_fn, lr=0.3, damping=0.1, factors=TYPE2)
    ref.step((x, y))
    # a closure: the same step, and the closure's loss is returned
    closed_model, _, _ = linear_mse()
    closed = KFAC(closed_model, loss_fn, lr=0.3, damping=0.1, factors=TYPE2)

    def closure():
        closed.zero_grad()
        loss = loss_fn(closed_model(x), y)
        loss.backward()
        return loss

    loss = closed.step(closure)
    assert torch.equal(loss, loss_fn(linear_mse()[0](x), y))  # the loss before the step
    assert torch.equal(flat(closed_model), flat(reference))
    # two half batches accumulated before one step: the factors average all 20 samples and
    # the gradient is the full batch's, so the step equals the full-batch step (float64)
    opt = KFAC(model, loss_fn, lr=0.3, damping=0.1, factors=TYPE2)
    opt.zero_grad()
    for half in (slice(0, 10), slice(10, 20)):
        (loss_fn(model(x[half]), y[half]) / 2).backward()
    opt.step()
    assert torch.allclose(flat(model), flat(reference), rtol=0, atol=1e-13)
    for (a1, g1), (a2, g2) in zip(opt.factors().values(), ref.factors().values()):
        assert torch.allclose(a1, a2, rtol=1e-13, atol=0)
        assert torch.allclose(g1, g2, rtol=1e-13, atol=0)


def test_usual_loop_ignores_evaluation_passes_and_explains_misuse():
    model, loss_fn, batches = linear_mse()
    x, y = batches[0]
    opt = KFAC(model, loss_fn, lr=0.1, damping=0.1, factors=TYPE2)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    with torch.no_grad():
        loss_fn(model(batches[1][0]), batches[1][1])  # a validation pass is not recorded
    opt.step()
    assert opt.steps == 1 and hook_count(model, loss_fn) == 0
    # a step without zero_grad(): nothing was recorded for the factor update
    loss_fn(model(x), y).backward()
    with pytest.raises(InvalidInputError, match=r"opt.zero_grad\(\) before the forward"):
        opt.step()
    # the loss computed with another object than the loss_fn given to KFAC
    opt.zero_grad()
    nn.MSELoss()(model(x), y).backward()
    with pytest.raises(InvalidInputError, match="loss_fn given to KFAC"):
        opt.step()
    # two training forward passes for one loss do not pair up
    opt.zero_grad()
    model(x)
    loss_fn(model(x), y).backward()
    with pytest.raises(InvalidInputError, match="2 model calls and 1 loss calls"):
        opt.step()
    assert opt.steps == 1 and hook_count(model, loss_fn) == 0
    # a model called with keyword inputs
    opt.zero_grad()
    loss_fn(model(input=x), y).backward()
    with pytest.raises(InvalidInputError, match="one positional tensor input"):
        opt.step()


def test_batch_steps_leave_no_hooks():
    model, loss_fn, batches = linear_mse()
    opt = KFAC(model, loss_fn, lr=0.1, damping=0.1)
    assert hook_count(model, loss_fn) == 2  # armed for a usual loop's first forward pass
    opt.step(batches[0])
    assert hook_count(model, loss_fn) == 0


def test_accumulated_batches_under_train_mode_batchnorm_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    loss_fn = nn.MSELoss()
    with pytest.warns(CurvlabWarning, match="plain SGD"):
        opt = KFAC(model, loss_fn, lr=0.1, damping=0.1, factors=TYPE2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen)
    y = torch.randn(16, 2, dtype=torch.float64, generator=gen)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()  # one batch: its own statistics define the factors
    opt.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):
        loss_fn(model(x[half]), y[half]).backward()
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        opt.step()
