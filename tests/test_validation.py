"""curvlab.validation: each check accepts what it promises, normalises it, and refuses the rest
with an InvalidInputError naming the argument, the value and the fix."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import curvlab
from curvlab.errors import InvalidInputError
from curvlab.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_instance,
    check_int,
    check_number,
    check_optional,
    check_positive,
    check_positive_int,
    check_probability,
    check_tensor,
)


def refused(check, *args, **kwargs) -> str:
    with pytest.raises(InvalidInputError) as info:
        check(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------- integers
@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int8(1)])
def test_positive_int_accepts_python_and_numpy_integers(value):
    out = check_positive_int("k", value)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [0, -2, True, False, 2.0, "3", None, torch.tensor(2)])
def test_positive_int_refuses_the_rest_naming_argument_and_value(value):
    message = refused(check_positive_int, "refresh_every", value)
    assert message.startswith("refresh_every must be a positive int, got ")
    assert repr(value)[:20] in message


def test_int_bounds_and_fix_in_the_message():
    assert check_int("verify", 0, minimum=0) == 0
    assert check_int("top_n", 5, minimum=1, maximum=5) == 5
    assert refused(check_int, "n_probes", 1, minimum=2) == "n_probes must be an int >= 2, got 1"
    assert refused(check_int, "top_n", 6, minimum=1, maximum=5) == (
        "top_n must be an int in [1, 5], got 6"
    )
    message = refused(check_int, "n_probes", 1, minimum=2, fix="pass 2 or more probes")
    assert message.endswith("; pass 2 or more probes")
    # a wrong type shows the type: "2.0" alone would look like a valid count
    assert refused(check_int, "k", 2.0, minimum=1) == "k must be a positive int, got 2.0 (float)"


# ---------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (0.5, 0.5), (np.float32(0.25), 0.25), (torch.tensor(2.0), 2.0),
     (np.array(3.0), 3.0)],
)
def test_number_accepts_real_scalars(value, expected):
    out = check_number("lr", value)
    assert out == expected and type(out) is float


@pytest.mark.parametrize("value", [True, "0.1", None, torch.ones(2), 1j, [0.1]])
def test_number_refuses_non_reals_with_their_type(value):
    message = refused(check_number, "lr", value)
    assert message.startswith("lr must be a finite number, got ")
    assert f"({type(value).__name__})" in message


def test_number_bounds_open_and_closed():
    assert check_number("x", 0.0, low=0.0) == 0.0
    assert "x must be a finite number > 0, got 0.0" == refused(
        check_number, "x", 0.0, low=0.0, low_open=True
    )
    assert check_number("x", 1.0, high=1.0) == 1.0
    assert "in [0, 1)" in refused(check_number, "x", 1.0, low=0, high=1, high_open=True)
    assert "in (0, 1]" in refused(check_number, "x", 0.0, low=0, high=1, low_open=True)
    assert check_number("x", math.inf, low=0, finite=False) == math.inf


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_refused(value):
    assert refused(check_positive, "tol", value) == f"tol must be a finite number > 0, got {value}"


def test_nan_refused_even_without_finiteness():
    assert "got nan" in refused(check_number, "x", math.nan, finite=False)


def test_probability_is_half_open_unless_one_is_allowed():
    assert check_probability("momentum", 0) == 0.0
    assert check_probability("momentum", 0.999) == 0.999
    assert refused(check_probability, "momentum", 1.0) == (
        "momentum must be a finite number in [0, 1), got 1.0"
    )
    assert check_probability("shrinkage", 1.0, include_one=True) == 1.0
    assert "got -0.1" in refused(check_probability, "shrinkage", -0.1, include_one=True)


# ---------------------------------------------------------------------- the rest
def test_choice_is_exact_and_lists_the_options():
    assert check_choice("which", "both", ("largest", "smallest", "both")) == "both"
    assert check_choice("cache", True, (True, False, "auto")) is True
    assert refused(check_choice, "cache", 1, (True, False, "auto")) == (
        "cache must be one of True, False, 'auto', got 1"
    )
    assert refused(check_choice, "which", "Largest", ("largest", "smallest")) == (
        "which must be one of 'largest', 'smallest', got 'Largest'"
    )


def test_callable_bool_instance_and_optional():
    assert check_callable("fn", len) is len
    assert "(int)" in refused(check_callable, "fn", 3)
    assert check_bool("flag", False) is False
    assert refused(check_bool, "flag", 1) == "flag must be True or False, got 1 (int)"
    assert check_bool("progress", None, allow_none=True) is None
    assert "None, True or False" in refused(check_bool, "progress", "yes", allow_none=True)
    model = torch.nn.Linear(2, 1)
    assert check_instance("model", model, torch.nn.Module) is model
    assert refused(check_instance, "model", "mlp", torch.nn.Module) == (
        "model must be a Module, got 'mlp' (str)"
    )
    assert check_optional(check_positive_int, "k", None) is None
    assert check_optional(check_positive_int, "k", 4) == 4
    assert "k must be a positive int" in refused(check_optional, check_positive_int, "k", 0)


def test_tensor_checks_each_property_and_says_how_to_fix():
    v = torch.zeros(4, 2)
    assert check_tensor("v", v, ndim=(1, 2), shape=(4, None), dtype=torch.float32,
                        device="cpu", floating=True, finite=True) is v
    assert "convert it with torch.as_tensor" in refused(check_tensor, "v", np.zeros(3))
    assert "v must be 1-D, got shape (4, 2)" == refused(check_tensor, "v", v, ndim=1)
    assert "v must have shape [3, *], got (4, 2)" == refused(check_tensor, "v", v, shape=(3, None))
    assert refused(check_tensor, "v", v, dtype=torch.float64).endswith("use v.to(torch.float64)")
    assert "floating point" in refused(check_tensor, "idx", torch.arange(3), floating=True)
    bad = torch.tensor([1.0, math.nan])
    assert "NaN or infinite" in refused(check_tensor, "v", bad, finite=True)
    if torch.cuda.is_available():
        assert "must be on cuda" in refused(check_tensor, "v", v, device="cuda")


def test_errors_are_value_errors_for_generic_handlers():
    with pytest.raises(ValueError):
        check_positive_int("k", 0)


def test_no_inline_int_checks_left():
    """The "isinstance(x, bool) or not isinstance(x, int) or x < k" idiom lives only here, in
    curvlab.validation: the core, the adapters and the experiments call it (curvlab/damping,
    finished separately, is not scanned yet)."""
    idiom = re.compile(r"isinstance\((\w[\w.]*), bool\) or not isinstance\(\1, ")
    root = Path(curvlab.__file__).resolve().parent
    folders = [root, root.parent / "adapters", root.parent / "experiments"]
    files = [p for folder in folders if folder.is_dir() for p in folder.rglob("*.py")
             if p.name != "validation.py" and "damping" not in p.parts]
    assert len(files) > 50
    offenders = [f"{p.name}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if idiom.search(line)]
    assert offenders == []
