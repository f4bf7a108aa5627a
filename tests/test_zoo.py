"""The case zoo across backend x curvature x dtype x model mode (issue 11).

Every combination either equals its reference built without curvlab (tests/references.py:
dense torch.func/autograd matrices on the concatenated data, per-group dense matrices for
group products, curvlinops' own KFAC/EKFAC operators for the kfac backend) to 1e-10
(float64) or 1e-4 (float32) relative to the norm of the reference product, or raises the
CurvlabError subclass the case expects (tests/cases.py). Every call leaves the user's model
(parameters, buffers, .grad, modes, hooks) and the global RNG as found.
"""

from __future__ import annotations

import pytest
import torch
from cases import BACKENDS, case_modes
from helpers import assert_state_equal, model_state
from references import DenseReference, kfac_operator

import curvlab

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-4}
DTYPES = [pytest.param(F64, id="f64"), pytest.param(F32, id="f32")]
CASE_MODES = [pytest.param(c, m, id=f"{c.name}-{m}") for c, m in case_modes()]
COMBOS = [
    pytest.param(b, c, id=f"{b}-{c}") for b, (_, _, curvs) in BACKENDS.items() for c in curvs
]
GROUP_COMBOS = [
    pytest.param(b, c, id=f"{b}-{c}")
    for b in ("autograd", "backpack")
    for c in BACKENDS[b][2]
]


class RngWatch:
    """Asserts the global CPU RNG is neither advanced nor reseeded between checks."""

    def __init__(self):
        self.state = torch.random.get_rng_state()

    def check(self, what: str) -> None:
        assert torch.equal(self.state, torch.random.get_rng_state()), f"{what} moved the RNG"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def probes(P: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(7), dtype=F64).to(dtype)


def build_estimator(problem, backend: str, curvature: str):
    name, options, _ = BACKENDS[backend]
    return curvlab.estimator(
        name, problem.model, problem.loss_fn, problem.data, curvature=curvature,
        params=problem.params, **options,
    )


def dense(cache, case, mode, dtype, problem) -> DenseReference:
    key = ("dense", case.name, mode, dtype)
    if key not in cache:
        cache[key] = DenseReference(problem.model, problem.loss_fn, problem.batches, problem.names)
    return cache[key]


def full_matrix(cache, case, mode, dtype, problem, curvature) -> torch.Tensor:
    key = ("matrix", case.name, mode, dtype, curvature)
    if key not in cache:
        cache[key] = dense(cache, case, mode, dtype, problem).matrix(curvature)
    return cache[key]


def group_matrices(cache, case, mode, dtype, problem, curvature, group_size) -> torch.Tensor:
    key = ("groups", case.name, mode, dtype, curvature, group_size)
    if key not in cache:
        ref = dense(cache, case, mode, dtype, problem)
        cache[key] = ref.group_matrices(curvature, group_size)
    return cache[key]


