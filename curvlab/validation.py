"""Argument checks shared by every public entry point of curvlab.

Each check returns the validated value (normalised: a numpy integer becomes an ``int``, a
real number a ``float``) or raises :class:`~curvlab.errors.InvalidInputError` with a message
that names the argument, shows the value it got (with its type when the type is wrong) and
says what to pass instead::

    k must be a positive int, got 0
    tol must be a finite number > 0, got nan
    negative must be one of 'abs', 'clamp', got 'abs '
    progress must be True or False, got 1 (int)

``bool`` is never accepted where a number is wanted (``True`` is an ``int`` to Python, a
slip to a user), and strings are never parsed as numbers. Callers add a ``fix`` where the
constraint alone does not say what to do (``"lower n_probes"``). Input arrays of the
scikit-learn-style estimators keep scikit-learn's own messages
(:mod:`curvlab.shrinkage._validation`).

Examples
--------
>>> check_int("k", 5, minimum=1)
5
>>> check_number("tol", 1e-6, low=0, low_open=True)
1e-06
>>> check_int("k", 0, minimum=1)
Traceback (most recent call last):
    ...
curvlab.errors.InvalidInputError: k must be a positive int, got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from curvlab.errors import InvalidInputError

T = TypeVar("T")


def _got(value: Any, show_type: bool) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"got {text} ({type(value).__name__})" if show_type else f"got {text}"


def _fail(name: str, wanted: str, value: Any, fix: str | None, *, show_type: bool = False):
    message = f"{name} must be {wanted}, {_got(value, show_type)}"
    raise InvalidInputError(message + (f"; {fix}" if fix else ""))


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive int"
    if minimum == 0:
        return "a non-negative int"
    if minimum is not None:
        return f"an int >= {minimum}"
    if maximum is not None:
        return f"an int <= {maximum}"
    return "an int"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    fix: str | None = None,
) -> int:
    """``value`` as an ``int`` in [minimum, maximum].

    Parameters
    ----------
    name : str
        The argument's name, as the user wrote it.
    value : Any
        A Python or numpy integer (``bool`` and floats such as ``2.0`` are refused).
    minimum, maximum : int or None, default None
        Inclusive bounds (None: unbounded).
    fix : str or None, default None
        What to do, appended to the message.

    Returns
    -------
    int

    Raises
    ------
    InvalidInputError
        ``value`` is not an integer or lies outside the bounds.

    Examples
    --------
    >>> import numpy as np
    >>> check_int("n_probes", np.int64(3), minimum=2)
    3
    >>> check_int("n_probes", True, minimum=2)
    Traceback (most recent call last):
        ...
    curvlab.errors.InvalidInputError: n_probes must be an int >= 2, got True (bool)
    """
    wanted = _int_range(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, wanted, value, fix, show_type=True)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(name, wanted, value, fix)
    return value


def check_positive_int(name: str, value: Any, *, fix: str | None = None) -> int:
    """``value`` as an ``int`` >= 1 (:func:`check_int` with ``minimum=1``).

    Examples
    --------
    >>> check_positive_int("refresh_every", 10)
    10
    """
    return check_int(name, value, minimum=1, fix=fix)


def _number_range(low, high, low_open: bool, high_open: bool, finite: bool) -> str:
    kind = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def _as_real(value: Any) -> float | None:
    """A float for Python/numpy reals and 0-d real tensors/arrays; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.ndim == 0:
        return None if value.is_complex() or value.dtype == torch.bool else float(value)
    ndim = getattr(value, "ndim", None)
    if ndim == 0 and getattr(getattr(value, "dtype", None), "kind", "") in "iuf":
        return float(value)
    return None


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    fix: str | None = None,
) -> float:
    """``value`` as a ``float`` in the interval from ``low`` to ``high``.

    Parameters
    ----------
    name : str
        The argument's name.
    value : Any
        A real number: Python, numpy, or a 0-d tensor (``bool`` and strings are refused).
    low, high : float or None, default None
        Bounds (None: unbounded).
    low_open, high_open : bool, default False
        Exclude the bound itself (``low=0, low_open=True`` is "> 0").
    finite : bool, default True
        Refuse infinities (NaN is always refused).
    fix : str or None, default None
        What to do, appended to the message.

    Returns
    -------
    float

    Raises
    ------
    InvalidInputError
        Not a real number, NaN, infinite when ``finite``, or out of the bounds.

    Examples
    --------
    >>> check_number("lr", 0.1, low=0, low_open=True)
    0.1
    >>> check_number("decay", 1.0, low=0, high=1, high_open=True)
    Traceback (most recent call last):
        ...
    curvlab.errors.InvalidInputError: decay must be a finite number in [0, 1), got 1.0
    """
    wanted = _number_range(low, high, low_open, high_open, finite)
    number = _as_real(value)
    if number is None:
        _fail(name, wanted, value, fix, show_type=True)
    bad = math.isnan(number) or (finite and math.isinf(number))
    if low is not None:
        bad = bad or number < low or (low_open and number == low)
    if high is not None:
        bad = bad or number > high or (high_open and number == high)
    if bad:
        _fail(name, wanted, value, fix)
    return number


