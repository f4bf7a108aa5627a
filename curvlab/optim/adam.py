"""Adam and AdamW with the damping eps learned by a LinearShrinkageDamper (paper section 7.3).

Adam's step lr * m / (sqrt(v) + eps) is a diagonal preconditioner with damping eps, so the
damper's delta goes straight into ``eps``; Adam's update itself is torch's, unchanged.

Recipe with any torch optimizer that has an ``eps`` in its param groups::

    damper = curvlab.LinearShrinkageDamper(rule="rmt", init=1e-3, update_every=100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=damper.damping)
    damper.attach(opt, key="eps")          # every damper update rewrites group["eps"]
    for step, (x, y) in enumerate(loader):
        ...                                # forward, backward
        opt.step()
        damper.step(...)                   # updates delta every update_every steps

:func:`adam_with_learned_eps` does the first three lines. Note the paper's caveat: Adam
preconditions with sqrt of the gradient second moment, so a delta estimated for the Hessian
can be too harsh; the paper pairs it with the eq. 16 warm-up schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from curvlab.errors import InvalidInputError


def adam_with_learned_eps(
    params: Iterable,
    damper: Any,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    decoupled: bool = False,
    **kwargs: Any,
) -> torch.optim.Adam | torch.optim.AdamW:
    """A ``torch.optim.Adam`` (``decoupled=True``: ``AdamW``) whose ``eps`` follows ``damper``.

    ``damper`` is a LinearShrinkageDamper (or any object with a ``damping`` attribute and
    ``attach(optimizer, key)``); ``eps`` starts at ``damper.damping``. Extra keyword
    arguments (``amsgrad``, ``foreach``, ...) go to the torch constructor.
    """
    if not hasattr(damper, "damping") or not callable(getattr(damper, "attach", None)):
        raise InvalidInputError(
            "damper must have a 'damping' attribute and an attach(optimizer, key) method, "
            f"such as curvlab.LinearShrinkageDamper; got {type(damper).__name__}"
        )
    if "eps" in kwargs:
        raise InvalidInputError("eps is set by the damper; do not pass it")
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    optimizer = cls(
        params, lr=lr, betas=betas, eps=float(damper.damping), weight_decay=weight_decay, **kwargs
    )
    damper.attach(optimizer, key="eps")
    return optimizer
