"""curvlinops' KFAC inverse driven by a LinearShrinkageDamper (issue 12, item 4).

curvlinops fixes the damping of a ``KFACInverseLinearOperator`` when it is built; the
supported way to change it is :class:`curvlab.adapters.kfac.DampedKFACInverse`, which
rebuilds the inverse when its ``damping`` is set (what ``damper.attach`` does). Every
product is checked against a dense (K + delta I)^-1 built from curvlinops' own K.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import make_data, make_model
from torch import nn

import curvlab
from curvlab.errors import InvalidInputError

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is not installed ('kfac' extra)")
from curvlab.adapters.kfac import DampedKFACInverse, KFACEstimator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # einops' torch.jit.script


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def kfac_operator(name="cnn", ekfac=False):
    model = make_model(name)
    x, y = make_data(name)
    cls = curvlinops.EKFACLinearOperator if ekfac else curvlinops.KFACLinearOperator
    op = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
             fisher_type="type-2", separate_weight_and_bias=False, check_deterministic=False)
    P = sum(p.numel() for p in model.parameters())
    K = op @ torch.eye(P, dtype=torch.float64)
    return model, x, y, op, K


def dense_inverse(K, delta, V):
    return torch.linalg.solve(K + delta * torch.eye(K.shape[0], dtype=K.dtype), V)


def probes(P, k=3):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_private_damping_has_no_effect_in_curvlinops_default_mode():
    # why the adapter exists: the cached inverse factors keep the damping they were built with
    _, _, _, op, K = kfac_operator()
    V = probes(K.shape[0])
    inverse = curvlinops.KFACInverseLinearOperator(op, damping=1e-2)
    before = inverse @ V
    inverse._damping = 1.0
    assert torch.equal(inverse @ V, before)


@pytest.mark.parametrize("ekfac", [False, True])
def test_the_damper_drives_the_exact_inverse(ekfac):
    model, x, y, op, K = kfac_operator(ekfac=ekfac)
    V = probes(K.shape[0])
    damper = curvlab.LinearShrinkageDamper(init=1e-2, update_every=1)
    inverse = DampedKFACInverse(op, damping=damper.damping)
    damper.attach(inverse, key="damping")
    used = []
    for _ in range(3):
        delta = damper.damping
        assert inverse.damping == delta
        assert rel_err(inverse @ V, dense_inverse(K, delta, V)) < 1e-9
        used.append(delta)
        damper.step(model, nn.CrossEntropyLoss(), (x, y))  # an update: the inverse follows
    # the dampings differ by far more than the tolerance, so a stale inverse would fail
    for old, new in itertools.pairwise(used):
        assert rel_err(dense_inverse(K, new, V), dense_inverse(K, old, V)) > 1e-4
    assert inverse.n_rebuilds == 3
    inverse.damping = inverse.damping  # an unchanged value rebuilds nothing
    assert inverse.n_rebuilds == 3


def test_heuristic_damping_follows_and_matches_curvlab_solve():
    model, x, y, op, K = kfac_operator()
    est = KFACEstimator(model, nn.CrossEntropyLoss(), (x, y), "ggn")
    V = probes(K.shape[0])
    inverse = DampedKFACInverse(op, damping=1e-3, exact=False, heuristic=True)
    for delta in (1e-3, 0.2):
        inverse.damping = delta
        assert rel_err(inverse @ V, est.solve(V, delta, heuristic=True)) < 1e-9
    assert rel_err(inverse @ V, est.solve(V, 1e-3, heuristic=True)) > 1e-2


def test_invalid_inverses_are_refused():
    _, _, _, op, _ = kfac_operator()
    with pytest.raises(InvalidInputError, match="KFACLinearOperator"):
        DampedKFACInverse(torch.eye(3), damping=0.1)
    with pytest.raises(InvalidInputError, match="exact=False"):
        DampedKFACInverse(op, damping=0.1, heuristic=True)
    inverse = DampedKFACInverse(op, damping=0.1)
    with pytest.raises(InvalidInputError, match=">= 0"):
        inverse.damping = -1.0
    assert inverse.damping == 0.1


def test_refresh_uses_the_recomputed_factors():
    model, _, _, op, K = kfac_operator()
    V = probes(K.shape[0])
    inverse = DampedKFACInverse(op, damping=0.05)
    stale = inverse @ V
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    op.compute_kronecker_factors()
    K_new = op @ torch.eye(K.shape[0], dtype=torch.float64)
    assert torch.equal(inverse @ V, stale)  # the inverse still holds the old factors
    inverse.refresh()
    assert rel_err(inverse @ V, dense_inverse(K_new, 0.05, V)) < 1e-9
    assert rel_err(dense_inverse(K_new, 0.05, V), stale) > 1e-2
