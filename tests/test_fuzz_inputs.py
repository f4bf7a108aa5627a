"""Bad input to public entry points gets a CurvlabError, never a raw traceback (hypothesis).

Each test draws arguments from a mix of valid and invalid values; a call either works or
raises a :class:`curvlab.CurvlabError` (whose subclasses also derive from ValueError,
TypeError-like built-ins where that fits). Anything else is a defect.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import curvlab
from curvlab import CurvlabError

F64 = torch.float64
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["hessian", "ggn", "largest", "hutch++", "unbiased", "train", "auto"]),
    st.lists(st.integers(0, 3), max_size=3),
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def _data(n=6):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen, dtype=F64), torch.randint(0, 2, (n,), generator=gen)


@pytest.fixture(scope="module")
def est():
    return curvlab.estimator("autograd", _model(), nn.CrossEntropyLoss(), _data())


def _works_or_refuses(call):
    try:
        call()
    except CurvlabError:
        pass


TENSORS = st.sampled_from(
    [
        "ok", "ok32", "int", "short", "long_x", "labels_float", "labels_out_of_range",
        "labels_2d", "y_short", "nan_x", "empty", "scalar", "numpy", "list", "dataset",
        "three", "loader_bad",
    ]
)


def _bad_data(kind: str):
    x, y = _data()
    return {
        "ok": (x, y),
        "ok32": (x.float(), y),
        "int": (x.long(), y),
        "short": (x[:, :2], y),
        "long_x": (torch.randn(6, 5, dtype=F64), y),
        "labels_float": (x, y.to(F64)),
        "labels_out_of_range": (x, y + 5),
        "labels_2d": (x, y[:, None]),
        "y_short": (x, y[:3]),
        "nan_x": (x * math.nan, y),
        "empty": (x[:0], y[:0]),
        "scalar": (torch.tensor(1.0), torch.tensor(1)),
        "numpy": (x.numpy(), y.numpy()),
        "list": [x.tolist(), y.tolist()],
        "dataset": torch.utils.data.TensorDataset(x, y),
        "three": (x, y, y),
        "loader_bad": [(x, y), (x,)],
    }[kind]


@FUZZ
@given(
    backend=st.sampled_from(["autograd", "pyhessian", "backpack", "kfac", "nope", 3]),
    curvature=st.one_of(st.sampled_from(["hessian", "ggn", "fisher", "ef"]), ANY),
    data=TENSORS,
    loss=st.sampled_from(["ce", "sum", "none", "mse", "callable_sum", "not_callable"]),
    options=st.dictionaries(
        st.sampled_from(["mode", "seed", "cache", "distributed", "params"]), ANY, max_size=2
    ),
)
def test_estimator_construction(backend, curvature, data, loss, options):
    loss_fn = {
        "ce": nn.CrossEntropyLoss(),
        "sum": nn.CrossEntropyLoss(reduction="sum"),
        "none": nn.CrossEntropyLoss(reduction="none"),
        "mse": nn.MSELoss(),
        "callable_sum": lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"),
        "not_callable": 3,
    }[loss]
    _works_or_refuses(
        lambda: curvlab.estimator(backend, _model(), loss_fn, _bad_data(data), curvature,
                                  **options)
    )


VECTORS = st.sampled_from(
    ["ok", "block", "f32", "short", "3d", "numpy", "list", "nan", "int", "scalar"]
)


def _vector(kind: str, P: int):
    return {
        "ok": torch.ones(P, dtype=F64),
        "block": torch.ones(P, 2, dtype=F64),
        "f32": torch.ones(P),
        "short": torch.ones(P - 1, dtype=F64),
        "3d": torch.ones(P, 2, 2, dtype=F64),
        "numpy": np.ones(P),
        "list": [1.0] * P,
        "nan": torch.full((P,), math.nan, dtype=F64),
        "int": torch.ones(P, dtype=torch.long),
        "scalar": torch.tensor(1.0, dtype=F64),
    }[kind]


@FUZZ
@given(v=VECTORS, group_size=ANY)
def test_products(est, v, group_size):
    vec = _vector(v, est.num_params)
    _works_or_refuses(lambda: est.matvec(vec))
    try:
        est @ vec
    except (CurvlabError, TypeError):  # TypeError: Python's refusal of an operand type
        pass
    _works_or_refuses(lambda: est.group_matvecs(vec, group_size))


@FUZZ
@given(k=ANY, which=ANY, tol=ANY, seed=ANY, n_matvecs=ANY, method=ANY)
def test_spectral_calls(est, k, which, tol, seed, n_matvecs, method):
    _works_or_refuses(lambda: est.eigenpairs(k=k, which=which, tol=tol, seed=seed))
    _works_or_refuses(lambda: est.trace(n_matvecs=n_matvecs, method=method, seed=seed))
    _works_or_refuses(lambda: est.diagonal(method=method, n_matvecs=n_matvecs, seed=seed))
    _works_or_refuses(lambda: est.spectral_density(n_probes=k, n_steps=n_matvecs, seed=seed))


@FUZZ
@given(
    batch_size=ANY, n_probes=ANY, method=ANY, group_size=ANY, population=ANY, subsample=ANY,
    source=ANY,
)
def test_noise_variance(est, batch_size, n_probes, method, group_size, population, subsample,
                        source):
    _works_or_refuses(
        lambda: est.noise_variance(
            batch_size=batch_size, n_probes=n_probes, method=method, group_size=group_size,
            population=population, subsample=subsample, source=source,
        )
    )


@FUZZ
@given(
    X=st.sampled_from(["ok", "1d", "nan", "empty", "complex", "object", "one", "3d", "str"]),
    name=st.sampled_from(["LedoitWolf", "OAS", "RMTLinear", "FixedShrinkage"]),
)
def test_shrinkage_fit(X, name):
    from curvlab import shrinkage

    rng = np.random.default_rng(0)
    data = {
        "ok": rng.standard_normal((10, 3)),
        "1d": rng.standard_normal(10),
        "nan": np.full((10, 3), np.nan),
        "empty": np.zeros((0, 3)),
        "complex": rng.standard_normal((10, 3)) + 1j,
        "object": np.array([[object()] * 3] * 10),
        "one": rng.standard_normal((1, 3)),
        "3d": rng.standard_normal((4, 3, 2)),
        "str": "abc",
    }[X]
    estimator = getattr(shrinkage, name)()
    try:
        estimator.fit(data)
    except (CurvlabError, ValueError, TypeError):  # scikit-learn's own exception types
        pass


@FUZZ
@given(options=st.dictionaries(st.sampled_from(
    ["init", "update_every", "batch_size", "seed", "rule", "estimator", "subsample"]), ANY,
    max_size=3))
def test_damper_construction_and_steps(options):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # floor= is a deprecated keyword
        try:
            damper = curvlab.LinearShrinkageDamper(**options)
        except CurvlabError:
            return
    x, y = _data(12)
    for data in ((x, y), (x[:1], y[:1]), (x * math.nan, y)):
        _works_or_refuses(lambda data=data: damper.step(_model(), nn.CrossEntropyLoss(), data))
    _works_or_refuses(lambda: damper.load_state_dict({"damping": -1}))


@FUZZ
@given(a=ANY, b=ANY)
def test_operator_algebra(est, a, b):
    import operator as op

    for value in (a, b):
        for combine in (op.add, op.mul, op.sub, op.matmul):
            for left, right in ((est, value), (value, est)):
                try:
                    combine(left, right)
                except (CurvlabError, TypeError):  # Python's own refusal of an operand
                    pass


def test_unknown_options_and_float_indices_are_refused(est):
    with pytest.raises(curvlab.InvalidInputError, match=r"no option 'bogus'.*mode"):
        curvlab.estimator("autograd", _model(), nn.CrossEntropyLoss(), _data(), bogus=1)
    with pytest.raises(curvlab.InvalidInputError, match="integer tensor"):
        est.subset(torch.tensor([0.5, 1.0]))
    with pytest.raises(curvlab.InvalidInputError, match=r"mask\.nonzero\(\)"):
        est.subset(torch.tensor([True, False]))  # a mask, not the indices [1, 0]
