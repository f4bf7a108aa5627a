"""Issue 17's done-criterion: a newcomer adds a backend, or a shrinkage rule, with one file of
their own plus one registration, and it works through the whole interface.

Each test writes that one file into ``tmp_path``, imports it from there (outside curvlab),
registers it, and checks every public entry point against dense references or closed forms.
The registries are restored afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import dense_hessian, make_data, make_model
from torch import nn

import curvlab
from curvlab import registry
from curvlab.damping import LinearShrinkageDamper
from curvlab.shrinkage import compare, make_rule, rules
from curvlab.shrinkage import registry as rule_registry

CE = nn.CrossEntropyLoss()

BACKEND_FILE = '''
"""A third-party curvlab backend in one file: exact Hessians by dense autograd (tiny models)."""

import torch

from curvlab import CurvatureEstimator


class DenseHessianEstimator(CurvatureEstimator):
    backend = "tiny-dense"
    supported_curvatures = frozenset({"hessian"})
    base_capabilities = frozenset({"matvec", "group_matvecs"})

    def _hessian(self, i, x, y, scale):
        """scale * the Hessian of the summed loss of (x, y), run as batch i (its seed)."""
        shapes = [p.shape for p in self.params]
        sizes = [p.numel() for p in self.params]

        def loss_of(theta):
            parts = theta.split(sizes)
            state = {n: t.reshape(s) for n, t, s in zip(self.param_names, parts, shapes)}
            return scale * self.loss.summed(self.forward_batch(i, state, x), y)

        theta = torch.cat([p.detach().reshape(-1) for p in self.params])
        return torch.autograd.functional.hessian(loss_of, theta)

    def _local_matvec(self, V):
        H = sum(self._hessian(i, x, y, 1.0 / self.normaliser)
                for i, (x, y) in enumerate(self.batches))
        return H @ V

    def _group_matvecs(self, V, group_size):
        x, y = self.concatenated()
        rows = []
        for start in range(0, x.shape[0] - group_size + 1, group_size):
            part = slice(start, start + group_size)
            H = self._hessian(0, x[part], y[part], self.sample_scale / group_size)
            rows.append(V @ H)
        return torch.stack(rows, dim=1)
'''

BACKEND_SPEC = dict(
    name="tiny-dense",
    target="tiny_dense_backend:DenseHessianEstimator",
    requires=(),
    extra=None,
    install_hint=None,
    curvatures=frozenset({"hessian"}),
    capabilities=frozenset({"matvec", "group_matvecs"}),
    description="a third-party test backend: dense autograd Hessians",
)

RULE_FILE = '''
"""A third-party shrinkage rule in one file: halfway toward the identity, rho = 1/2, tau = 1."""

from curvlab.shrinkage import LinearShrinkage, register_rule


class HalfToIdentity(LinearShrinkage):
    def __init__(self, *, n_probes=30, seed=0, store_precision=True, assume_centered=False):
        self.n_probes = n_probes
        self.seed = seed
        self.store_precision = store_precision
        self.assume_centered = assume_centered

    def _rule(self, stats):
        return 0.5, 1.0, None


register_rule("half_to_identity", HalfToIdentity)
'''


def _import_from(tmp_path, monkeypatch, name: str, source: str):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)  # removed again at teardown
    return module


@pytest.fixture
def tiny_backend(tmp_path, monkeypatch):
    """The backend file imported from tmp_path and registered (registry restored after)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    _import_from(tmp_path, monkeypatch, "tiny_dense_backend", BACKEND_FILE)
    curvlab.register(registry.BackendSpec(**BACKEND_SPEC))
    return "tiny-dense"


@pytest.fixture
def problem():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp", n=24)
    return model, x, y


