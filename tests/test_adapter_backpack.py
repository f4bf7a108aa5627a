"""The BackPACK adapter against dense torch.func references and the autograd backend."""

from __future__ import annotations

import pytest
import torch
from backpack import backpack, extend
from backpack.context import CTX
from backpack.extensions import DiagGGNExact
from helpers import (
    LOSSES,
    assert_state_equal,
    dense_curvature,
    dense_ggn,
    dense_hessian,
    make_data,
    make_model,
    model_state,
    per_sample_grads,
)
from torch import nn

import curvlab
from curvlab.adapters.backpack import BackpackEstimator
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError, UnsupportedModelError

F64 = torch.float64
EXACT = dict(rtol=1e-10, atol=1e-12)


class Residual(nn.Module):
    """A skip connection: BackPACK needs its converter (x + f(x) becomes a SumModule)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.act = nn.Tanh()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.act(self.inner(x)) + x)


def seq_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).to(F64)


def build(name: str) -> nn.Module:
    if name == "seq_cnn":
        return seq_cnn()
    if name == "residual":
        torch.manual_seed(0)
        return Residual().to(F64)
    return make_model(name)


def setup(name: str, target: str = "ce", n: int = 24):
    model = build(name)
    x, y = make_data("cnn" if name == "seq_cnn" else "tanh_mlp", n=n, target=target)
    return model, LOSSES[target](), x, y


def uneven(x, y):
    return [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]


def probes(n: int, k: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, k, dtype=F64, generator=torch.Generator().manual_seed(seed))


def bpe(model, loss_fn, data, curvature="ggn", **kw):
    return BackpackEstimator(model, loss_fn, data, curvature=curvature, **kw)


@pytest.mark.parametrize(
    "name,target",
    [("tanh_mlp", "ce"), ("relu_mlp", "mse"), ("seq_cnn", "ce"), ("residual", "mse")],
)
def test_ggn_products_diagonal_and_groups_match_dense(name, target):
    model, loss_fn, x, y = setup(name, target)
    est = curvlab.estimator("backpack", model, loss_fn, uneven(x, y), curvature="ggn")
    G = dense_ggn(model, loss_fn, x, y)
    V = probes(est.num_params)
    torch.testing.assert_close(est.matvec(V), G @ V, **EXACT)
    torch.testing.assert_close(est.diagonal(), G.diagonal(), **EXACT)
    ref = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature="ggn")
    v = V[:, 0]
    torch.testing.assert_close(est.group_matvecs(v, 1), ref.group_matvecs(v, 1), **EXACT)
    torch.testing.assert_close(est.group_matvecs(v, 5), ref.group_matvecs(v, 5), **EXACT)


class Aliased(nn.Module):
    """One head registered under two names and called once: not a tied weight."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.act = nn.Tanh()
        self.head = nn.Linear(5, 3)
        self.out = self.head

    def forward(self, x):
        return self.out(self.act(self.body(x)))


def test_a_module_registered_under_two_names_keeps_the_extensions():
    torch.manual_seed(0)
    model = Aliased().to(F64)
    x, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="ggn",
                            use_converter=False)
    assert {"diagonal", "kronecker_factors"} <= set(est.capabilities)
    torch.testing.assert_close(est.diagonal(), dense_ggn(model, loss_fn, x, y).diagonal(),
                               **EXACT)


@pytest.mark.parametrize("name,target", [("tanh_mlp", "ce"), ("seq_cnn", "mse")])
def test_hessian_products_and_diagonals_match_dense(name, target):
    model, loss_fn, x, y = setup(name, target)
    est = curvlab.estimator("backpack", model, loss_fn, uneven(x, y), curvature="hessian")
    H = dense_hessian(model, loss_fn, x, y)
    V = probes(est.num_params)
    torch.testing.assert_close(est.matvec(V), H @ V, **EXACT)
    torch.testing.assert_close(est.diagonal(), H.diagonal(), **EXACT)
    assert "group_matvecs" not in est.capabilities
    with pytest.raises(UnsupportedCapabilityError, match="autograd"):
        est.group_matvecs(torch.zeros(est.num_params, dtype=F64), 1)


@pytest.mark.parametrize("target", ["ce", "mse"])
def test_per_sample_quantities_match_dense_per_sample_references(target):
    model, loss_fn, x, y = setup("tanh_mlp", target)
    est = bpe(model, loss_fn, uneven(x, y))
    torch.testing.assert_close(
        est.per_sample_gradients(), per_sample_grads(model, loss_fn, x, y), **EXACT
    )
    ggn = est.per_sample_diagonal("ggn")
    hess = est.per_sample_diagonal("hessian")
    assert ggn.shape == hess.shape == (24, est.num_params)
    for i in (0, 13, 23):  # each row is the curvature of that sample's own loss l_i
        xi, yi = x[i : i + 1], y[i : i + 1]
        ggn_i, hess_i = dense_ggn(model, loss_fn, xi, yi), dense_hessian(model, loss_fn, xi, yi)
        torch.testing.assert_close(ggn[i], ggn_i.diagonal(), **EXACT)
        torch.testing.assert_close(hess[i], hess_i.diagonal(), **EXACT)
    torch.testing.assert_close(ggn.mean(0), dense_ggn(model, loss_fn, x, y).diagonal(), **EXACT)


