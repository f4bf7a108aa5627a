"""Spectral algorithms (curvlab.spectral) against dense eigh / exact traces and diagonals."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from curvlab import DenseOperator, InvalidInputError, NotConvergedWarning
from curvlab._random import make_generator, rademacher
from curvlab.spectral import (
    diagonal,
    eigenpairs,
    lanczos_tridiagonal,
    spectral_density,
    trace,
    trace_of_square,
)
from curvlab.spectral import lanczos as lanczos_module
from curvlab.spectral.slq import quadrature

F64 = torch.float64


def sym(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(evals) Q^T with a Haar-random orthogonal Q."""
    gen = torch.Generator().manual_seed(seed)
    n = evals.numel()
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(R))
    return (Q * evals) @ Q.T


def bulk(n: int, lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)


class HouseholderOperator:
    """A = H diag(d) H^T with H a product of three Householder reflections: O(P) matvecs."""

    def __init__(self, d: torch.Tensor, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.d = d
        self.U = torch.randn(d.numel(), 3, generator=gen, dtype=d.dtype)
        self.U = self.U / self.U.norm(dim=0)
        self.num_params, self.dtype, self.device = d.numel(), d.dtype, d.device
        self.n_matvecs = 0

    def _reflect(self, v, order):
        for i in order:
            u = self.U[:, i : i + 1] if v.ndim == 2 else self.U[:, i]
            v = v - 2 * u * (u * v).sum(0)
        return v

    def matvec(self, v):
        self.n_matvecs += 1 if v.ndim == 1 else v.shape[1]
        w = self._reflect(v, (2, 1, 0))  # H^T v
        w = w * (self.d if v.ndim == 1 else self.d[:, None])
        return self._reflect(w, (0, 1, 2))

    def eigenvectors(self, idx):
        return self._reflect(torch.eye(self.num_params, dtype=self.dtype)[:, idx], (0, 1, 2))


def expected_values(evals: torch.Tensor, k: int, which: str) -> torch.Tensor:
    s = torch.sort(evals, descending=True).values
    if which == "largest":
        return s[:k]
    if which == "smallest":
        return s[-k:]
    return torch.cat([s[: (k + 1) // 2], s[len(s) - k // 2 :]])


# 400 x 400 spectra: the wanted ends hold clusters, exact repeats and both signs.
SPECTRA = {
    "clustered": torch.cat(
        [
            torch.tensor([20.0, 20 - 1e-4, 20 - 2e-4, 15, 15 - 1e-3, 12, 12 - 1e-5, 10, 9, 8.5]),
            -torch.tensor([18.0, 18 - 1e-4, 14, 14 - 1e-3, 14 - 2e-3, 11, 10, 10 - 1e-5, 9, 8]),
            bulk(380, -5.0, 5.0),
        ]
    ).to(F64),
    "repeated": torch.cat(
        [
            torch.tensor([10.0] * 3 + [8.0] * 3 + [6.0] * 2 + [5.5] * 2),
            -torch.tensor([9.0] * 4 + [7.0] * 2 + [6.0] * 3 + [5.0]),
            bulk(380, -3.0, 3.0),
        ]
    ).to(F64),
    "indefinite": torch.cat(
        [torch.linspace(4.0, 12.0, 12), -torch.linspace(3.0, 6.0, 12), bulk(376, -2.0, 2.0)]
    ).to(F64),
}


# ------------------------------------------------------------------------------ eigenpairs
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_eigenpairs_match_eigh(spectrum, which):
    evals = SPECTRA[spectrum]
    A = sym(evals)
    op = DenseOperator(A)
    res = eigenpairs(op, k=10, which=which, tol=1e-6, seed=3)
    expected = expected_values(torch.linalg.eigvalsh(A), 10, which)
    assert res.converged
    assert res.values.dtype == F64 and res.vectors.shape == (400, 10)
    assert torch.all(res.values[:-1] >= res.values[1:])  # descending
    rel = (res.values - expected).abs() / expected.abs()
    assert rel.max() <= 1e-6, rel.max()
    # distinct orthonormal vectors (repeated eigenvalues need every copy)
    gram = res.vectors.T @ res.vectors
    assert torch.allclose(gram, torch.eye(10, dtype=F64), atol=1e-8)
    # the reported residuals are the true ones
    true_res = (A @ res.vectors - res.vectors * res.values).norm(dim=0)
    norm = evals.abs().max()
    assert torch.allclose(res.residuals, true_res, rtol=0, atol=1e-11 * norm)
    assert res.residuals.max() <= 1e-6 * norm
    assert res.n_matvecs == op.n_matvecs


def test_repeated_top_eigenvalue_needs_verification():
    """At a loose tol a separated double eigenvalue converges before roundoff shows its copy."""
    evals = torch.cat([torch.tensor([100.0, 100.0, 50.0]), bulk(397, 0.0, 1.0)]).to(F64)
    A = sym(evals, seed=5)
    found = eigenpairs(DenseOperator(A), k=3, tol=1e-3, seed=0)
    assert found.converged
    assert torch.allclose(found.values, torch.tensor([100.0, 100.0, 50.0], dtype=F64), rtol=1e-6)
    missed = eigenpairs(DenseOperator(A), k=3, tol=1e-3, seed=0, verify=False)
    assert missed.values[1] == pytest.approx(50.0)  # the single-start Krylov space lacks a copy
    assert found.n_matvecs > missed.n_matvecs


def test_invariant_subspace_breakdown_restarts():
    """Three distinct eigenvalues: the Krylov space is invariant after 3 steps."""
    evals = torch.cat([torch.full((4,), 3.0), torch.full((200,), 2.0), torch.full((196,), 1.0)])
    A = sym(evals.to(F64), seed=2)
    op = DenseOperator(A)
    res = eigenpairs(op, k=6, which="both", seed=1)
    assert res.converged
    expected = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0], dtype=F64)
    assert torch.allclose(res.values, expected, atol=1e-10)
    assert torch.allclose(res.vectors.T @ res.vectors, torch.eye(6, dtype=F64), atol=1e-8)
    assert torch.allclose(
        (A @ res.vectors - res.vectors * res.values).norm(dim=0), res.residuals, atol=1e-11
    )


def test_low_rank_operator_zero_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(300, 4, generator=gen, dtype=F64)
    A = B @ B.T
    res = eigenpairs(DenseOperator(A), k=6, seed=0)
    expected = torch.linalg.eigvalsh(A).flip(0)[:6]
    assert res.converged
    assert torch.allclose(res.values, expected, atol=1e-9 * float(expected[0]))


def test_reproducible_with_seed():
    A = sym(SPECTRA["indefinite"])
    a = eigenpairs(DenseOperator(A), k=5, seed=7)
    b = eigenpairs(DenseOperator(A), k=5, seed=7)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    assert a.n_matvecs == b.n_matvecs
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    c = eigenpairs(DenseOperator(A), k=5, seed=gen_a)
    d = eigenpairs(DenseOperator(A), k=5, seed=gen_b)
    assert torch.equal(c.values, d.values)


def test_k100_bounded_memory(monkeypatch):
    """k = 100 on P = 2000: converges with one [ncv + 1, P] basis of contiguous rows and about
    k locked vectors."""
    P, k = 2000, 100
    d = torch.cat([torch.linspace(3.0, 1.0, k), bulk(P - k, 0.0, 0.9)]).to(F64)
    op = HouseholderOperator(d)
    shapes, sizes = [], []
    real_new_basis, real_result = (
        lanczos_module._new_basis,
        lanczos_module._ThickRestartLanczos._result,
    )

    def new_basis(*args):
        basis = real_new_basis(*args)
        shapes.append(tuple(basis.shape))
        return basis

    def result(self, *args, **kwargs):
        sizes.append((self.X.shape[0], self.R.shape[0]))
        return real_result(self, *args, **kwargs)

    monkeypatch.setattr(lanczos_module, "_new_basis", new_basis)
    monkeypatch.setattr(lanczos_module._ThickRestartLanczos, "_result", result)
    res = eigenpairs(op, k=k, seed=0)
    assert res.converged
    ncv = 2 * k + 1
    assert shapes == [(ncv + 1, P)]
    locked, residual_dirs = sizes[0]
    assert locked <= 2 * k and residual_dirs <= 3
    assert torch.allclose(res.values, d[:k], rtol=1e-9)
    overlap = (res.vectors * op.eigenvectors(torch.arange(k))).sum(0).abs()
    assert overlap.min() >= 1 - 1e-8
    assert res.n_matvecs == op.n_matvecs < 10 * ncv


def test_dense_fallback_for_small_operators():
    """P <= 2 ncv (default ncv 20 for k = 4): P identity columns and a dense eigh."""
    A = sym(torch.linspace(-3, 5, 40).to(F64))
    op = DenseOperator(A)
    res = eigenpairs(op, k=4, which="both")
    assert op.n_matvecs == res.n_matvecs == 40 and res.converged
    ref = torch.linalg.eigvalsh(A)
    assert torch.allclose(res.values, torch.cat([ref[-2:].flip(0), ref[:2].flip(0)]), atol=1e-12)
    true_res = (A @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert torch.equal(true_res, res.residuals)


def test_float32_stays_float32():
    A = sym(SPECTRA["indefinite"]).to(torch.float32)
    res = eigenpairs(DenseOperator(A), k=5, tol=1e-5)
    ref = torch.linalg.eigvalsh(A.double()).flip(0)[:5]
    assert res.values.dtype == res.vectors.dtype == res.residuals.dtype == torch.float32
    assert torch.allclose(res.values.double(), ref, rtol=1e-5)


def test_not_converged_warns():
    A = sym(torch.cat([torch.linspace(1.0, 0.999, 10), bulk(390, 0.0, 0.998)]).to(F64))
    with pytest.warns(NotConvergedWarning, match="max_iter"):
        res = eigenpairs(DenseOperator(A), k=10, max_iter=40, ncv=21)
    assert not res.converged and res.n_matvecs == 40


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 0}, {"k": 401}, {"which": "top"}, {"tol": 0.0}, {"ncv": 5}, {"max_iter": 3}],
)
def test_eigenpairs_bad_input(kwargs):
    op = DenseOperator(sym(SPECTRA["indefinite"]))
    with pytest.raises(InvalidInputError):
        eigenpairs(op, **{"k": 10, **kwargs})


