"""kfac-pytorch integration: curvlab's damping as its ``damping`` schedule (DESIGN.md section 5).

kfac-pytorch (gpauloski/kfac-pytorch, imports as ``kfac``) is not on the package index
curvlab installs from, so it is an optional integration, never vendored. Its
``KFACPreconditioner(model, damping=...)`` takes a float or a callable of the step count,
and it calls that callable several times per step, so the callable must be cheap and must
not advance anything. A ``LinearShrinkageDamper`` (paper eq. 13, 15) plugs in as::

    import kfac
    from curvlab import LinearShrinkageDamper
    from curvlab.adapters.kfac_pytorch import damping_schedule

    damper = LinearShrinkageDamper(init=1e-3, update_every=100)
    preconditioner = kfac.preconditioner.KFACPreconditioner(
        model, damping=damping_schedule(damper)
    )
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        preconditioner.step()                 # reads the damper's current delta
        optimizer.step()
        damper.step(model, loss_fn, (x, y))   # re-estimates delta every update_every steps

Nothing here imports ``kfac``; ``curvlab.backends()["kfac-pytorch"]`` says whether it is
installed and how to install it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from curvlab.errors import InvalidInputError


def damping_schedule(damper) -> Callable[[int], float]:
    """A ``step -> float`` callable for kfac-pytorch's ``damping=`` argument.

    ``damper`` is a number (constant damping), a callable ``damper(step)`` (such as
    ``LinearShrinkageDamper``), or any object with a ``damping`` attribute read at each
    call. The returned value is a Python float, checked to be finite and non-negative.
    """
    if isinstance(damper, bool):
        raise InvalidInputError("damping must be a number, a callable of the step, or a damper")
    if isinstance(damper, (int, float)):
        value = _checked(damper)
        return lambda step: value
    if callable(damper):
        return lambda step: _checked(damper(step))
    if hasattr(damper, "damping"):
        return lambda step: _checked(damper.damping)
    raise InvalidInputError(
        f"cannot use {type(damper).__name__} as a damping schedule: pass a number, a callable "
        "of the step, or an object with a 'damping' attribute (e.g. LinearShrinkageDamper)"
    )


def _checked(value) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"damping must be finite and non-negative, got {value}")
    return value
