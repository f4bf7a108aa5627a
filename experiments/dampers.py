"""The learned-damping configurations the experiments compare, in one place.

``autodamping`` (KFAC), ``warmup`` (Adam) and the tour build their learned dampings from
:data:`DAMPER_CONFIGS`: every configuration is one update rule of the damper, run from the
same initial damping delta* with the same estimation settings, so the experiments compare
the rules side by side.

Today curvlab has one rule, ``LinearShrinkageDamper(rule="rmt")``: delta <- ema delta +
(1 - ema) max(floor, sigma^2) with sigma^2 the Hessian noise variance of a batch (eq. 15).
The damper's update rules are being rebuilt (issue 13: the paper's description, the
authors' released rule delta <- 0.7 delta + 0.3 (delta* + sigma^2) with learning-rate
compensation, outlier rejection, rules as objects). When they land, add one
:class:`DamperConfig` per rule to :data:`DAMPER_CONFIGS`, with the keyword arguments that
select it in ``options`` (a dict, or a function of delta* for rule objects that hold the
floor, e.g. ``lambda init: {"update_rule": CurvlabUpdate(ema=0.7, floor=init)}`` with
``floor=None``); nothing else in the experiments changes.

Examples
--------
>>> damper = make_damper(DAMPER_CONFIGS[0], 1e-3, batch_size=16, update_every=25, seed=0)
>>> damper.damping, damper.floor
(0.001, 0.001)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import curvlab


@dataclass(frozen=True)
class DamperConfig:
    """One learned-damping rule: a label for tables and plots, and the keyword arguments of
    :class:`curvlab.LinearShrinkageDamper` that select it.

    Attributes
    ----------
    label : str
    options : dict or callable
        Keyword arguments besides the common ones of :func:`make_damper` (they override
        those), or a function of delta* returning them (for rule objects built per run,
        e.g. ``lambda init: {"update_rule": SomeRule(floor=init)}``).
    floor : "init", float or None, default "init"
        "init": ``floor=delta*`` (the paper: "the damping is given an initial floor value
        of delta*"); a number: that floor; None: no ``floor`` keyword (a rule object in
        ``options`` sets its own).
    """

    label: str
    options: dict[str, Any] | Callable[[float], dict[str, Any]] = field(default_factory=dict)
    floor: str | float | None = "init"


#: The rules compared by the experiments; issue 13's rules are added here (module docstring).
DAMPER_CONFIGS: tuple[DamperConfig, ...] = (
    DamperConfig("curvlab rmt (EMA 0.7, floor delta*)", {"rule": "rmt", "ema": 0.7}),
)


def make_damper(
    config: DamperConfig,
    init: float,
    *,
    batch_size: int,
    update_every: int,
    seed: int,
    **common: Any,
) -> curvlab.LinearShrinkageDamper:
    """The damper of ``config`` starting at ``init`` (delta*).

    Parameters
    ----------
    config : DamperConfig
    init : float
        The initial damping delta*.
    batch_size : int
        B, the optimizer's batch: the damping is the Hessian noise of a batch of B.
    update_every : int
        Steps between re-estimates.
    seed : int
        Seeds the damper's probes and subsamples.
    **common
        Further keyword arguments shared by every configuration (``subsample``,
        ``n_probes``, ``population``, ...).

    Returns
    -------
    curvlab.LinearShrinkageDamper
    """
    kwargs = {
        "init": init,
        "batch_size": batch_size,
        "update_every": update_every,
        "seed": seed,
        **common,
    }
    if config.floor is not None:
        kwargs["floor"] = init if config.floor == "init" else float(config.floor)
    kwargs.update(config.options(init) if callable(config.options) else config.options)
    return curvlab.LinearShrinkageDamper(**kwargs)


def damping_history(damper) -> list[dict]:
    """The damper's trajectory: step, raw estimate, its standard error, the smoothed damping
    and whether the estimate was accepted, one dict per re-estimate."""
    return [
        {
            "step": h.step,
            "estimate": h.estimate,
            "stderr": h.stderr,
            "damping": h.damping,
            "accepted": h.accepted,
        }
        for h in damper.history
    ]


__all__ = ["DAMPER_CONFIGS", "DamperConfig", "damping_history", "make_damper"]