def test_not_an_operator():
    with pytest.raises(InvalidInputError, match="DenseOperator"):
        eigenpairs(torch.eye(5), k=1)


# ------------------------------------------------------------------------------ SLQ
def test_lanczos_tridiagonal_basis_and_quadrature():
    A = sym(SPECTRA["indefinite"])
    v0 = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=F64)
    alpha, beta, Q = lanczos_tridiagonal(DenseOperator(A), v0, 12, return_basis=True)
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    assert torch.allclose(Q.T @ Q, torch.eye(12, dtype=F64), atol=1e-12)
    assert torch.allclose(Q.T @ A @ Q, T, atol=1e-12)
    nodes, weights = quadrature(alpha, beta)  # Gauss: exact for degree < 24
    u = v0 / v0.norm()
    for p in (0, 1, 2, 7, 23):
        exact = u @ torch.linalg.matrix_power(A, p) @ u
        assert float((weights * nodes**p).sum()) == pytest.approx(float(exact), rel=1e-9)


def test_lanczos_tridiagonal_breakdown_gives_zero_weights():
    gen = torch.Generator().manual_seed(0)
    A = torch.diag(torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(197)]).to(F64))
    v0 = torch.randn(200, 2, generator=gen, dtype=F64)  # invariant Krylov space after 4 steps
    alpha, beta, Q = lanczos_tridiagonal(DenseOperator(A), v0, 8, return_basis=True)
    assert Q.shape == (200, 8, 2)
    assert torch.all(beta[:, 3] == 0)
    for c in range(2):
        assert torch.allclose(Q[:, :, c].T @ Q[:, :, c], torch.eye(8, dtype=F64), atol=1e-12)
    nodes, weights = quadrature(alpha, beta)
    assert torch.allclose(weights.sum(1), torch.ones(2, dtype=F64))
    u = v0 / v0.norm(dim=0)
    for p in (1, 2, 5):
        exact = ((torch.linalg.matrix_power(A, p) @ u) * u).sum(0)
        assert torch.allclose((weights * nodes**p).sum(1), exact, rtol=1e-8)