def reference_product(cache, case, mode, dtype, problem, backend, curvature, V):
    if backend in ("kfac", "ekfac"):
        key = ("kfac", case.name, mode, dtype, curvature, backend)
        if key not in cache:
            cache[key] = kfac_operator(
                problem.model, problem.loss_fn, problem.batches, problem.names, curvature,
                BACKENDS[backend][1]["approximation"],
            )
        return cache[key](V)
    return full_matrix(cache, case, mode, dtype, problem, curvature) @ V


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,curvature", COMBOS)
@pytest.mark.parametrize("case,mode", CASE_MODES)
def test_matvec_matches_reference_or_refuses(case, mode, backend, curvature, dtype, zoo_cache):
    problem = case.build(dtype, mode)
    expected = case.expect(
        backend, curvature, "matvec", mode, multi_batch=len(problem.batches) > 1
    )
    V = probes(problem.num_params, 3, dtype)
    before = model_state(problem.model)
    if expected is not None:
        with pytest.raises(expected):
            build_estimator(problem, backend, curvature).matvec(V)
        assert_state_equal(before, model_state(problem.model))
        return
    watch = RngWatch()
    est = build_estimator(problem, backend, curvature)
    if isinstance(problem.data, tuple | list):  # DataLoaders: test_model_contract
        watch.check("construction")
    watch = RngWatch()
    assert est.num_params == problem.num_params
    got = est.matvec(V)
    single = est.matvec(V[:, 0])
    watch.check("matvec")
    assert_state_equal(before, model_state(problem.model))
    assert got.dtype == dtype and got.shape == V.shape
    ref = reference_product(zoo_cache, case, mode, dtype, problem, backend, curvature, V)
    assert rel_err(got, ref) <= TOL[dtype]
    assert rel_err(single, ref[:, 0]) <= TOL[dtype]


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,curvature", GROUP_COMBOS)
@pytest.mark.parametrize("case,mode", CASE_MODES)
def test_group_rows_match_per_group_reference_or_refuse(
    case, mode, backend, curvature, dtype, group_size, zoo_cache
):
    problem = case.build(dtype, mode)
    expected = case.expect(backend, curvature, "group", mode, group_size)
    construct = case.expect(
        backend, curvature, "matvec", mode, multi_batch=len(problem.batches) > 1
    )
    V = probes(problem.num_params, 2, dtype)
    before = model_state(problem.model)
    if expected is not None:
        with pytest.raises(expected):
            est = build_estimator(problem, backend, curvature)
            if backend == "backpack" and group_size == 3:
                assert "group_matvecs" not in est.capabilities
            est.group_matvecs(V, group_size)
        assert_state_equal(before, model_state(problem.model))
        return
    est = build_estimator(problem, backend, curvature)
    if backend == "backpack":
        assert "group_matvecs" in est.capabilities
    watch = RngWatch()
    rows = est.group_matvecs(V, group_size)
    one = est.group_matvecs(V[:, 0], group_size)
    watch.check("group_matvecs")
    assert_state_equal(before, model_state(problem.model))
    n_groups = problem_size(problem) // group_size
    assert rows.shape == (2, n_groups, problem.num_params) and rows.dtype == dtype
    mats = group_matrices(zoo_cache, case, mode, dtype, problem, curvature, group_size)
    ref = torch.einsum("gpq,qk->kgp", mats, V)
    assert rel_err(rows, ref) <= TOL[dtype]
    assert rel_err(one, ref[0]) <= TOL[dtype]
    if backend == "autograd":
        assert est.vectorize is True  # the vmapped path, not the loop fallback
    coupled = case.batchnorm and mode == "train"  # groups are their own mini-batches
    if problem_size(problem) % group_size == 0 and construct is None and not coupled:
        # rows average to the full product
        assert rel_err(rows.mean(1), est.matvec(V).T) <= TOL[dtype]


def problem_size(problem) -> int:
    return sum(int(x.shape[0]) for x, _ in problem.batches)


@pytest.mark.parametrize("backend", ["pyhessian", "kfac"])
@pytest.mark.parametrize("case,mode", CASE_MODES)
def test_backends_without_group_products_refuse_them(case, mode, backend):
    curvature = BACKENDS[backend][2][0]
    problem = case.build(F64, mode)
    expected = case.expect(backend, curvature, "group", mode, 2)
    assert expected is not None
    with pytest.raises(expected):
        est = build_estimator(problem, backend, curvature)
        assert "group_matvecs" not in est.capabilities
        est.group_matvecs(probes(problem.num_params, 1, F64)[:, 0], 2)


@pytest.mark.parametrize("backend", ["autograd", "backpack", "pyhessian"])
@pytest.mark.parametrize("case,mode", CASE_MODES)
def test_to_dense_matches_dense_reference(case, mode, backend, zoo_cache):
    curvature = "hessian"
    problem = case.build(F64, mode)
    expected = case.expect(
        backend, curvature, "matvec", mode, multi_batch=len(problem.batches) > 1
    )
    if expected is not None:
        pytest.skip("refused (covered by test_matvec_matches_reference_or_refuses)")
    est = build_estimator(problem, backend, curvature)
    H = est.to_dense()
    ref = full_matrix(zoo_cache, case, mode, F64, problem, curvature)
    assert rel_err(H, ref) <= TOL[F64]