def test_empirical_fisher_from_per_sample_gradients():
    model, loss_fn, x, y = setup("relu_mlp", "ce")
    est = bpe(model, loss_fn, uneven(x, y), curvature="ef")
    E = dense_curvature("ef", model, loss_fn, x, y)
    torch.testing.assert_close(est.to_dense(), E, **EXACT)
    torch.testing.assert_close(est.diagonal(), E.diagonal(), **EXACT)
    ref = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature="ef")
    v = torch.randn(est.num_params, dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(est.group_matvecs(v, 4), ref.group_matvecs(v, 4), **EXACT)


def test_bce_with_one_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 1)).to(F64)
    x, _ = make_data("tanh_mlp")
    y = (x[:, :1] > 0).to(F64)
    loss_fn = nn.BCEWithLogitsLoss()
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="fisher")
    torch.testing.assert_close(est.diagonal(), dense_ggn(model, loss_fn, x, y).diagonal(), **EXACT)


def test_monte_carlo_fisher_is_one_fixed_seeded_matrix():
    model, loss_fn, x, y = setup("tanh_mlp", "ce")
    kw = dict(curvature="fisher", fisher_type="mc", mc_samples=2, seed=5)
    rng = torch.get_rng_state()
    est = curvlab.estimator("backpack", model, loss_fn, uneven(x, y), **kw)
    F = est.to_dense()
    assert torch.equal(torch.get_rng_state(), rng)  # the user's global RNG is untouched
    torch.testing.assert_close(est.diagonal(), F.diagonal(), **EXACT)
    v = torch.randn(est.num_params, dtype=F64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(est.group_matvecs(v, 1).mean(0), F @ v, **EXACT)
    again = curvlab.estimator("backpack", model, loss_fn, uneven(x, y), **kw).to_dense()
    assert torch.equal(F, again)
    other = curvlab.estimator("backpack", model, loss_fn, uneven(x, y), **{**kw, "seed": 6})
    assert not torch.allclose(other.to_dense(), F)


def test_monte_carlo_diagonal_converges_to_exact():
    model, loss_fn, x, y = setup("tanh_mlp", "ce")
    est = bpe(model, loss_fn, (x, y), mc_samples=4000)
    exact = dense_ggn(model, loss_fn, x, y).diagonal()
    mc = est.per_sample_diagonal("ggn_mc").mean(0)
    # 4000 draws x 24 samples: relative MC error ~ 1%; 5% leaves a wide margin
    assert (mc - exact).norm() < 0.05 * exact.norm()


def test_kronecker_factors_exact_for_a_linear_layer_with_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(F64)
    _, loss_fn, x, y = setup("tanh_mlp", "mse")
    G = dense_ggn(model, loss_fn, x, y)
    est = bpe(model, loss_fn, uneven(x, y))
    # BackPACK builds MSELoss's summed output Hessian in float32 (torch.eye's default
    # dtype), so KFLR/KFRA carry float32 rounding even for float64 models
    close = dict(rtol=1e-6, atol=1e-9)
    for kind in ("kflr", "kfra"):
        factors = est.kronecker_factors(kind)
        assert set(factors) == {"0.weight", "0.bias"}
        g, a = factors["0.weight"]
        torch.testing.assert_close(torch.kron(g, a), G[:15, :15], **close)
        torch.testing.assert_close(factors["0.bias"][0], G[15:, 15:], **close)
    g, a = est.kronecker_factors("kfac")["0.weight"]  # one MC draw: right shapes, PSD
    assert g.shape == (3, 3) and a.shape == (5, 5)
    assert torch.linalg.eigvalsh(g).min() > -1e-12
    with pytest.raises(InvalidInputError, match="kfac"):
        est.kronecker_factors("shampoo")


def test_frozen_layer_and_buffer_without_converter():
    model = make_model("buffer_frozen")
    x, y = make_data("buffer_frozen")
    loss_fn = nn.CrossEntropyLoss()
    # the buffer product x * scale happens before the first module, so BackPACK's
    # module hooks see every operation that matters: the user may skip the converter
    est = bpe(model, loss_fn, (x, y), use_converter=False)
    G = dense_ggn(model, loss_fn, x, y)
    torch.testing.assert_close(est.to_dense(), G, **EXACT)
    torch.testing.assert_close(est.diagonal(), G.diagonal(), **EXACT)
    assert est.num_params == G.shape[0]


def test_follows_parameter_updates_and_never_touches_the_model():
    model, loss_fn, x, y = setup("tanh_mlp", "ce")
    handles = len(CTX.hook_handles)
    before = model_state(model)
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="ggn")
    est.diagonal()
    est.per_sample_gradients()
    est.kronecker_factors("kflr")
    V = probes(est.num_params)
    est.matvec(V)
    assert_state_equal(before, model_state(model))
    assert len(CTX.hook_handles) == handles
    with torch.no_grad():  # an optimizer step on the user's model
        for p in model.parameters():
            p.mul_(0.5)
    G = dense_ggn(model, loss_fn, x, y)
    torch.testing.assert_close(est.matvec(V), G @ V, **EXACT)
    torch.testing.assert_close(est.diagonal(), G.diagonal(), **EXACT)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_user_extended_model_and_global_hook_removal_do_not_interfere():
    model, loss_fn, x, y = setup("tanh_mlp", "ce")
    G = dense_ggn(model, loss_fn, x, y)  # torch.func cannot run through BackPACK's hooks
    ext_model, ext_loss = extend(model), extend(nn.CrossEntropyLoss())
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="ggn")
    with backpack(DiagGGNExact()):  # the user's own BackPACK pass, active around ours
        loss = ext_loss(ext_model(x), y)
        torch.testing.assert_close(est.diagonal(), G.diagonal(), **EXACT)
        V = probes(est.num_params)
        torch.testing.assert_close(est.matvec(V), G @ V, **EXACT)
        loss.backward()
    theirs = torch.cat([p.diag_ggn_exact.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(theirs, G.diagonal(), **EXACT)
    CTX.remove_hooks()  # the user tears down every BackPACK hook they know of
    torch.testing.assert_close(est.diagonal(), G.diagonal(), **EXACT)


def test_unsupported_layers_refuse_extensions_naming_the_module_but_products_work():
    x, y = make_data("tanh_mlp")
    loss_fn = nn.CrossEntropyLoss()
    norm = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(F64)
    est = curvlab.estimator("backpack", norm, loss_fn, (x, y), curvature="ggn")
    G = dense_ggn(norm, loss_fn, x, y)
    torch.testing.assert_close(est.to_dense(), G, **EXACT)  # products need no extension
    assert "per_sample_diagonal" not in est.capabilities
    with pytest.raises(UnsupportedModelError, match=r"LayerNorm.*autograd"):
        est.per_sample_diagonal("ggn")
    torch.testing.assert_close(est.diagonal(), G.diagonal(), **EXACT)  # from identity columns
    cnn = make_model("cnn")  # torch.tanh inside forward: the converter cannot see it
    xc, yc = make_data("cnn")
    est = curvlab.estimator("backpack", cnn, loss_fn, (xc, yc), curvature="ggn")
    with pytest.raises(UnsupportedModelError, match="tanh"):
        est.per_sample_gradients()
    G = dense_ggn(cnn, loss_fn, xc, yc)
    torch.testing.assert_close(est.to_dense(), G, **EXACT)
    scaled = make_model("buffer_frozen")
    est = curvlab.estimator("backpack", scaled, loss_fn, (x, y), curvature="ggn")
    with pytest.raises(UnsupportedModelError, match="converter"):  # x * buffer
        est.kronecker_factors("kflr")
    torch.manual_seed(0)
    model = Residual().to(F64)  # BackPACK's Hessian extensions have no rule for a sum
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="hessian")
    assert "diagonal" not in est.capabilities
    with pytest.raises(UnsupportedModelError, match="SumModule"):
        est.per_sample_diagonal("hessian")
    torch.testing.assert_close(est.to_dense(), dense_hessian(model, loss_fn, x, y), **EXACT)


def test_batchnorm_train_mode_products_work_extensions_refuse():
    x, y = make_data("tanh_mlp")
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="ggn")
    before = model_state(model)
    torch.testing.assert_close(est.to_dense(), dense_ggn(model, loss_fn, x, y), **EXACT)
    assert_state_equal(before, model_state(model))  # the running statistics stay as they were
    assert "diagonal" not in est.capabilities and "group_matvecs" not in est.capabilities
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm.*eval"):
        est.per_sample_gradients()
    model.eval()  # the estimator follows the user's mode
    assert "diagonal" in est.capabilities
    torch.testing.assert_close(est.diagonal(), dense_ggn(model, loss_fn, x, y).diagonal(), **EXACT)
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):  # KFAC has no rule for it
        est.kronecker_factors("kflr")
    model.train()
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        est.per_sample_diagonal("ggn")


def test_unsupported_losses_raise():
    model, _, x, y = setup("tanh_mlp", "ce")
    with pytest.raises(UnsupportedModelError, match=r"CrossEntropyLoss.*autograd"):
        curvlab.estimator("backpack", model, lambda o, t: nn.functional.cross_entropy(o, t), (x, y))
    with pytest.raises(UnsupportedModelError, match="label smoothing"):
        curvlab.estimator("backpack", model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y))
    with pytest.raises(InvalidInputError, match="reduction"):
        curvlab.estimator("backpack", model, nn.CrossEntropyLoss(reduction="sum"), (x, y))
    yb = torch.zeros(24, 3, dtype=F64)
    with pytest.raises(UnsupportedModelError, match="one output per sample"):
        curvlab.estimator("backpack", model, nn.BCEWithLogitsLoss(), (x, yb), curvature="ggn")
    est = bpe(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(InvalidInputError, match="ggn_mc"):
        est.per_sample_diagonal("fisher")
    with pytest.raises(InvalidInputError, match="fisher_type"):
        bpe(model, nn.CrossEntropyLoss(), (x, y), curvature="fisher", fisher_type="empirical")
