"""Hessian noise variance against exact per-sample Hessians (DESIGN.md section 4).

Truth: with per-sample Hessians H_n (n = 1..N) and H their mean, a batch of B drawn without
replacement has noise (1/B - 1/N) S2, S2 = sum_n ||H_n - H||_F^2 / ((N - 1) P).
"""

import copy
import math
import warnings

import pytest
import torch
from helpers import CUDA
from torch import nn
from torch.func import functional_call, jacrev, vmap

import curvlab
from curvlab.errors import InvalidInputError, UnsupportedCapabilityError
from curvlab.noise import noise_variance

SEEDS = range(30)  # the estimates are right-skewed: a 3-SE check on their mean needs ~30 draws


def digits(n, dtype=torch.float64):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n] / 16.0, dtype=dtype)
    return x, torch.tensor(data.target[:n])


class Exact:
    """Exact per-sample statistics: sum_n ||H_n||^2, the mean H, per-sample diagonals."""

    def __init__(self, sq_norms, mean, diagonals=None):
        self.N, self.P = sq_norms.shape[0], mean.shape[0]
        self.sum_sq = float(sq_norms.sum())
        self.mean = mean
        self.diagonals = diagonals

    @property
    def s2(self) -> float:
        """1/(N-1) sum_n ||H_n - H||_F^2 / P."""
        return (self.sum_sq - self.N * float((self.mean**2).sum())) / ((self.N - 1) * self.P)

    def noise(self, B: int) -> float:
        return (1 / B - 1 / self.N) * self.s2

    def paper_expectation(self, B: int) -> float:
        """E over unit probes of Algorithm 1 as printed (with 1/N), times 1/B - 1/N."""
        P, H = self.P, self.mean
        tr, tr_sq = float(torch.trace(H)), float((H**2).sum())
        vhv_sq = (tr**2 + 2 * tr_sq) / (P * (P + 2))
        return (1 / B - 1 / self.N) * (self.sum_sq / (self.N * P) - vhv_sq)


def softmax_regression_exact(model, x, y) -> Exact:
    """H_n = A_n kron (x~ x~^T), A_n = diag(p) - p p^T, x~ = [x, 1] (a permutation of the
    (weight, bias) order; norms, traces and diagonal variances do not see it)."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    xt = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    sq = (A**2).sum((1, 2)) * (xt**2).sum(1) ** 2
    n, c, d = A.shape[0], A.shape[1], xt.shape[1]
    mean = torch.einsum("nab,ni,nj->aibj", A, xt, xt).reshape(c * d, c * d) / n
    diagonals = torch.einsum("na,ni->nai", torch.diagonal(A, dim1=1, dim2=2), xt**2)
    return Exact(sq, mean, diagonals.reshape(n, -1))


def per_sample_hessians(model, loss_fn, x, y, chunk=40):
    """[N, P, P] by torch.func (reverse over reverse), in the model's parameter order."""
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_i(t, xi, yi):
        chunks = torch.split(t, sizes)
        state = {n: c.reshape(p.shape) for (n, p), c in zip(named, chunks)}
        return loss_fn(functional_call(model, state, (xi[None],)), yi[None])

    hess = vmap(jacrev(jacrev(loss_i)), in_dims=(None, 0, 0))
    return torch.cat(
        [hess(theta, x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    )


@pytest.fixture(scope="module")
def logreg():
    x, y = digits(200)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10)).to(torch.float64)
    with torch.no_grad():  # sharper predictions: a less uniform noise spectrum
        model[0].weight.mul_(8.0)
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    return est, softmax_regression_exact(model, x, y), (model, loss_fn, x, y)


