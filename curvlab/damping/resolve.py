"""The one damping resolver of curvlab: a number, a damper, or a schedule of the step.

Every consumer of a damping (:class:`curvlab.optim.LanczosOPT`, :class:`curvlab.optim.KFAC`
and kfac-pytorch through :func:`curvlab.adapters.kfac_pytorch.damping_schedule`) reads its
``damping=`` argument through :func:`resolve_damping`, so they accept the same sources, in
the same order, under the same rule:

1. a real number (``bool`` is refused): that number;
2. an object with a ``damping`` attribute (a :class:`~curvlab.damping.LinearShrinkageDamper`,
   a preconditioner): ``float(source.damping)``, read at every call;
3. a callable of the step count: ``float(source(step))``.

A damper is both 2 and 3; its cached attribute is read, so nothing is recomputed. The value
must be finite and positive: every consumer divides by the damping (LanczosOPT steps by
1/delta along the flat directions, KFAC inverts A (x) G + delta I, kfac-pytorch refuses
0), so 0 is refused everywhere, as are negative and non-finite values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from curvlab.errors import InvalidInputError

#: What a consumer accepts as ``damping=``: a number, an object with a ``damping``
#: attribute, or a callable of the step count.
DampingSource = float | Callable[[int], float] | Any


def resolve_damping(source: DampingSource, step: int = 0) -> float:
    """The damping delta of ``source`` at ``step``, checked to be finite and positive.

    Parameters
    ----------
    source : float, object with a ``damping`` attribute, or callable
        Checked in this order: a real number, an object with ``damping`` (read now), a
        callable called as ``source(step)``.
    step : int, default 0
        The consumer's step count, passed to a callable source.

    Returns
    -------
    float
        delta > 0.

    Raises
    ------
    InvalidInputError
        ``source`` is none of the three kinds, or its value is zero, negative, NaN or
        infinite.

    Examples
    --------
    >>> resolve_damping(1e-3)
    0.001
    >>> resolve_damping(lambda step: 1.0 / (step + 1), step=3)
    0.25
    >>> class Holder:
    ...     damping = 0.2
    >>> resolve_damping(Holder())
    0.2
    """
    if isinstance(source, bool) or source is None:
        raise InvalidInputError(
            f"damping must be a number, an object with a 'damping' attribute or a callable of "
            f"the step, got {source!r}"
        )
    if isinstance(source, numbers.Real):
        value = source
    elif hasattr(source, "damping"):
        value = source.damping
    elif callable(source):
        value = source(step)
    else:
        raise InvalidInputError(
            "damping must be a number, an object with a 'damping' attribute (such as a "
            "LinearShrinkageDamper) or a callable of the step, got "
            f"{type(source).__name__}"
        )
    return checked_damping(value)


def checked_damping(value: Any) -> float:
    """``float(value)`` if it is a finite positive damping, else :class:`InvalidInputError`.

    Examples
    --------
    >>> checked_damping(2)
    2.0
    """
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"damping must be a number, got {value!r}") from exc
    if not (value > 0 and math.isfinite(value)):
        raise InvalidInputError(
            f"damping must be a finite positive number, got {value!r} (0 is refused too: "
            "every consumer divides by the damping, so non-negative is not enough)"
        )
    return value


__all__ = ["DampingSource", "checked_damping", "resolve_damping"]