def test_density_integrates_to_one_and_moments():
    evals = torch.cat([torch.tensor([30.0, 20, 10]), bulk(497, -1.0, 4.0)]).to(F64)
    A = sym(evals, seed=4)
    op = DenseOperator(A)
    sd = spectral_density(op, n_probes=30, n_steps=40, seed=2)
    assert sd.nodes.shape == sd.weights.shape == (30, 40)
    assert sd.n_matvecs == op.n_matvecs == 30 * 40
    assert torch.allclose(sd.weights.sum(1), torch.ones(30, dtype=F64), atol=1e-12)
    # the broadened density misses at most the Gaussian tails beyond 3 sigma (0.27%)
    mass = torch.trapezoid(sd.density, sd.grid)
    assert 1 - 2.7e-3 <= mass <= 1 + 1e-6
    assert sd.grid[0] == pytest.approx(float(sd.nodes.min()) - 3 * sd.sigma)
    assert sd.sigma == pytest.approx(math.pi / 80 * float(sd.nodes.max() - sd.nodes.min()))
    for power, exact in ((1, evals.sum()), (2, (evals**2).sum())):
        per_probe = (sd.weights * sd.nodes**power).sum(1)
        stderr = per_probe.std() / math.sqrt(30)
        assert abs(per_probe.mean() - exact / 500) <= 4 * stderr
        assert sd.integrate(lambda x, p=power: x**p) == pytest.approx(float(per_probe.mean()))


