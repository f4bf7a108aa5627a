"""RotationInvariant on a real network Hessian (issue 16): a tanh MLP on scikit-learn's
digits, autograd backend, dense Hessians. The plain additive-noise RIE is far worse than
the raw batch Hessian here; the default estimator detects that its model fails, warns, and
is never worse than the raw estimate at any batch size."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab
from curvlab.errors import CurvlabWarning
from curvlab.shrinkage import RotationInvariant, compare

POOL, HIDDEN = 900, 4


@pytest.fixture(scope="module")
def mlp_hessian():
    """The full-pool Hessian estimator of a briefly trained 64-4-10 tanh MLP (P = 310)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return curvlab.estimator("autograd", model, loss_fn, (x[:POOL], y[:POOL]),
                             curvature="hessian")


def test_default_rie_is_never_worse_than_raw(mlp_hessian):
    estimators = {"default": RotationInvariant(n_probes=6),
                  "plain": RotationInvariant(n_probes=6, check_model=False)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = compare(mlp_hessian, estimators, [12, 40, 90], n_repeats=2, seed=1,
                        n_overlaps=1, progress=False)
    model_warnings = [w for w in caught if issubclass(w.category, CurvlabWarning)
                      and "additive-noise model does not hold" in str(w.message)]
    assert len(model_warnings) == 6  # every fit of the default estimator
    by = {(r["batch_size"], r["repeat"], r["estimator"]): r["frobenius"] for r in table}
    for (batch_size, repeat, name), error in by.items():
        raw = by[batch_size, repeat, "raw"]
        if name == "default":
            assert error <= raw * (1 + 1e-9), (batch_size, repeat, error, raw)
        if name == "plain":  # the failure it guards against
            assert error > 5 * raw, (batch_size, repeat, error, raw)


def test_model_check_reports_why(mlp_hessian):
    batch = mlp_hessian.subset(torch.arange(30))
    with pytest.warns(CurvlabWarning, match="eigenvalues are zero"):
        fit = RotationInvariant(n_probes=6).fit(batch)
    check = fit.model_check_
    assert not check["holds"] and check["zero_fraction"] > 0.01
    assert fit.choice_ in ("raw", "ledoit_wolf", "rmt", "rotation_invariant")
    assert set(fit.heldout_gains_) == {"ledoit_wolf", "rmt", "rotation_invariant"}
    assert fit.heldout_gains_["rotation_invariant"][0] < 0  # the RIE loses held out
    # without per-sample information (the dense matrix alone) the fallback is linear
    with pytest.warns(CurvlabWarning, match="fell back to linear shrinkage"):
        alone = RotationInvariant(noise_variance=fit.noise_variance_).fit(batch.to_dense())
    assert alone.choice_ == "linear"
    raw = torch.linalg.eigvalsh(batch.to_dense()).flip(0)
    mu = float(raw.mean())
    rho = min(fit.noise_variance_ / float(((raw - mu) ** 2).mean()), 1.0)
    torch.testing.assert_close(alone.eigenvalues_, (1 - rho) * raw + rho * mu)
