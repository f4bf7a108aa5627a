"""Lanczos verification cost, float64 bases for float32 products, budget warnings, progress."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import curvlab
from curvlab import DenseOperator, Operator
from curvlab.errors import CurvlabWarning
from curvlab.progress import ProgressEvent
from curvlab.spectral import (
    _budget,
    diagonal,
    eigenpairs,
    spectral_density,
    trace,
    trace_of_square,
)
from curvlab.spectral import lanczos as lanczos_module
from curvlab.spectral import slq as slq_module

F64 = torch.float64


def sym(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = evals.numel()
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(R))
    return (Q * evals) @ Q.T


def outliers_and_bulk(P: int = 400, seed: int = 1) -> torch.Tensor:
    """A Hessian-like spectrum: 12 separated outliers over a bulk in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.logspace(2, 0.5, 12, dtype=F64), torch.rand(P - 12, generator=gen)])


# ------------------------------------------------------------------------------ verify
@pytest.mark.parametrize("k", [1, 5])
def test_verification_costs_verify_steps_when_nothing_is_missed(k):
    A = sym(outliers_and_bulk())
    plain = eigenpairs(DenseOperator(A), k=k, verify=False, seed=2)
    checked = eigenpairs(DenseOperator(A), k=k, seed=2)
    assert plain.converged and checked.converged
    assert checked.n_matvecs == plain.n_matvecs + lanczos_module.VERIFY_STEPS
    assert torch.equal(checked.values, plain.values)
    longer = eigenpairs(DenseOperator(A), k=k, verify=12, seed=2)
    assert longer.n_matvecs == plain.n_matvecs + 12


def test_missed_double_top_eigenvalue_is_caught():
    """A double top eigenvalue of a Hessian-like spectrum: at a loose tol one Krylov run
    converges on one copy and reports the next outlier as the second value; the 5-product
    check proves the miss and the deflated run finds the copy."""
    evals = outliers_and_bulk(600)
    evals[1] = evals[0]  # 100, 100, 70.8, ...
    A = sym(evals, seed=3)
    expected = torch.sort(evals, descending=True).values[:3]
    missed = eigenpairs(DenseOperator(A), k=3, tol=1e-3, seed=0, verify=False)
    assert missed.values[1] == pytest.approx(float(expected[2]), rel=1e-6)
    found = eigenpairs(DenseOperator(A), k=3, tol=1e-3, seed=0)
    assert found.converged
    assert torch.allclose(found.values, expected, rtol=1e-6)
    gram = found.vectors.T @ found.vectors
    assert torch.allclose(gram, torch.eye(3, dtype=F64), atol=1e-8)


def test_verify_bad_input():
    op = DenseOperator(sym(outliers_and_bulk()))
    with pytest.raises(curvlab.InvalidInputError, match="verify"):
        eigenpairs(op, k=2, verify=-1)
    with pytest.raises(curvlab.InvalidInputError, match="basis_dtype"):
        eigenpairs(op, k=2, basis_dtype=torch.int64)


# ------------------------------------------------------------------------------ precision
def record_basis(monkeypatch) -> list[torch.Tensor]:
    bases = []
    real = lanczos_module._new_basis

    def new_basis(*args):
        bases.append(real(*args))
        return bases[-1]

    monkeypatch.setattr(lanczos_module, "_new_basis", new_basis)
    return bases


def test_float32_operator_gets_a_float64_row_basis(monkeypatch):
    """float32 products with a float64 basis reach the accuracy of the products (about
    1e-8 relative, before rounding to float32); a float32 basis stops near 1e-6."""
    A = sym(outliers_and_bulk(800)).to(torch.float32)
    truth = torch.linalg.eigvalsh(A.double()).flip(0)[:5]
    bases = record_basis(monkeypatch)
    res = eigenpairs(DenseOperator(A), k=5, tol=2e-7, seed=0)
    assert [(b.dtype, tuple(b.shape)) for b in bases] == [(F64, (21, 800))]
    assert res.converged and res.values.dtype == res.vectors.dtype == torch.float32
    err = ((res.values.double() - truth).abs() / truth).max()
    assert err <= 1e-7, err
    low = eigenpairs(DenseOperator(A), k=5, tol=1e-5, seed=0, basis_dtype=torch.float32)
    assert bases[-1].dtype == torch.float32
    assert ((low.values.double() - truth).abs() / truth).max() <= 1e-5


def test_tol_below_the_products_precision_is_refused():
    op = DenseOperator(sym(outliers_and_bulk()).to(torch.float32))
    with pytest.raises(curvlab.InvalidInputError, match="precision of the operator"):
        eigenpairs(op, k=2, tol=1e-8)
    assert eigenpairs(op, k=2, tol=2e-7).converged


def test_float64_basis_only_when_it_fits(monkeypatch):
    A = sym(outliers_and_bulk()).to(torch.float32)
    bases = record_basis(monkeypatch)
    monkeypatch.setattr(lanczos_module, "fits_budget", lambda nbytes, device: False)
    eigenpairs(DenseOperator(A), k=2)
    assert bases[-1].dtype == torch.float32