def check_positive(name: str, value: Any, *, fix: str | None = None) -> float:
    """A finite number > 0.

    Examples
    --------
    >>> check_positive("lr", 3)
    3.0
    """
    return check_number(name, value, low=0.0, low_open=True, fix=fix)


def check_nonnegative(name: str, value: Any, *, fix: str | None = None) -> float:
    """A finite number >= 0.

    Examples
    --------
    >>> check_nonnegative("weight_decay", 0)
    0.0
    """
    return check_number(name, value, low=0.0, fix=fix)


def check_probability(
    name: str, value: Any, *, include_one: bool = False, fix: str | None = None
) -> float:
    """A number in [0, 1), or in [0, 1] with ``include_one`` (a decay, a momentum, a
    shrinkage intensity).

    Examples
    --------
    >>> check_probability("momentum", 0.9)
    0.9
    >>> check_probability("shrinkage", 1, include_one=True)
    1.0
    """
    return check_number(name, value, low=0.0, high=1.0, high_open=not include_one, fix=fix)


def check_choice(name: str, value: Any, options: Iterable[T], *, fix: str | None = None) -> T:
    """``value`` if it is one of ``options`` (compared with ``==``).

    Parameters
    ----------
    name : str
        The argument's name.
    value : Any
        The value to check.
    options : iterable
        The allowed values, listed in the message in this order.
    fix : str or None, default None
        What to do, appended to the message.

    Examples
    --------
    >>> check_choice("which", "largest", ("largest", "smallest", "both"))
    'largest'
    >>> check_choice("which", "top", ("largest", "smallest"))
    Traceback (most recent call last):
        ...
    curvlab.errors.InvalidInputError: which must be one of 'largest', 'smallest', got 'top'
    """
    options = tuple(options)
    for option in options:
        if type(option) is type(value) and option == value:
            return option
    _fail(name, "one of " + ", ".join(map(repr, options)), value, fix)


def check_callable(name: str, value: Any, *, what: str = "a callable", fix: str | None = None):
    """``value`` if it is callable; ``what`` describes the expected signature.

    Examples
    --------
    >>> check_callable("loss_fn", None, what="a loss_fn(out, y)")
    Traceback (most recent call last):
        ...
    curvlab.errors.InvalidInputError: loss_fn must be a loss_fn(out, y), got None (NoneType)
    """
    if not callable(value):
        _fail(name, what, value, fix, show_type=True)
    return value


