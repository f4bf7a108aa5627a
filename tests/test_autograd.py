"""The autograd reference backend against dense torch.func curvature matrices."""

import copy

import pytest
import torch
from helpers import (
    CUDA,
    LOSSES,
    MODELS,
    assert_state_equal,
    dense_curvature,
    dense_ggn,
    make_data,
    make_model,
    model_state,
)

import curvlab

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def probe(est, k=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (est.num_params,) if k is None else (est.num_params, k)
    return torch.randn(shape, generator=gen, dtype=est.dtype).to(est.device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("target", ["ce", "mse", "bce"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "ef"])
@pytest.mark.parametrize("name", MODELS)
def test_matvec_equals_dense(name, curvature, target, dtype):
    model = make_model(name, dtype)
    x, y = make_data(name, dtype=dtype, target=target)
    loss_fn = LOSSES[target]()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature=curvature)
    reference = copy.deepcopy(model).double()
    y64 = y if target == "ce" else y.double()
    dense = dense_curvature(curvature, reference, loss_fn, x.double(), y64)
    V = probe(est, k=3)
    assert rel_err(est.matvec(V).double(), dense @ V.double()) < TOL[dtype]
    assert rel_err(est.matvec(V[:, 0]).double(), dense @ V[:, 0].double()) < TOL[dtype]


@pytest.mark.parametrize("name", MODELS)
def test_ggn_is_jt_hout_j_and_psd(name):
    model = make_model(name)
    x, y = make_data(name)
    loss_fn = torch.nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature="ggn")
    G = est.to_dense()
    assert rel_err(G, dense_ggn(model, loss_fn, x, y)) < 1e-10
    assert torch.linalg.eigvalsh((G + G.T) / 2).min() > -1e-12 * G.norm()


@pytest.mark.parametrize("target", ["ce", "mse", "bce"])
def test_fisher_type2_equals_ggn(target):
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", target=target)
    loss_fn = LOSSES[target]()
    fisher = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature="fisher").to_dense()
    ggn = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature="ggn").to_dense()
    assert rel_err(fisher, ggn) < 1e-12


@pytest.mark.parametrize("target", ["ce", "mse", "bce"])
def test_mc_fisher_converges_to_ggn(target):
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", n=16, target=target)
    loss_fn = LOSSES[target]()
    ggn = dense_ggn(model, loss_fn, x, y)
    errors = []
    for samples in (4, 64, 1024):
        est = curvlab.estimator(
            "autograd",
            model,
            loss_fn,
            (x, y),
            curvature="fisher",
            fisher_type="mc",
            mc_samples=samples,
            seed=3,
        )
        errors.append(rel_err(est.to_dense(), ggn))
    # Monte-Carlo error shrinks like 1/sqrt(samples): 16x more samples -> ~4x smaller
    assert errors[0] > 2 * errors[1] > 4 * errors[2]
    assert errors[2] < 0.08


def test_mc_fisher_is_reproducible_with_seed():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    loss_fn = torch.nn.CrossEntropyLoss()
    a, b, c = (
        curvlab.estimator(
            "autograd", model, loss_fn, (x, y), curvature="fisher", fisher_type="mc", seed=s
        ).to_dense()
        for s in (7, 7, 8)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "ef"])
def test_multi_batch_equals_concatenated_batch(curvature):
    model = make_model("cnn")
    x, y = make_data("cnn", n=23)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 23, 8)]  # 8, 8, 7
    one = curvlab.estimator("autograd", model, loss_fn, (x, y), curvature=curvature)
    many = curvlab.estimator("autograd", model, loss_fn, batches, curvature=curvature)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    from_loader = curvlab.estimator("autograd", model, loss_fn, loader, curvature=curvature)
    V = probe(one, k=2)
    assert many.num_samples == from_loader.num_samples == 23
    assert rel_err(many.matvec(V), one.matvec(V)) < 1e-12
    assert rel_err(from_loader.matvec(V), one.matvec(V)) < 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "ef"])
@pytest.mark.parametrize("group_size", [1, 4])
def test_group_products_average_to_full_product(curvature, group_size):
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", n=24)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    est = curvlab.estimator("autograd", model, loss_fn, batches, curvature=curvature)
    v = probe(est)
    groups = est.group_matvecs(v, group_size)
    assert groups.shape == (24 // group_size, est.num_params)
    assert rel_err(groups.mean(0), est.matvec(v)) < 1e-12
    # each group's product is the curvature of that group's own mean loss
    first = curvlab.estimator(
        "autograd", model, loss_fn, (x[:group_size], y[:group_size]), curvature=curvature
    )
    assert rel_err(groups[0], first.matvec(v)) < 1e-12


def test_mc_fisher_follows_the_weights_after_an_optimizer_step():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    loss_fn = torch.nn.CrossEntropyLoss()
    kw = dict(curvature="fisher", fisher_type="mc", mc_samples=2, seed=1)
    est = curvlab.estimator("autograd", model, loss_fn, (x, y), **kw)
    v = probe(est)
    est.matvec(v)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    fresh = curvlab.estimator("autograd", model, loss_fn, (x, y), **kw)
    assert torch.equal(est.matvec(v), fresh.matvec(v))
    assert torch.equal(est.group_matvecs(v, 4), fresh.group_matvecs(v, 4))


def test_the_global_rng_is_left_as_found():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 3)
    ).double()
    x, y = make_data("tanh_mlp", n=8)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
    v = probe(est)
    full = est.matvec(v)
    rows = est.group_matvecs(v, 2)  # train-mode dropout is vmapped: masks are replayed
    assert est.vectorize is True
    torch.testing.assert_close(rows.mean(0), full, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.rand(3), expected)