@pytest.fixture(scope="module")
def mlp():
    x, y = digits(100)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 10)).to(torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    Hs = per_sample_hessians(model, loss_fn, x, y)
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    return est, Exact((Hs**2).sum((1, 2)), Hs.mean(0)), (model, loss_fn, x, y)


def test_softmax_regression_closed_form_is_the_hessian(logreg):
    _, exact, (model, loss_fn, x, y) = logreg
    Hs = per_sample_hessians(model, loss_fn, x[:3], y[:3])
    c, d = 10, 65
    perm = torch.tensor([a * 64 + j if j < 64 else 640 + a for a in range(c) for j in range(d)])
    A = exact.diagonals[:3].reshape(3, c, d)  # diag(A_n) kron x~^2
    assert torch.allclose(
        torch.diagonal(Hs[:, perm][:, :, perm], dim1=1, dim2=2), A.reshape(3, -1), atol=1e-12
    )
    sq = (Hs**2).sum((1, 2))
    ref = softmax_regression_exact(model, x[:3], y[:3])
    assert ref.sum_sq == pytest.approx(float(sq.sum()), rel=1e-12)
    assert torch.allclose(ref.mean, Hs.mean(0)[perm][:, perm], atol=1e-13)


@pytest.mark.parametrize("case", ["logreg", "mlp"])
def test_unbiased_mean_and_honest_stderr(case, request):
    est, exact, _ = request.getfixturevalue(case)
    B = 16
    truth = exact.noise(B)
    runs = [noise_variance(est, batch_size=B, n_probes=8, seed=s) for s in SEEDS]
    values = torch.tensor([r.value for r in runs])
    se = float(values.std() / math.sqrt(len(values)))
    assert abs(float(values.mean()) - truth) < 3 * se
    z = torch.tensor([(r.value - truth) / r.stderr for r in runs])
    assert 0.5 < float(z.std()) < 1.8  # t with 7 dof has sd 1.18
    mean_stderr = sum(r.stderr for r in runs) / len(runs)
    assert 0.5 < mean_stderr / float(values.std()) < 2.0


def test_result_fields_and_counts(logreg):
    est = logreg[0]
    before = est.n_matvecs
    res = est.noise_variance(batch_size=16, n_probes=5, seed=3)
    assert (res.batch_size, res.n_samples, res.n_groups, res.n_matvecs) == (16, 200, 200, 1000)
    assert (res.method, res.source) == ("unbiased", "matvec")
    assert res.per_probe.shape == (5,) and res.value == pytest.approx(float(res.per_probe.mean()))
    assert res.stderr == pytest.approx(float(res.per_probe.std()) / math.sqrt(5))  # whole data
    assert est.n_matvecs - before == 1000
    assert float(res) == res.damping == res.value
    again = est.noise_variance(batch_size=16, n_probes=5, seed=3)
    assert torch.equal(again.per_probe, res.per_probe)


def test_group_jackknife_equals_leaving_each_group_out(logreg):
    from curvlab.noise import probe_statistics

    est = logreg[0]
    v = torch.randn(est.num_params, dtype=est.dtype, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    for g in (1, 8):
        U = est.group_matvecs(v, g)
        n = U.shape[0]

        def s2(rows):
            return float(((rows - rows.mean(0)) ** 2).sum() / (rows.shape[0] - 1))

        left_out = torch.tensor([s2(torch.cat([U[:j], U[j + 1 :]])) for j in range(n)])
        brute = float((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum())
        stats = probe_statistics(est, v[None], g)
        # the brute force subtracts nearly equal leave-one-out values: ~1e-6 relative roundoff
        assert float(stats.group_variance()[0]) == pytest.approx(brute, rel=1e-5)
        assert float(stats.centred[0]) / (n - 1) == pytest.approx(s2(U), rel=1e-12)


def test_standard_error_parts_follow_the_population(logreg):
    est = logreg[0]
    whole = est.noise_variance(batch_size=16, n_probes=4, seed=0)  # the whole population
    assert whole.stderr_groups == 0 and whole.stderr == pytest.approx(whole.stderr_probes)
    iid = est.noise_variance(batch_size=16, n_probes=4, seed=0, population=math.inf)
    assert iid.stderr_groups > 0 and iid.stderr_probes == pytest.approx(
        whole.stderr_probes * iid.value / whole.value
    )
    assert iid.stderr == pytest.approx(math.hypot(iid.stderr_probes, iid.stderr_groups))
    one = est.noise_variance(batch_size=16, n_probes=1, seed=0, population=math.inf)
    assert math.isfinite(one.stderr) and 0 < one.stderr < one.value  # the groups' spread
    assert math.isnan(est.noise_variance(batch_size=16, n_probes=1, seed=0).stderr)


def test_two_groups_of_the_whole_population_keep_the_probe_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 1, generator=gen, dtype=torch.float64)
    est = curvlab.estimator("autograd", nn.Linear(3, 1).double(), nn.MSELoss(), (x, y))
    got = est.noise_variance(batch_size=2, group_size=2, n_probes=10)
    assert got.n_groups == 2 and got.stderr_groups == 0  # every sample held: no sampling
    assert math.isfinite(got.stderr) and got.stderr == got.stderr_probes > 0


def test_population_sets_the_finite_population_factor(logreg):
    est, _, _ = logreg
    finite = noise_variance(est, batch_size=16, n_probes=3, seed=1)
    iid = noise_variance(est, batch_size=16, n_probes=3, seed=1, population=math.inf)
    assert iid.value / finite.value == pytest.approx((1 / 16) / (1 / 16 - 1 / 200), rel=1e-12)
    full = noise_variance(est, batch_size=200, n_probes=3, seed=1)
    assert full.value == 0.0


def test_vmapped_probes_equal_a_loop(mlp):
    est, _, (model, loss_fn, x, y) = mlp
    looped = curvlab.estimator("autograd", model, loss_fn, (x, y), vectorize=False)
    a = noise_variance(est, batch_size=8, n_probes=3, seed=2)
    b = noise_variance(looped, batch_size=8, n_probes=3, seed=2)
    assert torch.allclose(a.per_probe, b.per_probe, rtol=1e-10, atol=0)


def test_paper_algorithm_has_the_predicted_bias_on_a_spiked_case():
    """Linear regression with MSE: H_n = 2 x_n x_n^T with x_n = mu + 0.1 eps_n, so the mean
    Hessian has a spike 2 ||mu||^2 above a small bulk and the per-sample noise is small.

    Algorithm 1 as printed subtracts (v^T H v)^2 instead of ||H v||^2; its expectation is
    the exact paper_expectation (excess P/(P+2) x spectral variance of H), far above the
    truth, which the unbiased estimator recovers.
    """
    P, N, B = 60, 150, 10
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(P, generator=gen, dtype=torch.float64)
    mu = 5.0 * mu / mu.norm()
    x = mu + 0.1 * torch.randn(N, P, generator=gen, dtype=torch.float64)
    y = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(P, 1, bias=False).to(torch.float64)
    est = curvlab.estimator("autograd", model, nn.MSELoss(), (x, y))
    Hs = 2 * x[:, :, None] * x[:, None, :]
    exact = Exact((Hs**2).sum((1, 2)), Hs.mean(0))
    truth, predicted = exact.noise(B), exact.paper_expectation(B)
    assert predicted > 10 * truth
    paper = noise_variance(est, batch_size=B, n_probes=300, method="paper", seed=0)
    unbiased = noise_variance(est, batch_size=B, n_probes=300, seed=0)
    assert paper.method == "paper"
    assert abs(paper.value - predicted) < 3 * paper.stderr
    assert abs(unbiased.value - truth) < 3 * unbiased.stderr
    assert paper.value > 3 * unbiased.value


def test_per_sample_and_per_batch_routes_agree(logreg):
    """Groups of B (a fresh random order per seed through subsample=N) estimate S2 / B."""
    est, exact, _ = logreg
    B, N = 20, exact.N
    truth = exact.noise(B)
    seeds = range(16)
    per_sample = torch.tensor(
        [noise_variance(est, batch_size=B, n_probes=2, seed=s).value for s in seeds]
    )
    per_batch = torch.tensor(
        [
            noise_variance(est, batch_size=B, n_probes=2, group_size=B, subsample=N, seed=s).value
            for s in seeds
        ]
    )
    se = [float(v.std()) / math.sqrt(len(seeds)) for v in (per_sample, per_batch)]
    assert abs(float(per_batch.mean()) - truth) < 3 * se[1]
    assert abs(float(per_sample.mean()) - truth) < 3 * se[0]
    diff = abs(float(per_batch.mean() - per_sample.mean()))
    assert diff < 3 * math.hypot(*se)


def test_subsample_is_unbiased_and_reproducible(mlp):
    est, exact, _ = mlp
    truth = exact.noise(8)
    runs = [noise_variance(est, batch_size=8, n_probes=4, subsample=60, seed=s) for s in SEEDS]
    values = torch.tensor([r.value for r in runs])
    assert all(r.n_samples == 60 and r.n_groups == 60 for r in runs)
    assert abs(float(values.mean()) - truth) < 3 * float(values.std()) / math.sqrt(len(values))
    again = noise_variance(est, batch_size=8, n_probes=4, subsample=60, seed=0)
    assert torch.equal(again.per_probe, runs[0].per_probe)


def test_subsample_by_indices_equals_an_estimator_on_those_samples(mlp):
    est, _, (model, loss_fn, x, y) = mlp
    idx = torch.tensor([5, 17, 3, 99, 42, 64, 11, 80, 7, 33])
    sub = curvlab.estimator("autograd", model, loss_fn, (x[idx], y[idx]))
    a = noise_variance(est, batch_size=4, n_probes=3, subsample=idx, population=100, seed=4)
    b = noise_variance(sub, batch_size=4, n_probes=3, population=100, seed=4)
    assert torch.allclose(a.per_probe, b.per_probe, rtol=1e-12, atol=0)


def test_diagonal_source_matches_exact_diagonal_variances(logreg):
    pytest.importorskip("backpack")
    _, exact, (model, loss_fn, x, y) = logreg
    est = curvlab.estimator("backpack", model, loss_fn, (x, y))
    B = 16
    D = exact.diagonals
    truth = (1 / B - 1 / exact.N) * float(D.var(dim=0).sum())
    res = noise_variance(est, batch_size=B, source="diagonal", n_probes=5)
    assert res.value == pytest.approx(truth, rel=1e-9)
    assert res.source == "diagonal" and res.per_probe.shape == (5,)
    assert 0 < res.stderr < res.value
    with pytest.raises(UnsupportedCapabilityError, match="per-sample diagonal"):
        noise_variance(logreg[0], source="diagonal")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "exact"}, "method"),
        ({"source": "lanczos"}, "source"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 500}, "population"),
        ({"n_probes": 0}, "n_probes"),
        ({"group_size": 150}, "at least 2"),
        ({"subsample": 1}, "subsample"),
        ({"subsample": torch.tensor([1, 1, 2])}, "distinct"),
        ({"subsample": torch.tensor([0, 500])}, r"\[0, 200\)"),
        ({"source": "diagonal", "group_size": 2}, "group_size=1"),
    ],
)
def test_bad_input_raises(logreg, kwargs, match):
    est = logreg[0]
    with pytest.raises(InvalidInputError, match=match):
        noise_variance(est, **{"batch_size": 16, "n_probes": 2, **kwargs})


