"""Bad input gets a CurvlabError that says what to do, and the model is left as it was."""

import pytest
import torch
from helpers import assert_state_equal, make_data, make_model, model_state

import curvlab
from curvlab import (
    BackendUnavailableError,
    CurvlabError,
    InvalidInputError,
    NumericalError,
    UnsupportedCapabilityError,
    UnsupportedModelError,
)


@pytest.fixture
def setup():
    model = make_model("tanh_mlp")
    x, y = make_data("tanh_mlp")
    return model, torch.nn.CrossEntropyLoss(), x, y


def test_hierarchy():
    for cls in (
        InvalidInputError,
        UnsupportedCapabilityError,
        UnsupportedModelError,
        BackendUnavailableError,
        NumericalError,
    ):
        assert issubclass(cls, CurvlabError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(BackendUnavailableError, ImportError)


def check(setup, exc, match, **kwargs):
    model, loss_fn, x, y = setup
    args = dict(backend="autograd", model=model, loss_fn=loss_fn, data=(x, y))
    args.update(kwargs)
    before = model_state(model)
    with pytest.raises(exc, match=match):
        curvlab.estimator(**args)
    assert_state_equal(before, model_state(model))


def test_non_scalar_loss(setup):
    check(setup, InvalidInputError, "scalar", loss_fn=lambda out, y: (out - 1) ** 2)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_loss_not_mean_reduced(setup, reduction):
    check(
        setup,
        InvalidInputError,
        "reduction='mean'",
        loss_fn=torch.nn.CrossEntropyLoss(reduction=reduction),
    )


def test_callable_summing_over_samples(setup):
    def summed(out, y):
        return torch.nn.functional.cross_entropy(out, y, reduction="sum")

    check(setup, InvalidInputError, "average", loss_fn=summed)


def test_callable_mean_loss_is_accepted(setup):
    model, _, x, y = setup
    est = curvlab.estimator("autograd", model, torch.nn.functional.cross_entropy, (x, y))
    assert est.num_samples == x.shape[0]


def test_no_trainable_parameters(setup):
    model = setup[0]
    model.requires_grad_(False)
    check(setup, InvalidInputError, "no trainable parameters")


def test_params_not_in_model(setup):
    check(
        setup,
        InvalidInputError,
        "parameters of the model",
        params=[torch.nn.Parameter(torch.ones(2))],
    )


@pytest.mark.parametrize(
    "data", [[], (torch.ones(0, 5, dtype=torch.float64), torch.ones(0).long())]
)
def test_empty_data(setup, data):
    check(setup, InvalidInputError, "empty", data=data)


def test_mismatched_sample_counts(setup):
    _, _, x, y = setup
    check(setup, InvalidInputError, "samples", data=(x, y[:-1]))


def test_data_not_batches(setup):
    check(setup, InvalidInputError, r"\(x, y\)", data=42)


def test_nan_loss(setup):
    _, _, x, y = setup
    bad = x.clone()
    bad[0, 0] = float("nan")
    check(setup, NumericalError, "nan", data=(bad, y))


def test_nan_loss_in_a_later_batch(setup):
    model, loss_fn, x, y = setup
    bad = x.clone()
    bad[-1, 0] = float("inf")
    est = curvlab.estimator("autograd", model, loss_fn, [(x[:12], y[:12]), (bad[12:], y[12:])])
    with pytest.raises(NumericalError):
        est.matvec(torch.ones(est.num_params, dtype=torch.float64))


def test_unknown_backend(setup):
    check(setup, InvalidInputError, "unknown backend", backend="jax")


def test_unknown_curvature(setup):
    check(setup, InvalidInputError, "unknown curvature", curvature="hessain")


def test_curvature_not_provided_by_backend(setup):
    check(
        setup, UnsupportedCapabilityError, "does not provide", backend="pyhessian", curvature="ggn"
    )


def test_fisher_needs_a_likelihood(setup):
    check(
        setup,
        UnsupportedModelError,
        "likelihood",
        curvature="fisher",
        loss_fn=torch.nn.functional.cross_entropy,
    )


def test_integration_only_backend(setup):
    check(
        setup, (UnsupportedCapabilityError, BackendUnavailableError), "kfac", backend="kfac-pytorch"
    )


def test_model_not_a_module(setup):
    check(setup, InvalidInputError, "nn.Module", model=lambda x: x)


def test_data_on_another_device(setup):
    _, _, x, y = setup
    meta = x.to("meta")
    check(setup, InvalidInputError, "move the data", data=(meta, y))


@pytest.fixture
def est(setup):
    model, loss_fn, x, y = setup
    return curvlab.estimator("autograd", model, loss_fn, (x, y))


def test_vector_wrong_length(est):
    with pytest.raises(InvalidInputError, match=f"\\[{est.num_params}\\]"):
        est.matvec(torch.ones(est.num_params + 1, dtype=torch.float64))


def test_vector_wrong_dtype(est):
    with pytest.raises(InvalidInputError, match="dtype"):
        est.matvec(torch.ones(est.num_params, dtype=torch.float32))


def test_vector_wrong_device(est):
    with pytest.raises(InvalidInputError, match="on meta"):
        est.matvec(torch.ones(est.num_params, dtype=torch.float64, device="meta"))


def test_vector_wrong_rank(est):
    with pytest.raises(InvalidInputError):
        est.matvec(torch.ones(est.num_params, 2, 2, dtype=torch.float64))


def test_group_size_invalid(est):
    v = torch.ones(est.num_params, dtype=torch.float64)
    for bad in (0, -1, 1.5, est.num_samples + 1):
        with pytest.raises(InvalidInputError):
            est.group_matvecs(v, bad)
    with pytest.raises(InvalidInputError):
        est.group_matvecs(torch.ones(est.num_params, 2, 2, dtype=torch.float64), 1)


def test_to_dense_size_guard(est):
    with pytest.raises(InvalidInputError, match="max_params"):
        est.to_dense(max_params=10)


def test_errors_leave_model_unchanged_after_use(setup):
    model, loss_fn, x, y = setup
    before = model_state(model)
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    for bad in (torch.ones(3), torch.ones(est.num_params, dtype=torch.float32)):
        with pytest.raises(InvalidInputError):
            est.matvec(bad)
    assert_state_equal(before, model_state(model))