def semicircle_cdf(x: torch.Tensor) -> torch.Tensor:
    """CDF of the semicircle law on [-2, 2] (density sqrt(4 - x^2) / (2 pi))."""
    x = x.clamp(-2.0, 2.0)
    return 0.5 + x * torch.sqrt(4 - x**2) / (4 * math.pi) + torch.asin(x / 2) / math.pi


def test_goe_matches_semicircle():
    P = 1000
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(P, P, generator=gen, dtype=F64)
    X = (G + G.T) / math.sqrt(2 * P)
    sd = spectral_density(DenseOperator(X), n_probes=20, n_steps=80, seed=1)
    nodes = sd.nodes.reshape(-1)
    weights = (sd.weights / sd.nodes.shape[0]).reshape(-1)
    order = torch.argsort(nodes)
    nodes, weights = nodes[order], weights[order]
    after = torch.cumsum(weights, 0)
    cdf = semicircle_cdf(nodes)
    ks = torch.maximum((after - cdf).abs(), (after - weights - cdf).abs()).max()
    assert ks < 0.03, ks
    # and the broadened density is close to the semicircle away from the edges
    inner = sd.grid.abs() < 1.5
    target = torch.sqrt(4 - sd.grid[inner] ** 2) / (2 * math.pi)
    assert (sd.density[inner] - target).abs().max() < 0.04


def test_log_density():
    evals = torch.logspace(-3, 2, 400, dtype=F64)
    sd = spectral_density(DenseOperator(sym(evals)), n_probes=20, n_steps=60, seed=0)
    assert sd.log_grid is not None
    mass = torch.trapezoid(sd.log_density, sd.log_grid)
    assert 1 - 2.7e-3 <= mass <= 1 + 1e-6
    mean_log = torch.trapezoid(sd.log_grid * sd.log_density, sd.log_grid)
    assert float(mean_log) == pytest.approx(float(evals.log10().mean()), abs=0.1)
    negative = spectral_density(DenseOperator(-sym(evals)), n_probes=4, n_steps=20)
    assert negative.log_grid is None and negative.log_density is None
    no_log = spectral_density(DenseOperator(sym(evals)), n_probes=4, n_steps=20, log_grid=False)
    assert no_log.log_density is None


def test_density_reproducible_and_batched():
    A = sym(SPECTRA["clustered"])
    a = spectral_density(DenseOperator(A), n_probes=6, n_steps=30, seed=5)
    b = spectral_density(DenseOperator(A), n_probes=6, n_steps=30, seed=5, probe_batch=4)
    assert torch.allclose(a.nodes, b.nodes, atol=1e-10)
    assert torch.allclose(a.density, b.density, atol=1e-10)


def test_density_bad_input():
    op = DenseOperator(sym(SPECTRA["clustered"]))
    with pytest.raises(InvalidInputError):
        spectral_density(op, n_probes=0)
    with pytest.raises(InvalidInputError):
        spectral_density(op, sigma=-1.0)


