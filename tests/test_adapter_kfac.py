"""The kfac backend (curvlinops KFAC/EKFAC) against dense references and curvlinops itself."""

import copy
import math

import pytest
import torch
from helpers import (
    LOSSES,
    assert_state_equal,
    dense_ef,
    dense_ggn,
    make_data,
    make_model,
    model_state,
)
from torch import nn

import curvlab
from curvlab.adapters.kfac import KFACEstimator, kronecker_factors
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError, UnsupportedModelError

curvlinops = pytest.importorskip("curvlinops")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # einops' torch.jit.script


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def probe(n, k=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n,) if k is None else (n, k), generator=gen, dtype=torch.float64)


def linear_mse(n=20, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return model, nn.MSELoss(), x, y


def block_eye(n, dtype=torch.float64):
    return torch.eye(n, dtype=dtype)


# ---------------------------------------------------------------------- where KFAC is exact
@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
def test_exact_for_single_linear_layer_with_mse(curvature, approximation):
    # GGN = (1/N) sum_n [x_n;1][x_n;1]^T (x) (2/C) I: one Kronecker product (MSE mean over N*C)
    model, loss_fn, x, y = linear_mse()
    est = curvlab.estimator(
        "kfac", model, loss_fn, (x, y), curvature=curvature, approximation=approximation
    )
    dense = dense_ggn(model, loss_fn, x, y)
    assert rel_err(est.to_dense(), dense) < 1e-12
    V = probe(est.num_params, 3)
    assert rel_err(est.matvec(V), dense @ V) < 1e-12
    assert rel_err(est.matvec(V[:, 0]), dense @ V[:, 0]) < 1e-12


@pytest.mark.parametrize("target", ["mse", "bce", "ce"])
def test_empirical_fisher_exact_for_one_sample(target):
    # with N = 1, g g^T = (a a^T) (x) (s s^T) exactly; also checks curvlab's EF scale
    model = nn.Linear(5, 3).double()
    x, y = make_data("tanh_mlp", n=1, target=target)
    loss_fn = LOSSES[target]()
    est = curvlab.estimator("kfac", model, loss_fn, (x, y), curvature="ef")
    assert rel_err(est.to_dense(), dense_ef(model, loss_fn, x, y)) < 1e-12


def test_monte_carlo_fisher_is_seeded_and_converges_to_type2():
    model, loss_fn, x, y = linear_mse(n=40)
    exact = KFACEstimator(model, loss_fn, (x, y), "fisher").to_dense()

    def mc(seed):
        return KFACEstimator(
            model, loss_fn, (x, y), "fisher", fisher_type="mc", mc_samples=100, seed=seed
        ).to_dense()

    K = mc(3)
    assert torch.equal(K, mc(3))
    assert not torch.equal(K, mc(4))
    # G is a mean of 4000 outer products of Gaussian draws: relative error ~ sqrt(3/4000)
    assert rel_err(K, exact) < 0.1


def test_matvec_equals_curvlinops_and_batches_average():
    model = make_model("cnn")
    x, y = make_data("cnn", n=24)
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("kfac", model, loss_fn, (x, y), curvature="ggn")
    op = curvlinops.KFACLinearOperator(
        model, loss_fn, list(model.parameters()), [(x, y)], fisher_type="type-2",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    V = probe(est.num_params, 2)
    assert rel_err(est.matvec(V), op @ V) < 1e-13
    reduce = KFACEstimator(model, loss_fn, (x, y), "ggn", kfac_approx="reduce")
    op = curvlinops.KFACLinearOperator(
        model, loss_fn, list(model.parameters()), [(x, y)], fisher_type="type-2",
        separate_weight_and_bias=False, check_deterministic=False, kfac_approx="reduce",
    )
    assert rel_err(reduce.matvec(V), op @ V) < 1e-13
    assert rel_err(reduce.matvec(V), est.matvec(V)) > 1e-3  # a different approximation
    # A and G are averages over all samples: two batches give the same KFAC as one
    split = curvlab.estimator("kfac", model, loss_fn, [(x[:10], y[:10]), (x[10:], y[10:])], "ggn")
    assert rel_err(split.matvec(V), est.matvec(V)) < 1e-12


def test_ekfac_eigenvalues_are_the_ggn_in_the_kfac_eigenbasis():
    # EKFAC keeps Q = Q_G (x) Q_A and sets its eigenvalues to diag(Q^T F_layer Q) (type-2)
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    loss_fn = nn.CrossEntropyLoss()
    est = KFACEstimator(
        model, loss_fn, (x, y), "ggn", approximation="ekfac", separate_weight_and_bias=True
    )
    dense = dense_ggn(model, loss_fn, x, y)
    eig = est.eigendecompositions()
    start = 0
    for name, p in model.named_parameters():
        layer, kind = name.split(".")
        e = eig[layer]
        n = p.numel()
        F = dense[start : start + n, start : start + n]
        Q = torch.kron(e.evecs_G, e.evecs_A) if kind == "weight" else e.evecs_G
        expected = torch.diagonal(Q.T @ F @ Q).reshape(p.shape[0], -1)
        assert rel_err(e.corrected[kind], expected) < 1e-10
        start += n
    K = est.to_dense()
    assert (K - K.T).abs().max() < 1e-14
    assert torch.linalg.eigvalsh(K).min() > -1e-14
    # EKFAC is at least as close as KFAC to the GGN's layer blocks (Frobenius-optimal)
    kfac = KFACEstimator(model, loss_fn, (x, y), "ggn", separate_weight_and_bias=True).to_dense()
    mask = (K != 0) | (kfac != 0)
    assert (K - dense)[mask].norm() <= (kfac - dense)[mask].norm()


# ---------------------------------------------------------------------- spectra from factors
CASES = [
    ("tanh_mlp", "ce", "kfac", False),
    ("cnn", "mse", "kfac", False),
    ("cnn", "ce", "ekfac", False),
    ("buffer_frozen", "bce", "kfac", True),
    ("tanh_mlp", "mse", "ekfac", True),
]


@pytest.mark.parametrize(("name", "target", "approximation", "separate"), CASES)
def test_spectrum_trace_logdet_diagonal_from_factors(name, target, approximation, separate):
    model = make_model(name)
    x, y = make_data(name, target=target)
    est = KFACEstimator(
        model, LOSSES[target](), (x, y), "ggn",
        approximation=approximation, separate_weight_and_bias=separate,
    )
    K = est.to_dense()
    evals = torch.linalg.eigvalsh((K + K.T) / 2)
    scale = evals.abs().max()
    assert (est.kfac_eigenvalues() - evals).abs().max() < 1e-12 * scale
    assert math.isclose(est.kfac_trace(), float(torch.trace(K)), rel_tol=1e-12)
    eye = torch.eye(est.num_params, dtype=K.dtype)
    for delta in (1e-3, 0.1):
        assert math.isclose(
            est.kfac_logdet(delta), float(torch.linalg.slogdet(K + delta * eye)[1]), rel_tol=1e-10
        )
    assert (est.diagonal() - K.diagonal()).abs().max() < 1e-14 * scale
    assert est.kfac_logdet() < est.kfac_logdet(1e-3)


@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn"])
def test_exact_damped_inverse(name, approximation):
    model = make_model(name)
    x, y = make_data(name)
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn", approximation=approximation)
    K = est.to_dense()
    V = probe(est.num_params, 3)
    for delta in (1e-4, 1e-2, 1.0):
        expected = torch.linalg.solve(K + delta * torch.eye(est.num_params, dtype=K.dtype), V)
        assert rel_err(est.solve(V, delta), expected) < 1e-9
        assert rel_err(est.solve(V[:, 1], delta), expected[:, 1]) < 1e-9
    # and curvlinops' own exact-damping inverse agrees
    cls = {"kfac": curvlinops.KFACLinearOperator, "ekfac": curvlinops.EKFACLinearOperator}[
        approximation
    ]
    op = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
             fisher_type="type-2", separate_weight_and_bias=False, check_deterministic=False)
    inv = curvlinops.KFACInverseLinearOperator(op, damping=1e-2, use_exact_damping=True)
    assert rel_err(est.solve(V, 1e-2), inv @ V) < 1e-10


def test_heuristic_damping_equals_kronecker_formula():
    # separate blocks, weights only in layer 0: the dense preconditioner is block diagonal
    # [inv(G0 + s/pi0) (x) inv(A0 + pi0 s), inv(G2 + s/pi2) (x) inv(A2 + pi2 s), inv(G2 + d)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = make_data("tanh_mlp")
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn", separate_weight_and_bias=True)
    delta, s = 0.05, math.sqrt(0.05)
    f = est.factors()
    blocks = []
    for layer in ("0", "2"):
        A, G = f[layer]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        inv_G = torch.linalg.inv(G + s / pi * block_eye(G.shape[0]))
        inv_A = torch.linalg.inv(A + pi * s * block_eye(A.shape[0]))
        blocks.append(torch.kron(inv_G, inv_A))
    G2 = f["2"][1]
    blocks.append(torch.linalg.inv(G2 + delta * block_eye(G2.shape[0])))
    dense_inv = torch.block_diag(*blocks)
    V = probe(est.num_params, 2)
    assert rel_err(est.solve(V, delta, heuristic=True), dense_inv @ V) < 1e-10


def test_heuristic_damping_matches_curvlinops_joint_blocks():
    model = make_model("cnn")
    x, y = make_data("cnn")
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn")
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)], fisher_type="type-2",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    V = probe(est.num_params, 2)
    for delta in (1e-3, 0.3):
        inv = curvlinops.KFACInverseLinearOperator(op, damping=delta, use_heuristic_damping=True)
        assert rel_err(est.solve(V, delta, heuristic=True), inv @ V) < 1e-9