@CUDA
def test_cuda_agrees_with_cpu_within_the_standard_errors(mlp):
    from curvlab.damping import LinearShrinkageDamper

    est, _, (model, loss_fn, x, y) = mlp
    model = copy.deepcopy(model).cuda()
    gpu = curvlab.estimator("autograd", model, loss_fn, (x.cuda(), y.cuda()))
    a = noise_variance(est, batch_size=8, n_probes=20, seed=0)
    b = noise_variance(gpu, batch_size=8, n_probes=20, seed=0)  # CUDA's own random stream
    assert abs(a.value - b.value) < 4 * math.hypot(a.stderr, b.stderr)
    sub = noise_variance(gpu, batch_size=8, n_probes=2, subsample=50, method="paper", seed=0)
    assert sub.n_samples == 50 and math.isfinite(sub.value)
    damper = LinearShrinkageDamper(update_every=1, batch_size=8, subsample=40)
    damper.step(model, loss_fn, (x.cuda(), y.cuda()))
    assert damper.history[0].accepted


def test_not_an_estimator_raises():
    with pytest.raises(InvalidInputError, match="CurvatureEstimator"):
        noise_variance(torch.eye(3))


def test_any_object_with_the_estimators_attributes_works():
    """noise duck-types its estimator (no import of curvlab.estimator): explicit per-sample
    matrices give the closed form (1/B - 1/N) sum_n ||M_n - M||_F^2 / ((N - 1) P)."""
    from curvlab.shrinkage import PerSampleMatrices

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(30, 12, 12, generator=gen, dtype=torch.float64)
    M = (G + G.transpose(1, 2)) / 2
    N, P, B = 30, 12, 5
    exact = (1 / B - 1 / N) * float(((M - M.mean(0)) ** 2).sum()) / ((N - 1) * P)
    got = noise_variance(PerSampleMatrices(M), batch_size=B, n_probes=400, seed=1)
    assert abs(got.value - exact) < 4 * got.stderr and got.stderr < 0.1 * exact
    with pytest.raises(InvalidInputError, match="has no subset"):
        noise_variance(PerSampleMatrices(M), batch_size=B, subsample=10)
    with pytest.raises(InvalidInputError, match="has no num_params, num_samples"):
        noise_variance(torch.eye(3))


def test_train_mode_batchnorm_groups_smaller_than_the_batch_warn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y))
    with pytest.warns(curvlab.CurvlabWarning, match="BatchNorm.*own statistics"):
        est.noise_variance(batch_size=12, n_probes=1, group_size=4)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.noise_variance(batch_size=12, n_probes=1, group_size=4)