def check_bool(name: str, value: Any, *, allow_none: bool = False, fix: str | None = None):
    """``value`` if it is ``True`` or ``False`` (or None with ``allow_none``); 0 and 1 are
    refused.

    Examples
    --------
    >>> check_bool("progress", None, allow_none=True) is None
    True
    """
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    _fail(name, "None, True or False" if allow_none else "True or False", value, fix,
          show_type=True)


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | Iterable[int] | None = None,
    shape: tuple[int | None, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    floating: bool = False,
    finite: bool = False,
    fix: str | None = None,
) -> torch.Tensor:
    """``value`` if it is a tensor with the given number of dimensions, shape (None entries
    match any size), dtype and device, optionally floating point and finite.

    Parameters
    ----------
    name : str
        The argument's name.
    value : Any
        The tensor to check (numpy arrays are refused: convert with ``torch.as_tensor``).
    ndim : int or iterable of int, optional
        Allowed numbers of dimensions.
    shape : tuple of (int or None), optional
        The required shape.
    dtype : torch.dtype, optional
    device : torch.device or str, optional
    floating : bool, default False
        Require a floating dtype.
    finite : bool, default False
        Require every entry to be finite.
    fix : str or None, default None
        What to do, appended to the message.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> check_tensor("v", torch.zeros(3, 2), shape=(3, None)).shape
    torch.Size([3, 2])
    >>> check_tensor("v", torch.zeros(3), dtype=torch.float64)
    Traceback (most recent call last):
        ...
    curvlab.errors.InvalidInputError: v must have dtype torch.float64, got torch.float32; use ...
    """
    if not isinstance(value, torch.Tensor):
        _fail(name, "a torch.Tensor", value, fix or "convert it with torch.as_tensor(...)",
              show_type=True)
    dims = None if ndim is None else ((ndim,) if isinstance(ndim, int) else tuple(ndim))
    if dims is not None and value.ndim not in dims:
        wanted = " or ".join(f"{d}-D" for d in dims)
        message = f"{name} must be {wanted}, got shape {tuple(value.shape)}"
        raise InvalidInputError(message + (f"; {fix}" if fix else ""))
    if shape is not None and (
        value.ndim != len(shape)
        or any(s is not None and s != n for s, n in zip(shape, value.shape))
    ):
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        message = f"{name} must have shape {wanted}, got {tuple(value.shape)}"
        raise InvalidInputError(message + (f"; {fix}" if fix else ""))
    if dtype is not None and value.dtype != dtype:
        raise InvalidInputError(
            f"{name} must have dtype {dtype}, got {value.dtype}; {fix or f'use {name}.to({dtype})'}"
        )
    if floating and not value.is_floating_point():
        raise InvalidInputError(
            f"{name} must be floating point, got {value.dtype}; "
            f"{fix or f'use {name}.to(torch.float64)'}"
        )
    if device is not None and value.device != torch.device(device):
        raise InvalidInputError(
            f"{name} is on {value.device} but must be on {torch.device(device)}; "
            f"{fix or f'use {name}.to({str(torch.device(device))!r})'}"
        )
    if finite and not bool(torch.isfinite(value).all()):
        raise InvalidInputError(
            f"{name} must be finite, got NaN or infinite entries" + (f"; {fix}" if fix else "")
        )
    return value


def check_instance(name: str, value: Any, kinds: type | tuple[type, ...], *,
                   fix: str | None = None):
    """``value`` if it is an instance of ``kinds``.

    Examples
    --------
    >>> from torch import nn
    >>> check_instance("model", nn.Linear(2, 1), nn.Module)
    Linear(in_features=2, out_features=1, bias=True)
    """
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        _fail(name, f"a {names}", value, fix, show_type=True)
    return value


def check_optional(check: Callable[..., T], name: str, value: Any, **kwargs: Any) -> T | None:
    """None if ``value`` is None, else ``check(name, value, **kwargs)``.

    Examples
    --------
    >>> check_optional(check_positive, "kl_clip", None) is None
    True
    >>> check_optional(check_positive, "kl_clip", 0.01)
    0.01
    """
    return None if value is None else check(name, value, **kwargs)


__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_instance",
    "check_int",
    "check_number",
    "check_optional",
    "check_positive",
    "check_positive_int",
    "check_probability",
    "check_tensor",
]
