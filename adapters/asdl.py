"""ASDL integration: a LinearShrinkageDamper drives the damping of ASDL's gradient makers.

ASDL (``asdfghjkl`` on the package index, imports as ``asdl``; ``pip install
'curvlab[asdl]'``) preconditions gradients inside ``grad_maker.forward_and_backward()``.
Its ``PreconditioningConfig.damping`` is read whenever ASDL computes the inverse of its
curvature: at every preconditioner (or curvature) update step, every step by default
(``preconditioner_upd_interval=1``); between updates the inverse keeps the damping it was
built with. For ``KfacGradientMaker`` ASDL applies the damping as Martens & Grosse's pi
damping (2015, sec. 6.3) to the factors A (inputs) and B (output gradients): a weight's
gradient W becomes

    (B + sqrt(delta)/pi I)^-1 W (A + pi sqrt(delta) I)^-1,   pi = sqrt((tr A/dim A)/(tr B/dim B)),

and a bias' b becomes (B + sqrt(delta)/pi I)^-1 b. :func:`attach_damper` keeps
``config.damping`` equal to the damper's value::

    from asdl.precondition import KfacGradientMaker, PreconditioningConfig
    from curvlab.adapters.asdl import attach_damper

    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=100)
    config = PreconditioningConfig(data_size=batch_size, damping=damper.damping)
    grad_maker = attach_damper(damper, KfacGradientMaker(model, config))
    for x, y in loader:
        optimizer.zero_grad()
        dummy_y = grad_maker.setup_model_call(model, x)
        grad_maker.setup_loss_call(loss_fn, dummy_y, y)
        output, loss = grad_maker.forward_and_backward()   # preconditions with delta
        optimizer.step()
        damper.step(model, loss_fn, (x, y))                # re-estimates delta

The damper's estimates run on curvlab's hook-free view of the model, so they neither see
nor change ASDL's state (its factors live on the modules as ``module.fisher``). Nothing
here imports ``asdl``.
"""

from __future__ import annotations

from typing import Any

from curvlab.errors import InvalidInputError


def attach_damper(damper: Any, grad_maker: Any) -> Any:
    """Keep the damping of an ASDL gradient maker equal to ``damper``'s.

    Parameters
    ----------
    damper : LinearShrinkageDamper
        Or any object with ``attach(obj, key)``.
    grad_maker : asdl.precondition.PreconditionedGradientMaker
        Such as ``KfacGradientMaker``; its ``config.damping`` is written now and after every
        damper update.

    Returns
    -------
    asdl.precondition.PreconditionedGradientMaker
        ``grad_maker`` itself, for chaining.

    Raises
    ------
    InvalidInputError
        ``grad_maker`` has no ``config`` with a ``damping`` field.

    References
    ----------
    K. Osawa et al., "ASDL: a unified interface for gradient preconditioning in PyTorch",
    arXiv:2305.04684 (2023). J. Martens and R. Grosse, "Optimizing neural networks with
    Kronecker-factored approximate curvature", ICML (2015), section 6.3. D. Granziol and
    N. Baskerville, "A random matrix theory approach to damping in deep learning",
    J. Phys. Complex. 3 (2022).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> import curvlab
    >>> damper = curvlab.LinearShrinkageDamper(init=0.01)
    >>> maker = SimpleNamespace(config=SimpleNamespace(damping=1e-7))  # ASDL's layout
    >>> attach_damper(damper, maker).config.damping
    0.01
    """
    config = getattr(grad_maker, "config", None)
    if config is None or not hasattr(config, "damping"):
        raise InvalidInputError(
            f"{type(grad_maker).__name__} has no config.damping: pass an ASDL gradient maker "
            "built with a PreconditioningConfig (such as KfacGradientMaker)"
        )
    damper.attach(config, key="damping")
    return grad_maker


__all__ = ["attach_damper"]
