"""Damping <-> linear shrinkage toward a scaled identity (DESIGN.md section 4, paper eq. 13).

For a curvature estimate H and a target tau * I,

    (1 - rho) H + rho tau I = (1 - rho) (H + delta I),   delta = tau rho / (1 - rho),
                                                          rho = delta / (tau + delta),

so a step with damping delta equals a step with the shrunk matrix and the learning rate
scaled by beta = 1 - rho; for the identity target (tau = 1) beta = 1 / (1 + delta).
"""

from __future__ import annotations

import math

from curvlab.validation import check_number, check_positive, check_probability


def _check_scale(tau: float) -> float:
    return check_positive("tau", tau, fix="the target scale of tau * I is positive")


def damping_to_shrinkage(delta: float, tau: float = 1.0) -> float:
    """rho = delta / (tau + delta): the shrinkage toward tau * I equal to damping delta >= 0.

    Parameters
    ----------
    delta : float
        Damping >= 0 (``math.inf`` gives rho = 1).
    tau : float, default 1.0
        Target scale > 0.

    Returns
    -------
    float
        rho in [0, 1].

    Raises
    ------
    InvalidInputError
        For a negative or NaN delta, or a non-positive tau.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13.

    Examples
    --------
    >>> from curvlab.shrinkage import damping_to_shrinkage
    >>> damping_to_shrinkage(1.0), damping_to_shrinkage(1.0, tau=3.0)
    (0.5, 0.25)
    """
    tau, delta = _check_scale(tau), check_number("delta", delta, low=0.0, finite=False)
    return 1.0 if math.isinf(delta) else delta / (tau + delta)


def shrinkage_to_damping(rho: float, tau: float = 1.0) -> float:
    """delta = tau rho / (1 - rho): the damping equal to shrinkage rho in [0, 1] toward tau * I.

    rho = 1 (the target alone) is infinite damping.

    Parameters
    ----------
    rho : float
        Shrinkage in [0, 1].
    tau : float, default 1.0
        Target scale > 0.

    Returns
    -------
    float
        delta >= 0 (``math.inf`` at rho = 1).

    Raises
    ------
    InvalidInputError
        For rho outside [0, 1] or a non-positive tau.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13.

    Examples
    --------
    >>> from curvlab.shrinkage import shrinkage_to_damping
    >>> shrinkage_to_damping(0.5), shrinkage_to_damping(0.25, tau=3.0)
    (1.0, 1.0)
    """
    tau, rho = _check_scale(tau), check_probability("rho", rho, include_one=True)
    return math.inf if rho == 1.0 else tau * rho / (1.0 - rho)


def learning_rate_scale(delta: float, tau: float = 1.0) -> float:
    """beta = 1 - rho = tau / (tau + delta); 1 / (1 + delta) for the identity target (eq. 13).

    A step with damping delta and learning rate alpha equals a step with the shrunk matrix
    and learning rate alpha beta.

    Parameters
    ----------
    delta : float
        Damping >= 0.
    tau : float, default 1.0
        Target scale > 0.

    Returns
    -------
    float
        beta in [0, 1].

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 13.

    Examples
    --------
    >>> from curvlab.shrinkage import learning_rate_scale
    >>> learning_rate_scale(1.0)
    0.5
    """
    return 1.0 - damping_to_shrinkage(delta, tau)