def test_a_third_party_backend_is_listed_and_tabled(tiny_backend):
    info = curvlab.backends()[tiny_backend]
    assert info.available and info.curvatures == {"hessian"}
    row = next(r for r in registry.capability_table().splitlines() if "`tiny-dense`" in r)
    header = registry.capability_table().splitlines()[0]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["hessian"] == "yes" and cells["ggn"] == ""
    assert cells["group_matvecs"] == "yes" and cells["matvec"] == "yes"
    assert cells["extra"] == "core"


def test_products_and_spectral_methods_match_the_dense_hessian(tiny_backend, problem):
    model, x, y = problem
    est = curvlab.estimator(tiny_backend, model, CE, (x, y))
    assert type(est).__module__ == "tiny_dense_backend" and est.backend == tiny_backend
    H = dense_hessian(model, CE, x, y)
    assert torch.allclose(est.to_dense(), H, rtol=0, atol=1e-12)
    values = torch.linalg.eigvalsh(H).flip(0)
    pairs = est.eigenpairs(k=3, tol=1e-10, progress=False)
    assert torch.allclose(pairs.values, values[:3], rtol=0, atol=1e-9)
    trace = est.trace(n_matvecs=H.shape[0], progress=False)  # n >= P: the exact route
    assert trace.value == pytest.approx(float(H.trace()), rel=1e-12)
    assert trace.stderr == 0.0
    diagonal = est.diagonal(progress=False)  # exact: the backend declares none, so columns
    assert torch.allclose(diagonal, H.diagonal(), rtol=0, atol=1e-12)


def test_group_products_and_noise_equal_the_reference_backend(tiny_backend, problem):
    model, x, y = problem
    ours = curvlab.estimator(tiny_backend, model, CE, (x, y))
    ref = curvlab.estimator("autograd", model, CE, (x, y))
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(ours.num_params, 2, dtype=torch.float64, generator=gen)
    rows = ours.group_matvecs(v, group_size=4)
    assert rows.shape == (2, 6, ours.num_params)
    assert torch.allclose(rows, ref.group_matvecs(v, group_size=4), rtol=0, atol=1e-12)
    assert torch.allclose(rows.mean(1), ours.matvec(v).T, rtol=0, atol=1e-12)
    # the same probes (seed) through the same formula: the same noise estimate
    got = ours.noise_variance(batch_size=8, n_probes=6, seed=3)
    want = ref.noise_variance(batch_size=8, n_probes=6, seed=3)
    assert got.value == pytest.approx(want.value, rel=1e-10)
    assert got.stderr == pytest.approx(want.stderr, rel=1e-8)
    # and against the dense per-sample Hessians: (1/B - 1/N) sum_n ||H_n - H||_F^2 / ((N-1) P)
    per_sample = torch.stack([dense_hessian(model, CE, x[i : i + 1], y[i : i + 1])
                              for i in range(x.shape[0])])
    spread = ((per_sample - per_sample.mean(0)) ** 2).sum() / ((x.shape[0] - 1) * ours.num_params)
    exact = float((1 / 8 - 1 / x.shape[0]) * spread)
    assert abs(got.value - exact) < 4 * got.stderr


def test_with_data_and_subset(tiny_backend, problem):
    model, x, y = problem
    est = curvlab.estimator(tiny_backend, model, CE, (x, y))
    x2, y2 = make_data("tanh_mlp", n=10, seed=7)
    other = est.with_data((x2, y2))
    assert type(other) is type(est) and other.num_samples == 10 and est.num_samples == 24
    assert torch.allclose(other.to_dense(), dense_hessian(model, CE, x2, y2), rtol=0, atol=1e-12)
    idx = torch.tensor([3, 0, 17, 9, 11])
    sub = est.subset(idx)
    assert torch.allclose(sub.to_dense(), dense_hessian(model, CE, x[idx], y[idx]),
                          rtol=0, atol=1e-12)


