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

import numbers
from collections.abc import Callable

from curvlab.damping.resolve import DampingSource, checked_damping, resolve_damping


def damping_schedule(damper: DampingSource) -> Callable[[int], float]:
    """A ``step -> float`` callable for kfac-pytorch's ``damping=`` argument.

    The value comes from :func:`curvlab.damping.resolve_damping`, the resolver every curvlab
    consumer uses, in its order: a number (constant damping, checked now), an object with a
    ``damping`` attribute (a ``LinearShrinkageDamper``; its cached value is read at every
    call), or a callable of the step. Every value is a Python float, finite and positive
    (kfac-pytorch itself refuses a damping of 0).

    Parameters
    ----------
    damper : float, object with a ``damping`` attribute, or callable
        The damping source.

    Returns
    -------
    callable
        ``schedule(step) -> float``; cheap, and it advances nothing (kfac-pytorch calls it
        several times per step).

    Raises
    ------
    InvalidInputError
        For a damping that is not a positive finite number, an object without
        ``damping``, or a callable whose value at step 0 is not one (checked now, not
        inside kfac-pytorch).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13 and 15. J. G. Pauloski et al.,
    "Convolutional neural network training with distributed K-FAC", SC20 (2020)
    (kfac-pytorch).

    Examples
    --------
    >>> damping_schedule(0.01)(7)
    0.01
    >>> damping_schedule(lambda step: 1.0 / (step + 1))(3)
    0.25
    """
    if isinstance(damper, numbers.Real) and not isinstance(damper, bool):
        value = checked_damping(damper)
        return lambda step: value
    resolve_damping(damper, 0)  # refuse a non-damper now, not inside kfac-pytorch
    return lambda step: resolve_damping(damper, step)


__all__ = ["damping_schedule"]
