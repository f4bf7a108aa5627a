"""Every backend on one model: same answers, no interference, the model left as found.

Covers autograd, backpack, pyhessian and (when its adapter is present) kfac: results in
every order equal those on fresh copies; afterwards the model has no hooks, the same modes,
parameters and ``.grad``, and trains bitwise as an untouched copy; 1000 consecutive
products keep no graphs; and the backends agree where the quantity is the same.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    assert_state_equal,
    dense_ggn,
    dense_hessian,
    make_data,
    make_model,
    model_state,
)
from torch import nn

import curvlab

F64 = torch.float64
HAS_KFAC = importlib.util.find_spec("curvlab.adapters.kfac") is not None and (
    importlib.util.find_spec("curvlinops") is not None
)
#: backend -> curvature it is exercised with (KFAC approximates the GGN)
CURVATURE = {"autograd": "hessian", "backpack": "ggn", "pyhessian": "hessian"}
if HAS_KFAC:
    CURVATURE["kfac"] = "ggn"
BACKENDS = sorted(CURVATURE)


def problem():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    return model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:], y[10:])]


def probe(n: int) -> torch.Tensor:
    return torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(11))


def use(est) -> list[torch.Tensor]:
    """A product, plus the backend's extension path where it has one."""
    out = [est.matvec(probe(est.num_params))]
    if est.backend == "backpack":
        out += [est.diagonal(), est.per_sample_gradients()]
    if est.backend == "pyhessian":
        out.append(est.power_eigenvalues(top_n=1, maxIter=20, seed=0).values)
    return out


@pytest.fixture(scope="module")
def fresh_results():
    results = {}
    for name in BACKENDS:
        model, loss_fn, data = problem()
        est = curvlab.estimator(name, model, loss_fn, data, curvature=CURVATURE[name])
        results[name] = use(est)
    return results


def no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )


def training_grads(model, loss_fn, data) -> list[torch.Tensor]:
    x, y = data[0]
    loss_fn(model(x), y).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("order", list(itertools.permutations(BACKENDS)), ids="-".join)
def test_backends_in_any_order_leave_the_model_and_each_other_alone(order, fresh_results):
    model, loss_fn, data = problem()
    untouched = copy.deepcopy(model)
    before = model_state(model)
    estimators = []
    for name in order:  # each builds and computes while the previous ones stay alive
        est = curvlab.estimator(name, model, loss_fn, data, curvature=CURVATURE[name])
        estimators.append(est)
        for got, want in zip(use(est), fresh_results[name]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for est in estimators:  # and again, interleaved after all of them exist
        for got, want in zip(use(est), fresh_results[est.backend]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    after = model_state(model)
    assert_state_equal(before, after)
    assert no_hooks(model) and model.training
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(training_grads(model, loss_fn, data), training_grads(untouched, loss_fn, data)):
        assert torch.equal(a, b)


#: Runs in a fresh process, so memory freed by earlier tests cannot hide growth in RSS.
#: Prints the RSS growth (MiB) over 1000 products after 50 warm-up products.
_MEMORY_PROBE = """
import os, sys, torch
from torch import nn
import curvlab

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
gen = torch.Generator().manual_seed(1)
x = torch.randn(32, 5, dtype=torch.float64, generator=gen)
y = torch.randint(0, 3, (32,), generator=gen)
loss_fn = nn.CrossEntropyLoss()
name, curvature = sys.argv[1], sys.argv[2]
if name == "leak":  # the control: keep every product's graph alive
    ps = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)
    def product():
        ones = [torch.ones_like(p) for p in ps]
        return torch.autograd.grad(grads, ps, ones, retain_graph=True, create_graph=True)
else:
    est = curvlab.estimator(name, model, loss_fn, (x, y), curvature=curvature)
    v = torch.randn(est.num_params, dtype=torch.float64, generator=gen)
    def product():
        out = est.matvec(v)
        assert not out.requires_grad and out.grad_fn is None
        return out
kept = [product() for _ in range(50)][-1:]
start = rss()
kept += [product() for _ in range(1000)] if name == "leak" else []
for _ in range(0 if name == "leak" else 1000):
    product()
assert all(p.grad is None for p in model.parameters())
print(rss() - start)
"""
LEAK_MIB = 10.0  # a graph kept per product costs ~60 MiB over 1000 products on this model


def _rss_growth(name: str, curvature: str = "hessian") -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, name, curvature],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_the_memory_probe_detects_a_retained_graph():
    assert _rss_growth("leak") > LEAK_MIB


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("name", BACKENDS)
def test_thousand_products_keep_no_graphs(name):
    assert _rss_growth(name, CURVATURE[name]) < LEAK_MIB


# ---------------------------------------------------------------------- agreement
def test_hessian_products_agree_across_backends():
    model, loss_fn, data = problem()
    x, y = (torch.cat(t) for t in zip(*data))
    H = dense_hessian(model, loss_fn, x, y)
    V = probe(H.shape[0])
    for name in ("autograd", "backpack", "pyhessian"):
        est = curvlab.estimator(name, model, loss_fn, data, curvature="hessian")
        torch.testing.assert_close(est.matvec(V), H @ V, rtol=1e-10, atol=1e-12)


def test_ggn_products_agree_across_backends():
    model, loss_fn, data = problem()
    x, y = (torch.cat(t) for t in zip(*data))
    G = dense_ggn(model, loss_fn, x, y)
    V = probe(G.shape[0])
    for name in ("autograd", "backpack"):
        est = curvlab.estimator(name, model, loss_fn, data, curvature="ggn")
        torch.testing.assert_close(est.matvec(V), G @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not HAS_KFAC, reason="the kfac adapter is not present")
def test_kfac_equals_exact_ggn_for_one_linear_layer_with_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(F64)
    x, y = make_data("tanh_mlp", target="mse")
    loss_fn = nn.MSELoss()
    G = dense_ggn(model, loss_fn, x, y)
    V = probe(G.shape[0])
    for name in ("autograd", "backpack", "kfac"):
        est = curvlab.estimator(name, model, loss_fn, (x, y), curvature="ggn")
        torch.testing.assert_close(est.matvec(V), G @ V, rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_agree_across_backends():
    model, loss_fn, data = problem()
    values = {}
    for name in ("autograd", "backpack", "pyhessian"):
        est = curvlab.estimator(name, model, loss_fn, data, curvature="hessian")
        values[name] = est.eigenpairs(k=3, seed=0).values
    x, y = (torch.cat(t) for t in zip(*data))
    exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, x, y))[-3:].flip(0)
    for name, got in values.items():
        torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-10, msg=name)
    ggn = {
        name: curvlab.estimator(name, model, loss_fn, data, curvature="ggn").eigenpairs(k=3).values
        for name in ("autograd", "backpack")
    }
    torch.testing.assert_close(ggn["backpack"], ggn["autograd"], rtol=1e-8, atol=1e-10)