def test_damping_change_reuses_the_eigendecompositions():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn")
    assert est.n_factorizations == 0
    v = probe(est.num_params)
    first = est.solve(v, 1e-3)
    assert est.n_factorizations == 4  # A and G of two layers
    second = est.solve(v, 1e-1)
    est.solve(v, 0.3, heuristic=True)
    est.kfac_logdet(2.0)
    est.kfac_eigenvalues()
    assert est.n_factorizations == 4
    assert not torch.allclose(first, second)
    # eigendecompositions reconstruct the factors
    for layer, (A, G) in est.factors().items():
        e = est.eigendecompositions()[layer]
        assert rel_err(e.evecs_A @ torch.diag(e.evals_A) @ e.evecs_A.T, A) < 1e-12
        assert rel_err(e.evecs_G @ torch.diag(e.evals_G) @ e.evecs_G.T, G) < 1e-12
    assert est.factors()["0"][0].shape == (6, 6)  # 5 inputs + bias
    # an in-place parameter update invalidates factors and eigendecompositions
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    third = est.solve(v, 1e-1)
    assert est.n_factorizations == 8
    assert not torch.allclose(second, third)
    fresh = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn").solve(v, 1e-1)
    assert torch.allclose(third, fresh, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- errors and isolation
def test_batchnorm_parameters_are_refused_with_the_module_named():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x, y = make_data("tanh_mlp")
    with pytest.raises(UnsupportedModelError, match=r"1\.weight \(BatchNorm1d\).*'autograd'"):
        curvlab.estimator("kfac", model, nn.CrossEntropyLoss(), (x, y), curvature="ggn")
    # without them (frozen or excluded) the model is fine
    params = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    est = curvlab.estimator("kfac", model.eval(), nn.CrossEntropyLoss(), (x, y), "ggn", params)
    assert est.num_params == 24 + 15


@pytest.mark.parametrize(
    "loss_fn",
    [nn.L1Loss(), nn.CrossEntropyLoss(label_smoothing=0.1), nn.NLLLoss()],
)
def test_unsupported_losses(loss_fn):
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", target="mse" if isinstance(loss_fn, nn.L1Loss) else "ce")
    with pytest.raises(UnsupportedModelError, match="autograd"):
        curvlab.estimator("kfac", model, loss_fn, (x, y), curvature="ggn")


def test_invalid_options():
    model, loss_fn, x, y = linear_mse()
    with pytest.raises(UnsupportedCapabilityError):
        curvlab.estimator("kfac", model, loss_fn, (x, y), curvature="hessian")
    with pytest.raises(InvalidInputError, match="reduction"):
        curvlab.estimator("kfac", model, nn.MSELoss(reduction="sum"), (x, y), "ggn")
    with pytest.raises(InvalidInputError, match="curvature='fisher'"):
        curvlab.estimator("kfac", model, loss_fn, (x, y), "ggn", fisher_type="mc")
    with pytest.raises(InvalidInputError):
        curvlab.estimator("kfac", model, loss_fn, (x, y), "ggn", approximation="shampoo")
    est = curvlab.estimator("kfac", model, loss_fn, (x, y), "ggn", approximation="ekfac")
    with pytest.raises(UnsupportedCapabilityError, match="heuristic=False"):
        est.solve(probe(est.num_params), 0.1, heuristic=True)
    with pytest.raises(InvalidInputError):
        est.solve(probe(est.num_params), -1.0)


class SequenceHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        return self.fc(x).reshape(x.shape[0], 3, 2)


def test_failure_inside_curvlinops_leaves_no_hooks():
    model = SequenceHead().double()
    x, _ = make_data("tanh_mlp")
    y = torch.randint(0, 3, (x.shape[0], 2))
    before = model_state(model)
    with pytest.raises(UnsupportedModelError, match="outputs"):
        KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn", approximation="ekfac")
    assert_state_equal(before, model_state(model))


@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
def test_model_left_as_found(approximation):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    model.train()
    model[2].register_forward_hook(lambda *args: None)  # the user's own hook stays
    x, y = make_data("tanh_mlp")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = model_state(model)
    untouched = copy.deepcopy(model)
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "fisher",
                        approximation=approximation, fisher_type="mc")
    v = probe(est.num_params)
    est.matvec(v)
    est.solve(v, 0.1)
    est.diagonal()
    assert_state_equal(before, model_state(model))  # hooks, mode, BN statistics, .grad
    # a plain training step gives bitwise the gradients of an untouched copy
    for m in (model, untouched):
        for p in m.parameters():
            p.grad = None
        nn.CrossEntropyLoss()(m(x), y).backward()
    for p, q in zip(model.parameters(), untouched.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_registry_declaration_matches_the_class():
    info = curvlab.backends()["kfac"]
    assert info.available
    assert info.capabilities == KFACEstimator.base_capabilities
    assert info.curvatures == KFACEstimator.supported_curvatures


def test_shared_factor_function_matches_the_estimator():
    model = make_model("cnn")
    x, y = make_data("cnn")
    out = kronecker_factors(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)])
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn")
    for layer, (A, G) in est.factors().items():
        assert torch.equal(out.factors[layer][0], A)
        assert torch.equal(out.factors[layer][1], G)
    assert [b.kind for b in out.blocks] == ["joint", "joint"]


def test_eigendecomposition_retries_in_double_when_lapack_fails(monkeypatch):
    from curvlab import kronecker

    original = torch.linalg.eigh
    calls = []

    def flaky(M):
        calls.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return original(M)

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 20, generator=gen)
    A = A @ A.T / 20
    G = torch.eye(3)
    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    eig = kronecker.eigendecompose(A, G)
    assert calls == [torch.float32, torch.float64, torch.float32, torch.float64]
    assert eig.evecs_A.dtype == torch.float32
    assert rel_err(eig.evecs_A @ torch.diag(eig.evals_A) @ eig.evecs_A.T, A) < 1e-5
