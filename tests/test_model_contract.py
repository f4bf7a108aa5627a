"""The model contract of issue 11, one test (or one parametrised family) per point.

Each test failed on the code before the model-view rewrite (commit 65572ed); references are
built without curvlab (tests/references.py). Points: (1) train mode, (2) train-mode BatchNorm
in group products, (3) hooks and wrappers, (4) staleness, (5) the loss normaliser, (6) KFAC
invariants, (7) input checks, (8) the diagonal.
"""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import tied_sequential
from helpers import assert_state_equal, model_state
from references import DenseReference, kfac_operator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab
from curvlab.errors import (
    BackendError,
    CurvlabError,
    CurvlabWarning,
    InvalidInputError,
    UnsupportedModelError,
)

F64 = torch.float64
TOL = 1e-10
#: (backend, curvature) pairs exercised where one product of each backend is wanted
PRODUCTS = [
    ("autograd", "hessian"),
    ("autograd", "ggn"),
    ("pyhessian", "hessian"),
    ("backpack", "hessian"),
    ("backpack", "ggn"),
    ("kfac", "ggn"),
]
PRODUCT_IDS = [f"{b}-{c}" for b, c in PRODUCTS]


def rel_err(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


def probes(P: int, k: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def names_of(model, params=None) -> list[str]:
    if params is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def reference(backend, curvature, model, loss_fn, batches, V, params=None, seed=0):
    """What ``backend`` must return for ``curvature`` on the model as it is now."""
    names = names_of(model, params)
    if backend == "kfac":
        return kfac_operator(model, loss_fn, batches, names, curvature, "kfac", seed=seed)(V)
    return DenseReference(model, loss_fn, batches, names, seed=seed).matrix(curvature) @ V


def data(n=12, d=4, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def stochastic_model(seed=0) -> nn.Sequential:
    """Linear -> BatchNorm (affine frozen, so KFAC applies) -> Tanh -> Dropout -> Linear,
    with running statistics as after some training: every layer the mode changes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).to(F64)
    model[1].requires_grad_(False)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4, dtype=F64) * 2 + 0.5)
    return model


def mlp(seed=0, d_in=4, hidden=6, d_out=3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(F64)


# ====================================================================== (1) train mode
@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
def test_1_train_mode_then_eval_every_backend_serves_the_current_mode(backend, curvature):
    """BatchNorm + Dropout in train mode: every backend equals the train-mode reference
    (pyhessian used to evaluate in eval mode); after model.eval() the same (cached)
    estimator serves the eval-mode curvature (autograd and kfac used to keep train mode)."""
    model = stochastic_model().train()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
    V = probes(est.num_params)
    train = reference(backend, curvature, model, loss_fn, [(x, y)], V)
    assert rel_err(est.matvec(V), train) <= TOL
    model.eval()
    evaluated = reference(backend, curvature, model, loss_fn, [(x, y)], V)
    assert rel_err(train, evaluated) > 0.05  # the mode matters for this model
    assert rel_err(est.matvec(V), evaluated) <= TOL
    model.train()
    assert rel_err(est.matvec(V), train) <= TOL


@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
def test_1_dropout_curvature_ignores_and_keeps_the_global_rng(backend, curvature):
    """Masks come from the estimator's seed: the global seed does not change the answer
    and no backend reads-and-advances the global RNG (kfac used to)."""
    model = stochastic_model().train()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
        results.append(est.matvec(probes(est.num_params)))
        assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(results[0], results[1])
    seeded = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature, seed=5)
    V = probes(seeded.num_params)
    ref = reference(backend, curvature, model, loss_fn, [(x, y)], V, seed=5)
    assert rel_err(seeded.matvec(V), ref) <= TOL


@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
@pytest.mark.parametrize("forced", ["train", "eval"])
def test_1_mode_option_forces_the_mode_without_switching_the_model(backend, curvature, forced):
    model = stochastic_model().train(forced == "eval")  # the other mode
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    before = model_state(model)
    est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature, mode=forced)
    V = probes(est.num_params)
    got = est.matvec(V)
    assert_state_equal(before, model_state(model))
    forced_model = stochastic_model().train(forced == "train")
    ref = reference(backend, curvature, forced_model, loss_fn, [(x, y)], V)
    assert rel_err(got, ref) <= TOL


def test_1_dataloader_data_leaves_the_global_rng_as_found():
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    model = mlp()  # seeds torch itself: build it before reading the state
    state = torch.random.get_rng_state()
    curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), loader)
    assert torch.equal(state, torch.random.get_rng_state())


# ====================================================================== (2) BatchNorm groups
def batchnorm_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    with torch.no_grad():
        model(torch.randn(16, 4, dtype=F64))
    return model.train()


def test_2_train_batchnorm_refuses_groups_of_one_sample():
    model = batchnorm_model()
    x, y = data()
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y))
    v = probes(est.num_params)[:, 0]
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        est.group_matvecs(v, 1)
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        est.noise_variance(batch_size=4, n_probes=2, group_size=1)
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        curvlab.LinearShrinkageDamper(update_every=1, group_size=1).step(
            model, nn.CrossEntropyLoss(), (x, y)
        )


@pytest.mark.parametrize("backend", ["autograd", "backpack", "kfac"])
def test_2_train_batchnorm_over_several_batches_refuses_the_diagonal_too(backend):
    model = batchnorm_model().eval()
    if backend == "kfac":  # KFAC covers Linear layers only: BatchNorm without parameters
        model[1] = nn.BatchNorm1d(6, affine=False).to(F64).eval()
    x, y = data()
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    est = curvlab.estimator(backend, model, nn.CrossEntropyLoss(), batches, curvature="ggn")
    est.diagonal()  # eval mode: defined
    model.train()  # now each batch normalises itself: the curvature of both is undefined
    for call in (est.diagonal, lambda: est.matvec(probes(est.num_params)[:, 0])):
        with pytest.raises(UnsupportedModelError, match="BatchNorm"):
            call()
    model.eval()


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ef"])
def test_2_train_batchnorm_groups_are_their_own_minibatches(curvature):
    model = batchnorm_model()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature=curvature)
    V = probes(est.num_params, 2)
    rows = est.group_matvecs(V, 4)
    mats = DenseReference(model, loss_fn, [(x, y)], names_of(model)).group_matrices(curvature, 4)
    assert rel_err(rows, torch.einsum("gpq,qk->kgp", mats, V)) <= TOL
    noise = est.noise_variance(batch_size=4, n_probes=2, group_size=4, seed=0)
    assert noise.value >= 0


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ef"])
def test_2_train_batchnorm_group_products_are_vectorised(curvature):
    model = batchnorm_model()
    x, y = data()
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y), curvature=curvature)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvlabWarning)
        est.group_matvecs(probes(est.num_params, 2), 3)
        est.noise_variance(batch_size=3, n_probes=2, group_size=3, seed=0)
    assert est.vectorize is True


# ====================================================================== (3) hooks, wrappers
def test_3_full_backward_hooks_break_nothing_and_never_fire():
    model = mlp().train()
    x, y = data(n=16)
    fired = []
    for m in model.modules():
        m.register_full_backward_hook(lambda *a: fired.append("backward"))
        m.register_forward_pre_hook(lambda *a: fired.append("forward"))
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    V = probes(est.num_params, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvlabWarning)
        rows = est.group_matvecs(V, 1)
        est.noise_variance(batch_size=4, n_probes=2, seed=0)
        damper = curvlab.LinearShrinkageDamper(update_every=1, n_probes=2, group_size=2)
        damper.step(model, loss_fn, (x, y))
    assert est.vectorize is True
    assert fired == []
    for m in model.modules():  # the reference's deep copy would carry them
        m._backward_hooks.clear()
        m._forward_pre_hooks.clear()
    mats = DenseReference(model, loss_fn, [(x, y)], names_of(model)).group_matrices("hessian", 1)
    assert rel_err(rows, torch.einsum("gpq,qk->kgp", mats, V)) <= TOL


@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
def test_3_no_user_forward_hook_fires(backend, curvature):
    model = stochastic_model().train()
    x, y = data()
    calls = []
    for m in model.modules():
        m.register_forward_pre_hook(lambda *a: calls.append(1))
        m.register_forward_hook(lambda *a: calls.append(1))
    est = curvlab.estimator(backend, model, nn.CrossEntropyLoss(), (x, y), curvature=curvature)
    est.matvec(probes(est.num_params))
    est.diagonal()
    est.trace(n_matvecs=6, seed=0)
    assert calls == []


def test_3_torch_compile_wrapper_is_unwrapped():
    model = stochastic_model().train()
    try:
        compiled = torch.compile(model)
    except Exception as exc:  # pragma: no cover - depends on the platform
        pytest.skip(f"torch.compile is unavailable here ({type(exc).__name__}: {exc})")
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    for backend, curvature in PRODUCTS:
        est = curvlab.estimator(backend, compiled, loss_fn, (x, y), curvature=curvature)
        V = probes(est.num_params)
        ref = reference(backend, curvature, model, loss_fn, [(x, y)], V)
        assert rel_err(est.matvec(V), ref) <= TOL, backend


# --- DistributedDataParallel on two gloo processes
N_DDP, SPLIT = 40, 23


def ddp_problem():
    """An eval-mode BatchNorm model (buffers, which DDP broadcasts in its forward)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_DDP, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (N_DDP,), generator=gen)
    return batchnorm_model().eval(), nn.CrossEntropyLoss(), x, y


def ddp_quantities(model, loss_fn, x, y) -> dict:
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    noise = est.noise_variance(batch_size=8, n_probes=3, group_size=1, seed=3)
    damper = curvlab.LinearShrinkageDamper(update_every=1, n_probes=2, group_size=1, seed=2)
    for _ in range(2):
        damper.step(model, loss_fn, (x, y))
    return {
        "matvec": est.matvec(probes(est.num_params)),
        "noise": noise.per_probe,
        "damping": torch.tensor(damper.damping, dtype=F64),
    }


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        model, loss_fn, x, y = ddp_problem()
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N_DDP)
        torch.save(ddp_quantities(wrapped, loss_fn, x[part], y[part]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_3_ddp_wrapped_model_on_two_ranks_equals_one_process_on_the_union(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model, loss_fn, x, y = ddp_problem()
    single = ddp_quantities(model, loss_fn, x, y)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key, value in single.items():
            assert torch.allclose(got[key], value, rtol=1e-10, atol=1e-14), (rank, key)


# ====================================================================== (4) staleness
def _write_data(model, x, y):
    model[0].weight.data.mul_(1.5)
    return x, y


def _write_data_attribute(model, x, y):
    model[2].weight.data = model[2].weight.data * -0.5 + 0.1
    return x, y


def _vector_to_parameters(model, x, y):
    vec = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vec * 0.7 + 0.05, model.parameters())
    return x, y


def _load_state_dict_assign(model, x, y):
    other = mlp(seed=3)
    model.load_state_dict(other.state_dict(), assign=True)
    return x, y


def _load_state_dict_permuted(model, x, y):
    # the same values in other places: sums of the contents cannot see it, versions do
    state = {k: t.clone() for k, t in model.state_dict().items()}
    state["0.weight"] = state["0.weight"].flip(0)
    model.load_state_dict(state)
    return x, y


def _permute_in_place(model, x, y):
    with torch.no_grad():
        model[2].weight.copy_(model[2].weight.roll(1, dims=1))
    return x, y


def _exchange_through_data(model, x, y):
    a, b = model[0].bias.data, model[2].bias.data
    saved = a[:3].clone()
    a[:3].copy_(b[:3])
    b[:3].copy_(saved)
    return x, y


def _permute_through_data(model, x, y):
    w = model[0].weight.data
    w.copy_(w.flip(0))
    return x, y


def _inplace_data(model, x, y):
    x.mul_(1.7)
    y[:4] = (y[:4] + 1) % 3
    return x, y


WRITES = {
    "p.data inplace": _write_data,
    "p.data =": _write_data_attribute,
    "vector_to_parameters": _vector_to_parameters,
    "load_state_dict(assign)": _load_state_dict_assign,
    "load_state_dict permuted": _load_state_dict_permuted,
    "permuted in place": _permute_in_place,
    "values exchanged through .data": _exchange_through_data,
    "permuted through .data": _permute_through_data,
    "data inplace": _inplace_data,
}


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
def test_4_cached_estimators_notice_every_write(backend, curvature, write):
    model = mlp()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
    V = probes(est.num_params)
    old = est.matvec(V)
    if backend == "backpack":
        est.diagonal()  # fills the extension caches too
    x, y = WRITES[write](model, x, y)
    ref = reference(backend, curvature, model, loss_fn, [(x, y)], V)
    assert rel_err(old, ref) > 0.01
    assert rel_err(est.matvec(V), ref) <= TOL
    est.refresh()
    assert rel_err(est.matvec(V), ref) <= TOL


# ====================================================================== (5) normaliser
def masked_weighted_problem():
    x, y = data(n=18)
    y[[0, 5, 6, 13]] = -1
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1, weight=torch.tensor([0.5, 2.0, 1.25], dtype=F64))
    batches = [(x[:8], y[:8]), (x[8:13], y[8:13]), (x[13:], y[13:])]
    return mlp(), loss_fn, x, y, batches


@pytest.mark.parametrize(
    "backend,curvature", [("autograd", "hessian"), ("autograd", "ggn"), ("pyhessian", "hessian")]
)
def test_5_masked_weighted_cross_entropy_over_batches_is_the_loss_of_the_union(backend, curvature):
    model, loss_fn, x, y, batches = masked_weighted_problem()
    est = curvlab.estimator(backend, model, loss_fn, batches, curvature=curvature)
    V = probes(est.num_params)
    # the loss's own curvature on the concatenated data, straight from torch.func
    names = names_of(model)
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss_of(theta):
        state = {n: t.view_as(params[n]) for n, t in zip(names, theta.split(sizes))}
        return loss_fn(torch.func.functional_call(model, state, (x,)), y)

    if curvature == "hessian":
        M = torch.func.hessian(loss_of)(flat)
    else:
        M = DenseReference(model, loss_fn, [(x, y)], names).matrix("ggn")
    assert rel_err(est.matvec(V), M @ V) <= TOL


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ef"])
def test_5_per_sample_rows_average_to_matvec(curvature):
    model, loss_fn, _, _, batches = masked_weighted_problem()
    est = curvlab.estimator("autograd", model, loss_fn, batches, curvature=curvature)
    V = probes(est.num_params, 2)
    rows = est.group_matvecs(V, 1)
    assert rel_err(rows.mean(1), est.matvec(V).T) <= TOL
    mats = DenseReference(model, loss_fn, batches, names_of(model)).group_matrices(curvature, 1)
    assert rel_err(rows, torch.einsum("gpq,qk->kgp", mats, V)) <= TOL


def test_5_mean_reduction_is_checked_on_every_new_batch_shape():
    def mean_for_multiples_of_four(out, y):  # a sum for other batch sizes
        reduction = "mean" if out.shape[0] % 4 == 0 else "sum"
        return nn.functional.cross_entropy(out, y, reduction=reduction)

    x, y = data(n=13)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    curvlab.estimator("autograd", mlp(), mean_for_multiples_of_four, batches[:1])  # a mean
    for backend in ("autograd", "pyhessian"):
        with pytest.raises(InvalidInputError, match="average"):
            curvlab.estimator(backend, mlp(), mean_for_multiples_of_four, batches)


# ====================================================================== (6) KFAC
def test_6_kfac_refuses_a_parameter_shared_by_two_layers():
    torch.manual_seed(0)
    model = tied_sequential().to(F64)
    x, y = data()
    with pytest.raises(UnsupportedModelError, match=r"shared|tied"):
        curvlab.estimator("kfac", model, nn.CrossEntropyLoss(), (x, y), curvature="ggn")


# ====================================================================== (7) input checks
ALL_BACKENDS = [("autograd", "hessian"), ("pyhessian", "hessian"), ("backpack", "ggn"),
                ("kfac", "ggn")]
BACKEND_IDS = [b for b, _ in ALL_BACKENDS]


@pytest.mark.parametrize("backend,curvature", ALL_BACKENDS, ids=BACKEND_IDS)
def test_7_data_dtype_must_match_the_model(backend, curvature):
    x, y = data()
    with pytest.raises(InvalidInputError, match=r"batch 0.*float32.*float64"):
        curvlab.estimator(backend, mlp(), nn.CrossEntropyLoss(), (x.float(), y),
                          curvature=curvature)


@pytest.mark.parametrize("backend,curvature", ALL_BACKENDS, ids=BACKEND_IDS)
def test_7_class_labels_dtype_and_range(backend, curvature):
    x, y = data()
    batches = [(x[:6], y[:6]), (x[6:], y[6:].clone())]
    with pytest.raises(InvalidInputError, match=r"batch 1.*int32.*long"):
        curvlab.estimator(backend, mlp(), nn.CrossEntropyLoss(),
                          [batches[0], (batches[1][0], batches[1][1].int())], curvature=curvature)
    batches[1][1][2] = 3
    with pytest.raises(InvalidInputError, match=r"batch 1.*\[0, 3\).*3"):
        curvlab.estimator(backend, mlp(), nn.CrossEntropyLoss(), batches, curvature=curvature)


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("backend,curvature", ALL_BACKENDS, ids=BACKEND_IDS)
def test_7_target_shape_must_equal_the_output_shape(backend, curvature, loss_cls):
    x, _ = data()
    y = (torch.arange(12, dtype=F64) % 2)  # [N] targets for [N, 1] outputs
    with pytest.raises(InvalidInputError, match=r"\(12, 1\).*\(12,\)"):
        curvlab.estimator(backend, mlp(d_out=1), loss_cls(), (x, y), curvature=curvature)


@pytest.mark.parametrize("backend,curvature", ALL_BACKENDS, ids=BACKEND_IDS)
def test_7_a_dataset_is_not_batches(backend, curvature):
    x, y = data()
    with pytest.raises(InvalidInputError, match="DataLoader"):
        curvlab.estimator(backend, mlp(), nn.CrossEntropyLoss(), TensorDataset(x, y),
                          curvature=curvature)


@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
def test_7_explicit_params_may_be_frozen(backend, curvature):
    model = mlp()
    model[0].requires_grad_(False)
    params = [model[2].weight, model[0].weight, model[0].bias, model[2].bias]
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature, params=params)
    V = probes(est.num_params)
    ref = reference(backend, curvature, model, loss_fn, [(x, y)], V, params=params)
    assert rel_err(est.matvec(V), ref) <= TOL
    assert not model[0].weight.requires_grad and model[0].weight.grad is None


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(self.act(self.fc(x)))))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_7_backpack_module_called_twice(curvature):
    torch.manual_seed(0)
    model = CalledTwice().to(F64)
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature=curvature)
    V = probes(est.num_params)
    eye = torch.eye(est.num_params, dtype=F64)
    M = reference("backpack", curvature, model, loss_fn, [(x, y)], eye)
    assert rel_err(est.matvec(V), M @ V) <= TOL
    caps = est.capabilities
    for cap, call in [
        ("diagonal", est.diagonal),
        ("per_sample_gradients", est.per_sample_gradients),
        ("per_sample_diagonal", est.per_sample_diagonal),
        ("kronecker_factors", est.kronecker_factors),
        ("group_matvecs", lambda: est.group_matvecs(V[:, 0], 1)),
    ]:
        if cap == "diagonal":  # identity columns when the extension cannot run
            assert rel_err(call(), M.diagonal()) <= TOL
            continue
        assert cap not in caps
        if cap == "group_matvecs" and curvature == "hessian":
            continue  # BackPACK has no per-sample Hessian products at all
        with pytest.raises(CurvlabError, match=r"more than once|used 2 times"):
            call()