# ------------------------------------------------------------------------------ traces
def low_rank_plus_noise(P=500, rank=15, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    evals = torch.cat(
        [torch.linspace(100.0, 40.0, rank), torch.rand(P - rank, generator=gen, dtype=F64)]
    ).to(F64)
    return sym(evals, seed), evals


@pytest.mark.parametrize("estimator", [trace, trace_of_square])
def test_hutchpp_beats_hutchinson_and_stderr_is_honest(estimator):
    A, evals = low_rank_plus_noise()
    exact = float(evals.sum() if estimator is trace else (evals**2).sum())
    errors, zscores = {}, {}
    for method in ("hutch++", "hutchinson"):
        est = [estimator(DenseOperator(A), n_matvecs=60, method=method, seed=s) for s in range(50)]
        err = torch.tensor([e.value - exact for e in est])
        errors[method] = float((err**2).mean())
        zscores[method] = err / torch.tensor([e.stderr for e in est])
        assert all(e.n_matvecs == 60 for e in est)
    assert errors["hutch++"] < errors["hutchinson"] / 5
    for z in zscores.values():
        assert 0.5 <= float(z.std()) <= 2.0 and abs(float(z.mean())) < 0.75


def test_trace_counts_and_exact_path():
    A, evals = low_rank_plus_noise(P=120)
    op = DenseOperator(A)
    est = trace(op, n_matvecs=31)
    assert est.n_matvecs == op.n_matvecs == 31 and est.samples.numel() == 31 - 20
    exact = trace(DenseOperator(A), n_matvecs=120)
    assert exact.value == pytest.approx(float(evals.sum()), rel=1e-12) and exact.stderr == 0
    sq = trace_of_square(DenseOperator(A), n_matvecs=500)
    assert sq.value == pytest.approx(float((evals**2).sum()), rel=1e-12)


def test_trace_bad_input():
    op = DenseOperator(torch.eye(10, dtype=F64))
    with pytest.raises(InvalidInputError):
        trace(op, method="girard")
    with pytest.raises(InvalidInputError):
        trace(op, n_matvecs=5)  # hutch++ needs at least 6


# ------------------------------------------------------------------------------ diagonal
def xdiag_naive(A: torch.Tensor, Om: torch.Tensor) -> torch.Tensor:
    """XDiag by its definition: leave-one-out bases computed explicitly (EpTW24, sec. 2.4)."""
    s = Om.shape[1]
    Y = A @ Om
    out = torch.zeros(A.shape[0], dtype=A.dtype)
    for i in range(s):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        proj = Qi @ (Qi.T @ A)
        w = Om[:, i]
        out += torch.diagonal(proj) + w * (A @ w - Qi @ (Qi.T @ (A @ w)))
    return out / s


def test_xdiag_equals_definition():
    A, _ = low_rank_plus_noise(P=200, rank=8)
    seed, m = 3, 24
    Om = rademacher((200, m // 2), generator=make_generator(seed), dtype=F64, device="cpu")
    fast = diagonal(DenseOperator(A), method="xdiag", n_matvecs=m, seed=seed)
    assert torch.allclose(fast, xdiag_naive(A, Om), atol=1e-9)


@pytest.mark.parametrize("method", ["xdiag", "hutchinson"])
def test_diagonal_error_decreases(method):
    A, _ = low_rank_plus_noise(P=400, rank=10)
    exact = torch.diagonal(A)
    errors = []
    for m in (10, 40, 160):
        runs = [diagonal(DenseOperator(A), method=method, n_matvecs=m, seed=s) for s in range(4)]
        errors.append(sum(float((r - exact).norm() / exact.norm()) for r in runs) / 4)
    assert errors[0] > errors[1] > errors[2]


def test_xdiag_beats_hutchinson_on_low_rank():
    A, _ = low_rank_plus_noise(P=400, rank=10)
    exact = torch.diagonal(A)
    err = {
        method: float((diagonal(DenseOperator(A), method=method, n_matvecs=60) - exact).norm())
        for method in ("xdiag", "hutchinson")
    }
    assert err["xdiag"] < err["hutchinson"] / 5


def test_diagonal_exact_cases():
    d = torch.linspace(-2, 3, 50, dtype=F64)
    hutch = diagonal(DenseOperator(torch.diag(d)), method="hutchinson", n_matvecs=3)
    assert torch.allclose(hutch, d)  # z * z = 1: exact for a diagonal matrix
    A = sym(d)
    op = DenseOperator(A)
    assert torch.allclose(diagonal(op, n_matvecs=50), torch.diagonal(A)) and op.n_matvecs == 50
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(300, 3, generator=gen, dtype=F64)
    low = B @ B.T  # rank 3 < s: the shifted path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = diagonal(DenseOperator(low), method="xdiag", n_matvecs=40)
    assert (est - torch.diagonal(low)).abs().max() <= 1e-6 * torch.linalg.matrix_norm(low, 2)


def test_diagonal_bad_input():
    op = DenseOperator(torch.eye(10, dtype=F64))
    with pytest.raises(InvalidInputError):
        diagonal(op, method="diag++")
    with pytest.raises(InvalidInputError):
        diagonal(op, n_matvecs=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    A = sym(SPECTRA["indefinite"]).to(dtype)
    cpu, gpu = DenseOperator(A), DenseOperator(A.cuda())
    rtol = 1e-9 if dtype == F64 else 1e-4
    a, b = eigenpairs(cpu, k=5, which="both"), eigenpairs(gpu, k=5, which="both")
    assert b.values.device.type == b.vectors.device.type == "cuda" and b.values.dtype == dtype
    assert torch.allclose(a.values, b.values.cpu(), rtol=rtol)
    sd = spectral_density(gpu, n_probes=4, n_steps=20)
    assert sd.nodes.device.type == "cpu" and sd.nodes.shape == (4, 20)
    for fn in (trace, trace_of_square):
        est = fn(gpu, n_matvecs=30)
        assert abs(est.value - fn(cpu, n_matvecs=400).value) <= 5 * est.stderr + 1e-3
    d = diagonal(gpu, n_matvecs=40)
    assert d.device.type == "cuda" and d.shape == (400,)
