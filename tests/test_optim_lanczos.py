"""LanczosOPT (paper eq. 9) against dense eigendecompositions and damped Newton steps."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import dense_hessian, make_data, make_model
from torch import nn

import curvlab
from curvlab.damping import CurvlabUpdate, LinearShrinkageDamper
from curvlab.errors import CurvlabWarning, InvalidInputError
from curvlab.optim import Eigensolver, LanczosOPT
from curvlab.optim.lanczos_opt import lanczos_direction

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model, loss_fn, x, y):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=gen, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.5, 0.2], dtype=torch.float64
    )
    y = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    return model, x, y


def factory(model, loss_fn, x, y):
    return lambda: curvlab.estimator("autograd", model, loss_fn, (x, y))


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_full_rank_is_damped_newton_on_a_quadratic(damping):
    model, x, y = linear_regression()  # MSE loss: exactly quadratic in the parameters
    P = sum(p.numel() for p in model.parameters())
    H = dense_hessian(model, MSE, x, y)
    g = flat_grad(model, MSE, x, y)
    w0, lr = flat_params(model), 0.7
    expected = w0 - lr * torch.linalg.solve(H + damping * torch.eye(P, dtype=H.dtype), g)
    opt = LanczosOPT(model.parameters(), factory(model, MSE, x, y), lr=lr, damping=damping,
                     k=P, eta=1.0, eigensolver=Eigensolver(tol=1e-12))
    opt.step()
    err = (flat_params(model) - expected).norm() / (expected - w0).norm()
    assert err < 1e-10  # measured 7e-13 (P = 10: the Lanczos routine solves densely)


def dense_reference(H, g, k, damping, eta, negative):
    vals, vecs = torch.linalg.eigh(H)
    top = torch.argsort(vals, descending=True)[:k]
    lam, phi = vals[top], vecs[:, top]
    lam = lam.abs() if negative == "abs" else lam.clamp(min=0)
    c = phi.T @ g
    sharp = phi @ (c / (lam + damping)) / eta
    flat = (g - phi @ c) / damping
    return sharp + flat


@pytest.mark.parametrize(("k", "eta", "negative"), [(5, 1.0, "abs"), (5, 3.0, "abs"),
                                                    (8, 10.0, "clamp")])
def test_low_rank_step_matches_dense_formula(k, eta, negative):
    model, (x, y) = make_model("tanh_mlp"), make_data("tanh_mlp", n=32)
    H = dense_hessian(model, CE, x, y)
    g = flat_grad(model, CE, x, y)
    w0, lr, damping = flat_params(model), 0.05, 0.02
    expected = w0 - lr * dense_reference(H, g, k, damping, eta, negative)
    opt = LanczosOPT(model.parameters(), factory(model, CE, x, y), lr=lr, damping=damping,
                     k=k, eta=eta, negative=negative, eigensolver={"tol": 1e-10})
    opt.step()
    # Lanczos at tol 1e-10 gives eigenvectors to ~tol ||H|| / gap (gaps ~ 0.04 here); the
    # step error follows: measured 2e-11 to 3e-11 (3e-7 at tol 1e-6)
    err = (flat_params(model) - expected).norm() / (expected - w0).norm()
    assert err < 1e-8
    vals = torch.linalg.eigvalsh(H).flip(0)[:k]
    assert torch.allclose(opt.eigenvalues, vals, atol=1e-8)


def test_param_groups_in_another_order_than_the_estimator():
    model, (x, y) = make_model("tanh_mlp"), make_data("tanh_mlp", n=32)
    H = dense_hessian(model, CE, x, y)  # model order: layer 0 then layer 2
    g = flat_grad(model, CE, x, y)
    w0 = flat_params(model)
    expected = w0 - 0.05 * dense_reference(H, g, 5, 0.02, 2.0, "abs")
    groups = [{"params": list(model[2].parameters())}, {"params": list(model[0].parameters())}]
    opt = LanczosOPT(groups, factory(model, CE, x, y), lr=0.05, damping=0.02, k=5, eta=2.0,
                     eigensolver=Eigensolver(tol=1e-10))
    opt.step()
    err = (flat_params(model) - expected).norm() / (expected - w0).norm()
    assert err < 1e-8


def test_negative_eigenvalue_handling_in_formula():
    vectors = torch.eye(3, dtype=torch.float64)[:, :2]
    values = torch.tensor([2.0, -0.5], dtype=torch.float64)
    g = torch.ones(3, dtype=torch.float64)
    d_abs = lanczos_direction(g, values, vectors, 0.1, 1.0, "abs")
    d_clamp = lanczos_direction(g, values, vectors, 0.1, 1.0, "clamp")
    expected = torch.tensor([1 / 2.1, 1 / 0.6, 10.0], dtype=torch.float64)
    assert torch.allclose(d_abs, expected)
    assert torch.allclose(d_clamp, torch.tensor([1 / 2.1, 10.0, 10.0], dtype=torch.float64))


@pytest.mark.parametrize("form", ["estimator", "legacy_model", "legacy_factory"])
def test_estimator_object_and_deprecated_forms_equal_the_factory_path(form):
    """One estimator held across steps follows the parameters (it rebuilds its graphs), so
    it steps bitwise like a fresh estimator per refresh; the old keywords still work, with a
    DeprecationWarning naming the replacement."""
    results = []
    for current in ("factory", form):
        model, (x, y) = make_model("tanh_mlp"), make_data("tanh_mlp", n=32)
        legacy = {
            "legacy_model": {"model": model, "loss_fn": CE, "data": (x, y), "seed": 0},
            "legacy_factory": {"estimator_factory": factory(model, CE, x, y), "tol": 1e-6},
        }
        if current in legacy:
            with pytest.warns(DeprecationWarning, match=r"deprecated, use .*(estimator|Eigen)"):
                opt = LanczosOPT(model.parameters(), lr=0.1, damping=0.05, k=4, **legacy[current])
        else:
            curvature = (factory(model, CE, x, y) if current == "factory"
                         else curvlab.estimator("autograd", model, CE, (x, y)))
            opt = LanczosOPT(model.parameters(), curvature, lr=0.1, damping=0.05, k=4)
        for _ in range(3):
            flat_grad(model, CE, x, y)
            opt.step()
        results.append(flat_params(model))
    assert torch.equal(results[0], results[1])


def test_deprecated_curvature_name_and_estimator_options_build_that_estimator():
    model, (x, y) = make_model("tanh_mlp"), make_data("tanh_mlp", n=32)
    with pytest.warns(DeprecationWarning, match="curvature="):
        opt = LanczosOPT(model.parameters(), model=model, loss_fn=CE, data=(x, y),
                         curvature="ggn", estimator_options={"vectorize": False}, k=2)
    assert opt.curvature.curvature == "ggn" and opt.curvature.vectorize is False


def test_fitted_shrinkage_as_the_curvature():
    """A fitted shrinkage is an Operator: its eigenbasis is that of (1 - rho) H + rho tau I."""
    from curvlab.shrinkage import LedoitWolf

    model, (x, y) = make_model("tanh_mlp"), make_data("tanh_mlp", n=32)
    H = dense_hessian(model, CE, x, y)
    g = flat_grad(model, CE, x, y)
    fit = LedoitWolf(n_probes=8, seed=0).fit(curvlab.estimator("autograd", model, CE, (x, y)))
    assert 0 < fit.shrinkage_ < 1
    rho, tau = fit.shrinkage_, fit.target_scale_
    shrunk = (1 - rho) * H + rho * tau * torch.eye(H.shape[0], dtype=H.dtype)
    w0 = flat_params(model)
    expected = w0 - 0.05 * dense_reference(shrunk, g, 4, 0.02, 1.0, "abs")
    opt = LanczosOPT(model.parameters(), fit, lr=0.05, damping=0.02, k=4,
                     eigensolver=Eigensolver(tol=1e-10))
    opt.step()
    err = (flat_params(model) - expected).norm() / (expected - w0).norm()
    assert err < 1e-8


def test_a_custom_eigensolver_callable():
    """Any (operator, k, step) -> eigenpairs callable replaces Lanczos: here a dense eigh."""
    model, (x, y) = make_model("tanh_mlp"), make_data("tanh_mlp", n=32)
    H = dense_hessian(model, CE, x, y)
    g = flat_grad(model, CE, x, y)
    steps = []

    def dense_solver(op, k, step):
        steps.append(step)
        vals, vecs = torch.linalg.eigh(op.to_dense())
        return curvlab.Eigenpairs(vals.flip(0)[:k], vecs.flip(1)[:, :k],
                                  torch.zeros(k, dtype=vals.dtype), 0, True)

    w0 = flat_params(model)
    expected = w0 - 0.05 * dense_reference(H, g, 3, 0.02, 1.0, "abs")
    opt = LanczosOPT(model.parameters(), factory(model, CE, x, y), lr=0.05, damping=0.02, k=3,
                     eigensolver=dense_solver)
    opt.step()
    assert steps == [0]
    err = (flat_params(model) - expected).norm() / (expected - w0).norm()
    assert err < 1e-10


def train(model, opt, x, y, n, closure=False):
    for _ in range(n):
        if closure:
            def step_closure():
                opt.zero_grad()
                loss = CE(model(x), y)
                loss.backward()
                return loss

            opt.step(step_closure)
        else:
            flat_grad(model, CE, x, y)
            opt.step()


def build(model, x, y, damping):
    groups = [{"params": list(model[0].parameters())},
              {"params": list(model[2].parameters()), "lr": 0.05}]
    return LanczosOPT(groups, factory(model, CE, x, y), lr=0.1, damping=damping, k=4,
                      refresh_every=3, eta=2.0)


@pytest.mark.parametrize("damping", [0.05, lambda step: 0.1 / (1 + step)])
def test_state_dict_resume_is_bitwise(damping):
    x, y = make_data("tanh_mlp", n=32)
    model = make_model("tanh_mlp")
    train(model, build(model, x, y, damping), x, y, 8)
    straight = flat_params(model)

    first = make_model("tanh_mlp")
    opt = build(first, x, y, damping)
    train(first, opt, x, y, 4, closure=True)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed = make_model("tanh_mlp", seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = build(resumed, x, y, damping)
    opt2.load_state_dict(saved["opt"])
    assert opt2._global_state["step"] == 4
    assert torch.equal(opt2.eigenvectors, opt.eigenvectors)
    train(resumed, opt2, x, y, 4)
    assert torch.equal(flat_params(resumed), straight)


def test_refresh_schedule_and_damping_sources():
    x, y = make_data("tanh_mlp", n=32)
    model = make_model("tanh_mlp")
    calls = []
    est_factory = factory(model, CE, x, y)

    def counting_factory():
        calls.append(opt._global_state.get("step", 0))
        return est_factory()

    seen = []
    opt = LanczosOPT(model.parameters(), counting_factory, lr=0.1, k=3, refresh_every=2,
                     damping=lambda step: seen.append(step) or 0.1)
    train(model, opt, x, y, 5)
    assert calls == [0, 2, 4]
    assert seen == [0, 1, 2, 3, 4]
    assert opt.param_groups[0]["damping"] == 0.1

    damper = LinearShrinkageDamper(init=0.5, update_rule=CurvlabUpdate(ema=0.5, floor=0.0))
    opt = LanczosOPT(model.parameters(), est_factory, lr=0.1, k=3, damping=damper)
    train(model, opt, x, y, 1)
    assert opt.param_groups[0]["damping"] == 0.5
    damper.update(0, 0.1)  # a scripted estimate: 0.5 * 0.5 + 0.5 * 0.1
    train(model, opt, x, y, 1)
    assert opt.param_groups[0]["damping"] == pytest.approx(0.3)

    # or attached: the damper writes group["damping"], which the float-damping path reads
    opt = LanczosOPT(model.parameters(), est_factory, lr=0.1, k=3, damping=1.0)
    damper.attach(opt, key="damping")
    assert opt.param_groups[0]["damping"] == pytest.approx(0.3)
    before = flat_params(model)
    g = flat_grad(model, CE, x, y)
    opt.step()
    expected = lanczos_direction(g, opt.eigenvalues, opt.eigenvectors, 0.3, 1.0)
    assert torch.allclose(before - flat_params(model), 0.1 * expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad", ["grad", "loss"])
def test_non_finite_step_leaves_params_unchanged_and_warns(bad):
    x, y = make_data("tanh_mlp", n=32)
    model = make_model("tanh_mlp")
    opt = LanczosOPT(model.parameters(), factory(model, CE, x, y), lr=0.1, k=3)
    train(model, opt, x, y, 1)
    before, state_before = flat_params(model), dict(opt._global_state)

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        if bad == "grad":
            next(model.parameters()).grad[0, 0] = float("nan")
            return loss
        return loss * float("inf")

    with pytest.warns(CurvlabWarning, match="skipped"):
        opt.step(closure)
    assert torch.equal(flat_params(model), before)
    assert opt._global_state["step"] == state_before["step"] == 1


def test_bad_input_raises():
    x, y = make_data("tanh_mlp", n=32)
    model = make_model("tanh_mlp")
    other = make_model("tanh_mlp")
    with pytest.raises(InvalidInputError, match="needs the curvature"):
        LanczosOPT(model.parameters())
    with pytest.raises(InvalidInputError, match="names a kind of curvature"):
        LanczosOPT(model.parameters(), "hessian")
    with pytest.raises(TypeError, match="unexpected keyword"):
        LanczosOPT(model.parameters(), factory(model, CE, x, y), estimator=None)
    with pytest.raises(InvalidInputError, match="once"), pytest.warns(DeprecationWarning):
        LanczosOPT(model.parameters(), factory(model, CE, x, y), tol=1e-8,
                   eigensolver=Eigensolver())
    with pytest.raises(InvalidInputError, match="not fields of Eigensolver"):
        LanczosOPT(model.parameters(), factory(model, CE, x, y), eigensolver={"tolerance": 1})
    for bad, match in ((lambda: "H", "not an Operator"),
                       (lambda: curvlab.DenseOperator(torch.eye(3, dtype=torch.float64)),
                        "rows")):
        opt = LanczosOPT(model.parameters(), bad, k=2)
        flat_grad(model, CE, x, y)
        with pytest.raises(InvalidInputError, match=match):
            opt.step()
    with pytest.raises(InvalidInputError, match="exceeds"):
        LanczosOPT(model.parameters(), factory(model, CE, x, y), k=1000)
    with pytest.raises(InvalidInputError, match="damping"):
        LanczosOPT(model.parameters(), factory(model, CE, x, y), damping=0.0)
    opt = LanczosOPT(model.parameters(), factory(other, CE, x, y), k=2)
    flat_grad(model, CE, x, y)
    with pytest.raises(InvalidInputError, match="exactly the optimizer's parameters"):
        opt.step()
    groups = [{"params": list(model[0].parameters()), "damping": 0.1},
              {"params": list(model[2].parameters())}]
    opt = LanczosOPT(groups, factory(model, CE, x, y), k=2, damping=0.2)
    with pytest.raises(InvalidInputError, match="share one 'damping'"):
        opt.step()


def test_param_groups_are_fixed_after_construction():
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    est = curvlab.estimator("autograd", model, torch.nn.MSELoss(),
                            (x, torch.zeros(8, 2, dtype=torch.float64)))
    opt = LanczosOPT(model.parameters(), est, k=2)
    with pytest.raises(InvalidInputError, match="construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]})
