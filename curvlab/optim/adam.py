"""Adam and AdamW with the damping eps learned by a LinearShrinkageDamper (paper section 7.3).

Adam's step lr * m / (sqrt(v) + eps) is a diagonal preconditioner with damping eps, so the
damper's delta goes straight into ``eps``; Adam's update itself is torch's, unchanged.

Recipe with any torch optimizer that has an ``eps`` in its param groups::

    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=damper.damping)
    damper.attach(opt, key="eps")          # every damper update rewrites group["eps"]
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        damper.step(model, loss_fn, (x, y), loss=loss)   # updates eps every 100 steps

:func:`adam_with_learned_eps` does the first three lines. Param groups keep a documented
relation to the learned eps (``groups=``, see :class:`curvlab.damping.ParamGroupSink`), and
``compensate=True`` runs every step at ``lr (1 + eps)`` (eq. 13). Note the paper's caveat:
Adam preconditions with sqrt of the gradient second moment, so a delta estimated for the
Hessian can be too harsh; the paper pairs it with the eq. 16 warm-up schedule.
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
    *,
    groups: str | None = None,
    compensate: bool = False,
    **kwargs: Any,
) -> torch.optim.Adam | torch.optim.AdamW:
    """A ``torch.optim.Adam`` (``decoupled=True``: ``AdamW``) whose ``eps`` follows ``damper``.

    Parameters
    ----------
    params : iterable
        Parameters or param groups (a group may carry its own ``eps``: see ``groups``).
    damper : LinearShrinkageDamper
        Or any object with a ``damping`` attribute and ``attach(optimizer, key, ...)``;
        ``eps`` starts at ``damper.damping``.
    lr : float, default 1e-3
        As for torch's Adam.
    betas : (float, float), default (0.9, 0.999)
        As for torch's Adam.
    weight_decay : float, default 0.0
        As for torch's Adam (decoupled with ``decoupled=True``).
    decoupled : bool, default False
        AdamW (decoupled weight decay) instead of Adam.
    groups : {None, "shared", "scaled"}, default None
        How groups with their own ``eps`` relate to the learned value (``damper.attach``).
    compensate : bool, default False
        Run each step at ``lr / beta = lr (1 + eps)`` (eq. 13), on top of any scheduler.
    **kwargs : Any
        Passed to the torch constructor (``amsgrad``, ``foreach``, ...; not ``eps``).

    Returns
    -------
    torch.optim.Adam or torch.optim.AdamW
        torch's own optimizer, attached to the damper.

    Raises
    ------
    InvalidInputError
        For a damper without ``damping``/``attach``, or an ``eps`` keyword.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13 and section 7.3. D. P. Kingma and J. Ba,
    "Adam: a method for stochastic optimization", ICLR (2015). I. Loshchilov and F. Hutter,
    "Decoupled weight decay regularization", ICLR (2019) (AdamW).

    Examples
    --------
    >>> import torch, curvlab
    >>> damper = curvlab.LinearShrinkageDamper(init=1e-4)
    >>> opt = adam_with_learned_eps(torch.nn.Linear(2, 1).parameters(), damper, lr=1e-2)
    >>> opt.param_groups[0]["eps"]
    0.0001
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
    if groups is None and compensate is False:
        damper.attach(optimizer, key="eps")  # duck-typed dampers need only (optimizer, key)
    else:
        damper.attach(optimizer, key="eps", groups=groups, compensate=compensate)
    return optimizer