def test_mc_fisher_groups_use_the_same_labels():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", n=12)
    est = curvlab.estimator(
        "autograd",
        model,
        torch.nn.CrossEntropyLoss(),
        (x, y),
        curvature="fisher",
        fisher_type="mc",
        mc_samples=3,
        seed=1,
    )
    v = probe(est)
    assert rel_err(est.group_matvecs(v, 3).mean(0), est.matvec(v)) < 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ef"])
def test_vmap_and_loop_agree(curvature):
    model = make_model("cnn")
    x, y = make_data("cnn", n=12)
    loss_fn = torch.nn.CrossEntropyLoss()
    kw = dict(curvature=curvature)
    fast = curvlab.estimator("autograd", model, loss_fn, (x, y), vectorize=True, **kw)
    slow = curvlab.estimator("autograd", model, loss_fn, (x, y), vectorize=False, **kw)
    v = probe(fast)
    assert torch.allclose(
        fast.group_matvecs(v, 1), slow.group_matvecs(v, 1), rtol=1e-12, atol=1e-14
    )
    assert torch.allclose(
        fast.per_sample_gradients(), slow.per_sample_gradients(), rtol=1e-12, atol=1e-14
    )


class DataDependentGate(torch.nn.Module):
    """Python control flow on a tensor's value: torch.func.vmap cannot trace it."""

    def forward(self, x):
        return x if float(x.abs().max()) > 0 else -x


def test_loop_fallback_for_unvectorizable_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), DataDependentGate(), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    x, y = make_data("tanh_mlp", n=12)
    est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
    v = probe(est)
    with pytest.warns(curvlab.CurvlabWarning, match="looping"):
        groups = est.group_matvecs(v, 4)
    assert groups.shape == (3, est.num_params)
    assert est.vectorize is False  # decided once: no second attempt, no second warning
    torch.testing.assert_close(groups.mean(0), est.matvec(v), rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_average_to_gradient():
    model = make_model("buffer_frozen")
    x, y = make_data("buffer_frozen")
    loss_fn = torch.nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(model(x), y), params)
    assert (
        rel_err(est.per_sample_gradients().mean(0), torch.cat([t.reshape(-1) for t in g])) < 1e-12
    )


def test_repeated_matvecs_reuse_the_forward_pass():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
        v = probe(est)
        est.matvec(v)
        after_first = len(calls)
        for _ in range(5):
            est.matvec(v)
        assert len(calls) == after_first
    finally:
        handle.remove()


def test_graph_is_rebuilt_after_an_optimizer_step():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    loss_fn = torch.nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    v = probe(est)
    est.matvec(v)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    fresh = curvlab.estimator("autograd", model, loss_fn, (x, y))
    assert rel_err(est.matvec(v), fresh.matvec(v)) < 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "ef"])
def test_model_state_is_unchanged(curvature):
    model = make_model("buffer_frozen")
    model.train()
    model.head[1].eval()
    x, y = make_data("buffer_frozen")
    before = model_state(model)
    est = curvlab.estimator(
        "autograd", model, torch.nn.CrossEntropyLoss(), (x, y), curvature=curvature
    )
    v = probe(est)
    est.matvec(v)
    est.group_matvecs(v, 2)
    est.per_sample_gradients()
    est.to_dense()
    assert_state_equal(before, model_state(model))


def test_bn_running_stats_are_not_updated():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)
    ).double()
    x, y = make_data("tanh_mlp")
    before = model_state(model)
    est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
    est.matvec(probe(est))
    assert_state_equal(before, model_state(model))


def test_no_graph_is_kept_after_release():
    import gc
    import weakref

    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    est = curvlab.estimator("autograd", model, torch.nn.CrossEntropyLoss(), (x, y))
    est.matvec(probe(est))
    grads = weakref.ref(est._graphs[0]["grads"][0])
    del est
    gc.collect()
    assert grads() is None


def test_explicit_params_subset():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    loss_fn = torch.nn.CrossEntropyLoss()
    full = curvlab.estimator("autograd", model, loss_fn, (x, y)).to_dense()
    last = list(model[2].parameters())
    sub = curvlab.estimator("autograd", model, loss_fn, (x, y), params=last)
    n = sum(p.numel() for p in last)
    assert sub.num_params == n
    assert rel_err(sub.to_dense(), full[-n:, -n:]) < 1e-12


@CUDA
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "ef"])
def test_cuda_matches_dense(curvature):
    model = make_model("cnn")
    x, y = make_data("cnn")
    loss_fn = torch.nn.CrossEntropyLoss()
    dense = dense_curvature(curvature, model, loss_fn, x, y)
    model.cuda()
    est = curvlab.estimator("autograd", model, loss_fn, (x.cuda(), y.cuda()), curvature=curvature)
    V = probe(est, k=2)
    assert rel_err(est.matvec(V).cpu(), dense @ V.cpu()) < 1e-10
    groups = est.group_matvecs(V[:, 0], 4)
    assert rel_err(groups.mean(0), est.matvec(V[:, 0])) < 1e-10
