"""cache=True/False/"auto": the same products, and flat memory when graphs are not kept."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import curvlab
from curvlab.errors import InvalidInputError

F64 = torch.float64


def _data(n_batches: int, size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 1, 8, 8, generator=gen, dtype=F64),
            torch.randint(0, 4, (size,), generator=gen),
        )
        for _ in range(n_batches)
    ]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4)
    ).to(F64)


@pytest.mark.parametrize("backend", ["autograd", "pyhessian", "backpack"])
def test_products_are_identical_cached_or_streamed(backend):
    model, data, loss_fn = _model(), _data(3), nn.CrossEntropyLoss()
    curvature = "ggn" if backend == "backpack" else "hessian"
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=F64)
    out = {
        cache: curvlab.estimator(
            backend, model, loss_fn, data, curvature=curvature, cache=cache
        ).matvec(V)
        for cache in (True, False, "auto")
    }
    assert torch.equal(out[True], out[False])
    assert torch.equal(out[True], out["auto"])


def test_streaming_follows_parameter_updates():
    model, data, loss_fn = _model(), _data(2), nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, data, cache=False)
    v = torch.randn(est.num_params, dtype=F64)
    before = est.matvec(v)
    with torch.no_grad():
        model[0].weight.mul_(2)
    fresh = curvlab.estimator("autograd", model, loss_fn, data, cache=True).matvec(v)
    after = est.matvec(v)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


def test_cache_option_is_validated():
    model, data = _model(), _data(1)
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidInputError, match="cache"):
            curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), data, cache=bad)


def _alive_graphs(n_batches: int, cache: bool) -> tuple[int, int]:
    """(most batch graphs alive at once during two products, graphs alive afterwards),
    tracked by weak references to each graph's gradient tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    ).to(F64)
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), _data(n_batches), cache=cache)
    refs, most = [], 0
    build = est._batch_graph

    def tracked(*args):
        nonlocal most
        graph = build(*args)
        refs.append(weakref.ref(graph["grads"][0]))
        most = max(most, sum(r() is not None for r in refs))
        return graph

    est._batch_graph = tracked
    v = torch.randn(est.num_params, dtype=F64)
    for _ in range(2):
        est.matvec(v)
    return most, sum(r() is not None for r in refs)


def test_streaming_keeps_at_most_two_graphs_whatever_the_number_of_batches():
    assert _alive_graphs(8, True) == (8, 8)  # cached: one graph per batch, kept
    for n in (2, 8):
        most, after = _alive_graphs(n, False)
        assert most <= 2 and after == 0  # streamed: built, used and freed one by one
