"""compare() on the digits softmax-regression Hessian and a spiked model; the held-out score."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from curvlab.errors import BackendUnavailableError, CurvlabError
from curvlab.shrinkage import (
    OAS,
    Comparison,
    LedoitWolf,
    PerSampleMatrices,
    RMTLinear,
    RotationInvariant,
    SpikedModel,
    compare,
    heldout_score,
)

F64 = torch.float64


@pytest.fixture
def digits_hessian(digits_logreg):
    from curvlab.adapters.autograd import AutogradEstimator

    model, loss_fn, (x, y) = digits_logreg
    return AutogradEstimator(model, loss_fn, (x[:400], y[:400]), curvature="hessian")


def test_compare_on_digits_hessian(digits_hessian, tmp_path):
    estimators = {"LW": LedoitWolf(n_probes=4), "OAS": OAS(n_probes=4),
                  "RMT": RMTLinear(n_probes=4), "RIE": RotationInvariant(n_probes=4)}
    records = compare(digits_hessian, estimators, [32, 128], n_overlaps=2,
                      csv_path=tmp_path / "cmp.csv", plot_path=tmp_path / "cmp.png")
    assert len(records) == 2 * (1 + len(estimators))
    assert {r["estimator"] for r in records} == {"raw", *estimators}
    with open(tmp_path / "cmp.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) and "overlap_2" in rows[0]
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    raw = {r["batch_size"]: r for r in records if r["estimator"] == "raw"}
    assert raw[128]["frobenius"] < raw[32]["frobenius"]  # more data, less noise
    for r in records:
        assert r["frobenius"] >= 0 and 0 <= r["overlap_1"] <= 1 + 1e-12
        if r["estimator"] in ("LW", "OAS", "RMT"):
            assert 0 <= r["shrinkage"] <= 1 and r["damping"] >= 0
    # the records are reproducible
    again = compare(digits_hessian, {"LW": LedoitWolf(n_probes=4)}, [32], n_overlaps=2)
    assert again[1]["frobenius"] == pytest.approx(records[1]["frobenius"], rel=1e-12)


def test_rmt_rule_damping_is_the_noise_variance(digits_hessian):
    pytest.importorskip("curvlab.noise")
    rule = RMTLinear(batch_size=64, n_probes=5, seed=11).fit(digits_hessian)
    ref = digits_hessian.noise_variance(batch_size=64, n_probes=5, seed=11)
    assert rule.damping_ == pytest.approx(ref.value, rel=1e-12)
    assert rule.shrinkage_ == pytest.approx(ref.value / (1 + ref.value), rel=1e-12)
    assert rule.shrinkage_stderr_ > 0


def test_compare_spiked_model_orders_estimators():
    model = SpikedModel(200, spikes=(15.0, 8.0, 4.0), noise=2.0, bulk=(0.0, 1.0))
    records = compare(model, [LedoitWolf(), RotationInvariant()], [4, 16], n_repeats=2)
    def mean(name, b):
        vals = [r["frobenius"] for r in records if r["estimator"] == name and r["batch_size"] == b]
        return sum(vals) / len(vals)

    for b in (4, 16):
        assert mean("raw", b) > mean("LedoitWolf", b) > mean("RotationInvariant", b)
    # linear shrinkage keeps the eigenvectors: the same overlaps as raw
    by = {(r["estimator"], r["batch_size"], r["repeat"]): r for r in records}
    assert by[("LedoitWolf", 4, 0)]["overlap_1"] == pytest.approx(by[("raw", 4, 0)]["overlap_1"])


def test_heldout_score_tracks_the_truth_error():
    """-(1/P) E||(H_hat - H')v||^2 differences equal the truth's Frobenius differences."""
    model = SpikedModel(300, spikes=(15.0, 8.0, 4.0), noise=2.0, bulk=(0.0, 1.0))
    batch, other = model.sample(4, seed=1), model.sample(4, seed=2)
    rie = RotationInvariant().fit(batch)
    raw = batch.mean(0)
    truth = model.matrix
    gap_truth = float(((raw - truth) ** 2).sum() - ((rie.covariance_ - truth) ** 2).sum()) / 300
    held_other = PerSampleMatrices(other)
    s_rie = heldout_score(rie, held_other, n_probes=200, seed=0)
    s_raw = heldout_score(lambda v: raw @ v, held_other, n_probes=200, seed=0)
    assert s_rie.value > s_raw.value
    gap = s_rie.value - s_raw.value
    assert gap == pytest.approx(gap_truth, rel=0.2)
    assert s_rie.stderr > 0 and s_rie.n_matvecs == 200
    with pytest.raises(CurvlabError):
        heldout_score(rie, torch.eye(3))


def test_compare_refuses_unknown_truth():
    with pytest.raises(CurvlabError, match="truth"):
        compare(torch.eye(4, dtype=F64), [LedoitWolf()], [2])


# ---------------------------------------------------------------------- vector samples
def _pool(n=400, p=12, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((p, p)) / np.sqrt(p)
    truth = A @ A.T + np.eye(p)
    X = rng.standard_normal((n, p)) @ np.linalg.cholesky(truth).T + 3.0
    return truth, X


@pytest.mark.parametrize("as_torch", [False, True])
def test_compare_on_vector_samples_with_a_numpy_truth(as_torch):
    """Batches of rows of an [n, P] pool; the raw estimate is the batch's covariance, for
    B < P, B = P and B > P (issue 16: B = P was read as a matrix)."""
    truth, X = _pool()
    pool = torch.tensor(X) if as_torch else X
    p = truth.shape[0]
    table = compare(truth, {"LW": LedoitWolf(), "OAS": OAS(), "RIE": RotationInvariant()},
                    [6, p, 48], samples=pool, n_repeats=2, seed=3, progress=False)
    for r in (r for r in table if r["estimator"] == "raw"):
        idx = torch.randperm(400, generator=torch.Generator().manual_seed(
            3 + 1000 * r["repeat"] + r["batch_size"]))[: r["batch_size"]]
        raw = np.cov(X[idx.numpy()].T, bias=True)
        assert r["frobenius"] == pytest.approx(((raw - truth) ** 2).sum() / p, rel=1e-10)
    lw = [r for r in table if r["estimator"] == "LW"]
    ref = {(r["batch_size"], r["repeat"]): r for r in table if r["estimator"] == "raw"}
    for r in lw:  # shrinkage helps most at the smallest batch, where n < P
        if r["batch_size"] == 6:
            assert r["frobenius"] < ref[r["batch_size"], r["repeat"]]["frobenius"]


def test_summary_is_mean_and_stderr_over_repeats(tmp_path):
    truth, X = _pool(seed=1)
    table = compare(truth, [LedoitWolf()], [8, 24], samples=X, n_repeats=4, progress=False)
    assert isinstance(table, Comparison) and len(table) == 2 * 4 * 2
    rows = {(r["estimator"], r["batch_size"], r["metric"]): r for r in table.summary()}
    values = np.array([r["frobenius"] for r in table
                       if r["estimator"] == "LedoitWolf" and r["batch_size"] == 8])
    row = rows["LedoitWolf", 8, "frobenius"]
    assert row["n"] == 4
    assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert row["stderr"] == pytest.approx(values.std(ddof=1) / 2, rel=1e-12)
    path = table.to_csv(tmp_path / "summary.csv", summary=True)
    with open(path) as fh:
        saved = list(csv.DictReader(fh))
    assert {"batch_size", "estimator", "metric", "mean", "stderr", "n"} <= set(saved[0])
    assert len(saved) == len(table.summary())


def test_to_pandas_is_optional():
    truth, X = _pool(seed=2)
    table = compare(truth, [OAS()], [10], samples=X, progress=False)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="pandas"):
            table.to_pandas()
    else:
        frame = table.to_pandas()
        assert frame.shape[0] == len(table)


def test_plot_draws_error_bars_on_a_given_axes(tmp_path):
    import matplotlib
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    truth, X = _pool(seed=4)
    table = compare(truth, [LedoitWolf()], [8, 16], samples=X, n_repeats=3, progress=False)
    fig = Figure()
    ax = fig.subplots()
    assert table.plot(ax=ax) is fig
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # raw and LedoitWolf, each with error bars
    assert not any(tmp_path.iterdir())
    own = table.plot(path=tmp_path / "cmp.png")
    assert isinstance(own, Figure) and (tmp_path / "cmp.png").stat().st_size > 1000
    assert matplotlib.get_backend() == backend


def test_compare_draws_subsets_through_the_public_api(digits_hessian, monkeypatch):
    seen = []
    original = digits_hessian.subset

    def spy(indices):
        seen.append(indices.clone())
        return original(indices)

    monkeypatch.setattr(digits_hessian, "subset", spy)
    compare(digits_hessian, {"LW": LedoitWolf(n_probes=3)}, [16], n_repeats=2, progress=False)
    assert [len(i) for i in seen] == [16, 16]
    assert all(int(i.max()) < 400 and i.unique().numel() == 16 for i in seen)