# ------------------------------------------------------------------------------ budgets
CALLS = {
    "eigenpairs": lambda op: eigenpairs(op, k=2, progress=False),
    "spectral_density": lambda op: spectral_density(op, n_probes=2, n_steps=5, progress=False),
    "trace": lambda op: trace(op, n_matvecs=12, progress=False),
    "trace_of_square": lambda op: trace_of_square(op, n_matvecs=12, progress=False),
    "diagonal": lambda op: diagonal(op, n_matvecs=12, progress=False),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_memory_warning_names_the_call(monkeypatch, name):
    op = DenseOperator(sym(outliers_and_bulk()))
    monkeypatch.setattr(_budget, "available_memory", lambda device: 1024)
    with pytest.warns(CurvlabWarning, match=rf"{name}.*GiB but only") as record:
        CALLS[name](op)
    assert record[0].filename == __file__  # attributed to the caller, not to curvlab


@pytest.mark.parametrize("name", list(CALLS))
def test_long_call_warning(monkeypatch, name):
    op = DenseOperator(sym(outliers_and_bulk()))
    monkeypatch.setattr(_budget, "LONG_CALL_SECONDS", 0.0)
    with pytest.warns(CurvlabWarning, match=rf"{name} is predicted to take"):
        CALLS[name](op)


@pytest.mark.parametrize("name", list(CALLS))
def test_no_warning_within_budget(name):
    op = DenseOperator(sym(outliers_and_bulk()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CALLS[name](op)


def test_density_probe_batch_follows_the_memory_rule(monkeypatch):
    A = sym(outliers_and_bulk())
    batches = []
    real = slq_module._tridiagonalize

    def tridiagonalize(op, q, *args):
        batches.append(q.shape[1])
        return real(op, q, *args)

    monkeypatch.setattr(slq_module, "_tridiagonalize", tridiagonalize)
    together = spectral_density(DenseOperator(A), n_probes=3, n_steps=20, seed=1)
    assert batches == [3]
    monkeypatch.setattr(slq_module, "fits_budget", lambda nbytes, device: False)
    alone = spectral_density(DenseOperator(A), n_probes=3, n_steps=20, seed=1)
    assert batches == [3, 1, 1, 1]
    assert torch.allclose(together.nodes, alone.nodes, atol=1e-10)


def test_defaults_budget():
    """The defaults' costs (stated in the docstrings) on a P = 400 operator."""
    op = DenseOperator(sym(outliers_and_bulk()))
    assert spectral_density(op).n_matvecs == 4 * 40
    assert trace(op).n_matvecs == trace_of_square(op).n_matvecs == 60
    op.n_matvecs = 0
    diagonal(op)
    assert op.n_matvecs == 100


# ------------------------------------------------------------------------------ progress
@pytest.mark.parametrize("name", list(CALLS))
def test_callback_reports_matvecs_and_progress_false_prints_nothing(capfd, name):
    op = DenseOperator(sym(outliers_and_bulk()))
    events: list[ProgressEvent] = []
    fn = {
        "eigenpairs": eigenpairs,
        "spectral_density": spectral_density,
        "trace": trace,
        "trace_of_square": trace_of_square,
        "diagonal": diagonal,
    }[name]
    kwargs = {"spectral_density": {"n_probes": 2, "n_steps": 5}}.get(name, {})
    fn(op, progress=False, callback=events.append, **kwargs)
    assert events and all(e.desc == name for e in events)
    counts = [e.info["n_matvecs"] for e in events]
    assert counts == sorted(counts) and counts[-1] == op.n_matvecs
    assert [e.done for e in events] == counts
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_eigenpairs_callback_counts_converged_pairs():
    op = DenseOperator(sym(outliers_and_bulk()))
    events: list[ProgressEvent] = []
    res = eigenpairs(op, k=4, progress=False, callback=events.append)
    assert len(events) == res.n_matvecs
    assert events[-1].info == {"n_matvecs": res.n_matvecs, "n_converged": 4}


def test_progress_true_draws_a_bar_on_stderr(capfd):
    pytest.importorskip("tqdm")
    op = DenseOperator(sym(outliers_and_bulk()))
    trace(op, n_matvecs=30, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "trace" in err


# ------------------------------------------------------------------------------ Operator
@pytest.mark.parametrize(
    "method, function",
    [
        ("eigenpairs", eigenpairs),
        ("spectral_density", spectral_density),
        ("trace", trace),
        ("trace_of_square", trace_of_square),
    ],
)
def test_operator_methods_mirror_the_spectral_functions(method, function):
    """Explicit signatures: the same options with the same defaults, nothing hidden."""
    mine = inspect.signature(getattr(Operator, method)).parameters
    theirs = inspect.signature(function).parameters
    assert [p for p in mine if p != "self"] == [p for p in theirs if p != "op"]
    for name, param in mine.items():
        if name != "self":
            assert param.default == theirs[name].default, name
            assert param.kind != inspect.Parameter.VAR_KEYWORD
    doc = getattr(Operator, method).__doc__
    for name in mine:
        if name != "self":
            assert f"{name} :" in doc, name