def test_7_backpack_bare_linear_works():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(F64)
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature="ggn")
    ref = DenseReference(model, loss_fn, [(x, y)], names_of(model))
    G = ref.matrix("ggn")
    V = probes(est.num_params)
    assert rel_err(est.matvec(V), G @ V) <= TOL
    assert rel_err(est.diagonal(), G.diagonal()) <= TOL
    grads = est.per_sample_gradients()
    ef = ref.matrix("ef")
    assert rel_err(grads.T @ grads / x.shape[0], ef) <= TOL


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_7_backpack_eval_batchnorm_products_work(curvature):
    model = batchnorm_model().eval()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("backpack", model, loss_fn, (x, y), curvature=curvature)
    V = probes(est.num_params)
    ref = reference("backpack", curvature, model, loss_fn, [(x, y)], V)
    assert rel_err(est.matvec(V), ref) <= TOL


_FAIL = {"on": False}


class Flaky(nn.Module):
    """Raises a plain RuntimeError in its forward once told to."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if _FAIL["on"]:
            raise RuntimeError("boom inside the forward")
        return self.fc(x)


@pytest.mark.parametrize("backend,curvature", ALL_BACKENDS, ids=BACKEND_IDS)
def test_7_exceptions_inside_products_are_curvlab_errors_naming_the_backend(backend, curvature):
    torch.manual_seed(0)
    x, y = data()
    est = curvlab.estimator(backend, Flaky().to(F64), nn.CrossEntropyLoss(), (x, y),
                            curvature=curvature)
    est.refresh()
    _FAIL["on"] = True
    try:
        with pytest.raises(CurvlabError, match=f"'{backend}'") as info:
            est.matvec(probes(est.num_params))
    finally:
        _FAIL["on"] = False
    assert isinstance(info.value, BackendError)
    assert "boom" in str(info.value)


# ====================================================================== (8) diagonal
@pytest.mark.parametrize("backend,curvature", PRODUCTS, ids=PRODUCT_IDS)
def test_8_diagonal_is_exact_on_every_backend(backend, curvature):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3)
    ).to(F64)
    x, y = data(n=20, d=6)
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
    assert est.num_params == 157
    diag = est.diagonal()
    if backend == "kfac":
        ref = est.to_dense().diagonal()  # the diagonal of the KFAC matrix itself
    else:
        ref = DenseReference(model, loss_fn, [(x, y)], names_of(model)).matrix(curvature).diagonal()
    assert rel_err(diag, ref) <= TOL


@pytest.mark.parametrize(
    "backend,curvature",
    [
        ("autograd", "hessian"),
        ("pyhessian", "hessian"),
        ("backpack", "hessian"),
        ("backpack", "ggn"),
    ],
)
def test_8_diagonal_with_a_weight_shared_by_two_layers(backend, curvature):
    torch.manual_seed(0)
    model = tied_sequential().to(F64)
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator(backend, model, loss_fn, (x, y), curvature=curvature)
    ref = DenseReference(model, loss_fn, [(x, y)], names_of(model)).matrix(curvature).diagonal()
    assert rel_err(est.diagonal(), ref) <= TOL