def test_the_damper_uses_the_backend_by_name_or_through_a_factory(tiny_backend, problem):
    model, x, y = problem
    built = []

    def factory(model_, loss_fn, data, curvature="hessian"):
        built.append(curvature)
        return curvlab.estimator(tiny_backend, model_, loss_fn, data, curvature=curvature)

    dampings = []
    for estimator in ("autograd", tiny_backend, factory):
        damper = LinearShrinkageDamper(update_every=1, estimator=estimator, seed=5)
        damper.step(model, CE, (x, y))
        (record,) = damper.history
        assert record.decision == "accept"
        dampings.append(damper.damping)
    assert built == ["hessian"]
    assert dampings[1] == pytest.approx(dampings[0], rel=1e-10)
    assert dampings[2] == pytest.approx(dampings[0], rel=1e-10)


def test_an_unregistered_backend_is_gone_after_the_test():
    assert "tiny-dense" not in curvlab.backends()


# ---------------------------------------------------------------------- shrinkage rules
@pytest.fixture
def half_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(rule_registry, "_RULES", dict(rule_registry._RULES))
    _import_from(tmp_path, monkeypatch, "half_to_identity_rule", RULE_FILE)
    return "half_to_identity"


def test_a_rule_in_one_file_is_made_by_name_and_fits_its_closed_form(half_rule):
    assert half_rule in rules()
    est = make_rule(half_rule, n_probes=4)
    assert type(est).__name__ == "HalfToIdentity" and est.n_probes == 4
    X = np.random.default_rng(0).standard_normal((40, 6))
    fit = make_rule(half_rule).fit(X)
    centred = X - X.mean(0)
    S = centred.T @ centred / X.shape[0]
    np.testing.assert_allclose(fit.covariance_, 0.5 * S + 0.5 * np.eye(6), rtol=0, atol=1e-13)
    assert fit.shrinkage_ == 0.5 and fit.target_scale_ == 1.0 and fit.damping_ == 1.0


def test_compare_takes_the_new_rule_by_name(half_rule):
    # truth I and a target I: the rule halves the raw error, so its squared error is 1/4
    rng = np.random.default_rng(1)
    table = compare(np.eye(8), [half_rule, "ledoit_wolf"], [10, 30], n_repeats=2,
                    samples=rng.standard_normal((300, 8)), progress=False)
    by = {(r["estimator"], r["batch_size"], r["repeat"]): r["frobenius"] for r in table}
    assert {name for name, _, _ in by} == {"raw", half_rule, "ledoit_wolf"}
    for (name, b, rep), value in by.items():
        if name == half_rule:
            assert value == pytest.approx(0.25 * by["raw", b, rep], rel=1e-12)


def test_the_damper_takes_the_new_rule_through_its_public_api(half_rule, problem):
    # delta = tau rho / (1 - rho) = 1 for rho = 1/2, tau = 1, whatever the curvature
    model, x, y = problem
    damper = LinearShrinkageDamper(rule=make_rule(half_rule, n_probes=2), update_every=1)
    damper.step(model, CE, (x, y))
    (record,) = damper.history
    assert record.decision == "accept" and record.estimate == 1.0
    by_name = LinearShrinkageDamper(rule=half_rule, update_every=1)  # the registered name
    by_name.step(model, CE, (x, y))
    assert by_name.history[0].estimate == 1.0


def test_rule_registration_refuses_clashes_and_unknown_names(monkeypatch):
    monkeypatch.setattr(rule_registry, "_RULES", dict(rule_registry._RULES))
    from curvlab.errors import InvalidInputError
    from curvlab.shrinkage import OAS, register_rule

    with pytest.raises(InvalidInputError, match="already registered"):
        register_rule("ledoit_wolf", OAS)
    register_rule("ledoit_wolf", OAS, replace=True)
    assert isinstance(make_rule("ledoit_wolf"), OAS)
    with pytest.raises(InvalidInputError, match=r"unknown shrinkage rule 'nope'.*register_rule"):
        make_rule("nope")
    with pytest.raises(InvalidInputError, match="set them on the OAS object"):
        make_rule(OAS(), n_probes=3)
    with pytest.raises(InvalidInputError, match="callable"):
        register_rule("x", 3)
